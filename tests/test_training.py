"""Training: the step's recipe, the loss falling, EMA, 4 -> 8 channels, dropout, resume, devices, train.py."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.data.synthetic import synthetic_batch
from ip2p_jax.schedulers import SchedulerConfig
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.training import checkpoint
from ip2p_jax.training.init import expand_input_channels
from ip2p_jax.training.state import create_train_state, ema_decay, make_optimizer
from ip2p_jax.training.step import StepSettings, apply_conditioning_dropout, conditioning_dropout, train_step
from ip2p_jax.training.tiny import tiny_models

BATCH, SIZE = 8, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, its frozen parts, a jitted step (compiled once for the module) and a batch source."""
    unet, params, vae, vae_params, text, text_params, tokenizer = tiny_models(tmp_path_factory.mktemp("tiny"), 0)
    tx = make_optimizer(1e-3)
    settings = StepSettings(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tx=tx,
        alphas_cumprod=tuple(SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
                             .alphas_cumprod().tolist()),
        learning_rate=1e-3,
    )  # fmt: skip
    null = text.apply({"params": text_params}, jnp.asarray(tokenize(tokenizer, [""])))
    frozen = {"vae": vae_params, "text_encoder": text_params, "null_context": null}
    step = jax.jit(functools.partial(train_step, settings=settings))

    def batch(position):
        b = synthetic_batch(0, position, BATCH, SIZE)
        b["input_ids"] = tokenize(tokenizer, list(b.pop("instruction")))
        return {k: jnp.asarray(v) for k, v in b.items()}

    return dict(unet=unet, params=params, tx=tx, step=step, frozen=frozen, batch=batch)


def run(setup, state, positions):
    losses = []
    for position in positions:
        state, metrics = setup["step"](state, setup["batch"](position), jax.random.key(1), setup["frozen"])
        losses.append(float(metrics["loss"]))
    return state, losses


def test_loss_falls_and_metrics_are_reported(setup):
    state = create_train_state(setup["params"], setup["tx"])
    state, losses = run(setup, state, range(40))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"tiny synthetic run: mean loss of steps 1-5 {first:.3f}, of steps 36-40 {last:.3f}")
    assert last < 0.6 * first
    _, metrics = setup["step"](state, setup["batch"](40), jax.random.key(1), setup["frozen"])
    assert set(metrics) == {"loss", "grad_norm", "param_norm", "update_norm", "learning_rate"}
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert int(state.step) == 40 and int(state.ema_updates) == 40


def test_ema_follows_the_reference_decay(setup):
    assert float(ema_decay(jnp.int32(0))) == pytest.approx(0.1)
    assert float(ema_decay(jnp.int32(1))) == pytest.approx(2 / 11)
    assert float(ema_decay(jnp.int32(10**6))) == pytest.approx(0.9999)
    state = create_train_state(setup["params"], setup["tx"])
    new, _ = run(setup, state, [0])
    # first update: ema = ema - 0.9 * (ema - params), i.e. 0.1 * old + 0.9 * new
    old_leaf, new_leaf, ema_leaf = (jax.tree.leaves(t)[0] for t in (state.params, new.params, new.ema_params))
    np.testing.assert_allclose(ema_leaf, 0.1 * old_leaf + 0.9 * new_leaf, rtol=1e-5, atol=1e-7)


def test_resume_equals_a_straight_run(setup, tmp_path):
    straight, _ = run(setup, create_train_state(setup["params"], setup["tx"]), range(4))
    half, _ = run(setup, create_train_state(setup["params"], setup["tx"]), range(2))
    manager = checkpoint.checkpoint_manager(tmp_path / "ckpt", asynchronous=False)
    checkpoint.save(manager, half, {"data_position": 2})
    manager.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), half)
    restored, meta = checkpoint.restore_latest(checkpoint.checkpoint_manager(tmp_path / "ckpt"), abstract)
    assert meta["data_position"] == 2
    resumed, _ = run(setup, restored, range(meta["data_position"], 4))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_expansion_to_eight_channels_ignores_the_image_latent(tmp_path):
    unet4, params4, *_ = tiny_models(tmp_path, 3, in_channels=4)
    # SD's conv_in has a bias: make it non-zero so that keeping it is checked.
    params4 = {**params4, "conv_in": {**params4["conv_in"], "bias": jnp.linspace(-1, 1, 16)}}
    unet8, params8 = expand_input_channels(unet4, params4, 8)
    rng = np.random.RandomState(0)
    x, image = (jnp.asarray(rng.randn(2, 8, 8, 4), jnp.float32) for _ in range(2))
    context = jnp.asarray(rng.randn(2, 77, 16), jnp.float32)
    eps4, _ = unet4.apply({"params": params4}, x, 500.0, context)
    eps8, _ = unet8.apply({"params": params8}, jnp.concatenate([x, image], -1), 500.0, context)
    np.testing.assert_allclose(np.asarray(eps8), np.asarray(eps4), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params8["conv_in"]["bias"], params4["conv_in"]["bias"])
    assert params8["conv_in"]["kernel"].shape[2] == 8


def test_conditioning_dropout_rates():
    n, p = 200_000, 0.05
    drop_text, drop_image = (np.asarray(x) for x in conditioning_dropout(jax.random.key(0), n, p))
    bound = 5 * np.sqrt(n * p * (1 - p))  # five binomial standard deviations
    for name, count in (
        ("text only", np.sum(drop_text & ~drop_image)),
        ("both", np.sum(drop_text & drop_image)),
        ("image only", np.sum(~drop_text & drop_image)),
    ):
        assert abs(count - n * p) < bound, (name, count)


def test_dropped_examples_are_exactly_the_chosen_ones():
    rng = np.random.RandomState(0)
    context, null = jnp.asarray(rng.randn(6, 77, 4)), jnp.asarray(rng.randn(1, 77, 4))
    latents = jnp.asarray(rng.randn(6, 2, 2, 4))
    drop_text = jnp.asarray([True, True, False, False, True, False])
    drop_image = jnp.asarray([False, True, True, False, False, False])
    new_context, new_latents = apply_conditioning_dropout(context, latents, null, drop_text, drop_image)
    for i in range(6):
        expected_context = null[0] if drop_text[i] else context[i]
        np.testing.assert_array_equal(new_context[i], expected_context)
        np.testing.assert_array_equal(new_latents[i], np.zeros((2, 2, 4)) if drop_image[i] else latents[i])


EIGHT_DEVICES = textwrap.dedent(
    """
    import functools, sys, tempfile
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np
    from ip2p_jax import parallel
    from ip2p_jax.data.synthetic import synthetic_batch
    from ip2p_jax.schedulers import SchedulerConfig
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training.state import create_train_state, make_optimizer
    from ip2p_jax.training.step import StepSettings, train_step
    from ip2p_jax.training.tiny import tiny_models

    unet, params, vae, vae_params, text, text_params, tok = tiny_models(Path(tempfile.mkdtemp()), 0)
    # Plain SGD: AdamW's first update is lr * g / (|g| + eps), which turns float32 reordering noise in a
    # near-zero gradient component into a change of up to lr; SGD keeps the comparison about the gradients.
    import optax
    tx = optax.sgd(1e-3)
    ac = SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod()
    settings = StepSettings(unet=unet, vae=vae, text_encoder=text, tx=tx, alphas_cumprod=tuple(ac.tolist()))
    null = text.apply({"params": text_params}, jnp.asarray(tokenize(tok, [""])))
    frozen = {"vae": vae_params, "text_encoder": text_params, "null_context": null}
    b = synthetic_batch(0, 0, 8, 32)
    b["input_ids"] = tokenize(tok, list(b.pop("instruction")))

    def one_step(mesh):
        create = functools.partial(create_train_state, tx=tx)
        shardings = parallel.state_shardings(mesh, jax.eval_shape(create, params))
        state = jax.jit(create, out_shardings=shardings)(params)
        batch_sharding = parallel.train_batch_sharding(mesh)
        batch = {k: jax.device_put(np.asarray(v), batch_sharding) for k, v in b.items()}
        rep = parallel.replicated(mesh)
        step = jax.jit(functools.partial(train_step, settings=settings),
                       in_shardings=(shardings, batch_sharding, rep, rep), out_shardings=(shardings, rep),
                       donate_argnums=0)
        state, metrics = step(state, batch, jax.random.key(0), jax.device_put(frozen, rep))
        return jax.device_get(state), float(metrics["loss"]), shardings

    reference, loss, _ = one_step(parallel.train_mesh(devices=jax.devices()[:1]))
    for data, fsdp in ((4, 2),):
        state, other_loss, shardings = one_step(parallel.train_mesh(data, fsdp))
        worst = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(state)))
        sharded = sum("fsdp" in str(s.spec) for s in jax.tree.leaves(shardings))
        print(f"mesh {data}x{fsdp}: loss {other_loss:.6f} vs {loss:.6f}, max param difference {worst:.1e}, "
              f"{sharded} arrays sharded over fsdp")
        assert abs(other_loss - loss) <= 1e-5 * abs(loss), (other_loss, loss)
        assert worst <= 1e-6, worst
        assert sharded > 0
    """
)


@pytest.mark.slow
def test_one_step_on_a_data_by_fsdp_mesh_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    print(result.stdout.strip())


@pytest.mark.slow
def test_train_py_runs_saves_and_resumes(tmp_path):
    command = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path)]
    small = ["--config.steps=2", "--config.save_every=1", "--config.log_every=1", "--config.global_batch_size=2"]
    first = subprocess.run(command + small, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert list((tmp_path / "tensorboard").iterdir())
    # Resuming a finished run restores the last checkpoint and has no step left (no compilation needed).
    resumed = subprocess.run(command + small + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2 (data position 2)" in resumed.stderr
    elsewhere = command[:-1] + [str(tmp_path / "none"), "--resume"]
    missing = subprocess.run(elsewhere, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr
