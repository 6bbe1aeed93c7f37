"""Training: the step's recipe, the loss falling, EMA, 4 -> 8 channels, dropout, resume, devices, train.py."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ip2p_jax.data.synthetic import synthetic_batch
from ip2p_jax.schedulers import SchedulerConfig
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.training import checkpoint
from ip2p_jax.training.init import expand_input_channels
from ip2p_jax.training.state import apply_gradients, create_train_state, ema_decay, make_optimizer
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


def test_accumulation_steps_the_optimizer_and_the_ema_every_k_batches():
    """With accumulation 2 the params and the EMA change on every second batch only, from the mean gradient."""
    params = {"w": jnp.array([1.0, -2.0])}
    tx = make_optimizer(0.1, weight_decay=0.0, max_grad_norm=None, accumulation=2)
    state = create_train_state(params, tx)
    grads = [{"w": jnp.array([1.0, 0.5])}, {"w": jnp.array([3.0, -0.5])}]
    first, _ = apply_gradients(state, grads[0], tx, accumulation=2, ema_max_decay=0.9999)
    np.testing.assert_array_equal(first.params["w"], params["w"])
    np.testing.assert_array_equal(first.ema_params["w"], params["w"])
    assert int(first.ema_updates) == 0
    second, _ = apply_gradients(first, grads[1], tx, accumulation=2, ema_max_decay=0.9999)
    # AdamW's first step moves each weight by the learning rate against the sign of the mean gradient (2, 0).
    np.testing.assert_allclose(second.params["w"], [0.9, -2.0], rtol=1e-6)
    # The first EMA update: decay 0.1, so the EMA is 0.1 * old + 0.9 * new.
    np.testing.assert_allclose(second.ema_params["w"], 0.1 * params["w"] + 0.9 * second.params["w"], rtol=1e-6)
    assert int(second.ema_updates) == 1 and int(second.step) == 2


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _distributed_step(prefix, meshes: str, devices: int, processes: int = 1) -> None:
    """Runs ``distributed_step.py`` in ``processes`` processes of ``devices`` CPU devices each."""
    script = os.path.join(os.path.dirname(__file__), "distributed_step.py")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    runs = [
        subprocess.Popen(
            [sys.executable, script, str(prefix), meshes],
            env=dict(env, JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    for run in runs:
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_one_step_on_eight_devices_and_on_two_processes_equals_one_device(tmp_path):
    """The same step on one device, on 8 devices (data 8; data 4 x fsdp 2) in one process, and on 2 processes of 4
    devices joined by ``jax.distributed`` (data 4 x fsdp 2 across both)."""
    _distributed_step(tmp_path / "one", "1x1", devices=1)
    _distributed_step(tmp_path / "eight", "8x1,4x2", devices=8)
    _distributed_step(tmp_path / "two", "4x2", devices=4, processes=2)
    reference = np.load(tmp_path / "one-1x1.npz")
    for name in ("eight-8x1", "eight-4x2", "two-4x2"):
        other = np.load(tmp_path / f"{name}.npz")
        leaves = [key for key in reference.files if key.startswith("p")]
        worst = max(float(np.abs(reference[k] - other[k]).max()) for k in leaves)
        loss, other_loss = float(reference["loss"]), float(other["loss"])
        print(f"{name}: loss {other_loss:.6f} vs {loss:.6f}, max param difference {worst:.1e}, "
              f"{int(other['sharded'])} arrays sharded over fsdp")  # fmt: skip
        assert abs(other_loss - loss) <= 1e-5 * abs(loss), (name, other_loss, loss)
        assert worst <= 1e-6, (name, worst)
        assert (int(other["sharded"]) > 0) == name.endswith("x2")


def _run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=900, **kwargs)


@pytest.mark.slow
def test_train_py_runs_saves_samples_and_resumes(tmp_path):
    command = ["train.py", "--config", "configs/tiny.py", "--workdir", tmp_path]
    small = ["--config.steps=2", "--config.save_every=1", "--config.log_every=1", "--config.global_batch_size=2"]
    samples = ["--config.sample_every=2", "--config.sample_count=2", "--config.sample_steps=2"]
    first = _run(command + small + samples)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert list((tmp_path / "tensorboard").iterdir())
    # Two rows (input | target | edit) of 32 px pictures.
    assert Image.open(tmp_path / "samples" / "step_0000002.png").size == (3 * 32, 2 * 32)
    # Resuming a finished run restores the last checkpoint and has no step left (no compilation needed).
    resumed = _run(command + small + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2 (data position 2)" in resumed.stderr
    missing = _run(command[:-1] + [tmp_path / "none", "--resume"])
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr


@pytest.mark.slow
def test_train_py_trains_an_autoencoder_on_shapes_and_exports_it(tmp_path):
    from diffusers import AutoencoderKL

    from ip2p_jax.weights import load_vae

    data = ["--config.data=shapes_edit/small", f"--config.data_dir={tmp_path / 'tfds'}"]
    small = ["--config.steps=2", "--config.global_batch_size=2", "--config.sample_every=2", "--config.sample_count=2"]
    run = _run(["train.py", "--config", "configs/shapes_vae.py", "--workdir", tmp_path / "run", *data, *small])
    assert run.returncode == 0, run.stderr[-3000:]
    assert Image.open(tmp_path / "run" / "samples" / "step_0000002.png").size == (2 * 64, 2 * 64)
    export = _run(["export.py", "--workdir", tmp_path / "run", "--out", tmp_path / "vae"])
    assert export.returncode == 0, export.stderr[-3000:]
    reference = AutoencoderKL.from_pretrained(tmp_path / "vae")
    vae, _ = load_vae(tmp_path / "vae", subfolder="")
    assert 0 < reference.config.scaling_factor == vae.config.scaling_factor < 1e3
    assert "autoencoder (scaling_factor" in export.stderr


@pytest.mark.slow
def test_train_py_on_two_processes_equals_one_process(tmp_path):
    """Two processes of 4 CPU devices joined by ``jax.distributed``, each reading its rows of every batch, against
    one process of 8 devices: the same losses, the same weights up to AdamW's amplification of float32 reordering
    noise (see ``distributed_step.py``), and a checkpoint that exports on one device."""
    command = ["train.py", "--config", "configs/tiny.py", "--config.steps=3", "--config.global_batch_size=8"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    single = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    multi = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_NUM_PROCESSES="2",
                 JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}")  # fmt: skip

    def start(workdir, run_env):
        argv = [sys.executable, *command, "--workdir", str(workdir)]
        return subprocess.Popen(argv, env=run_env, stderr=subprocess.PIPE, text=True)

    runs = [start(tmp_path / "one", single)]
    runs += [start(tmp_path / "two", dict(multi, JAX_PROCESS_ID=str(index))) for index in range(2)]
    errors = [run.communicate(timeout=900)[1] for run in runs]
    assert all(run.returncode == 0 for run in runs), [e[-2000:] for e in errors]
    losses = [line for e in errors for line in e.splitlines() if line.startswith("done:")]
    assert len(losses) == 2, "process 1 of 2 must not report"  # one process alone, and process 0 of two
    assert losses[0].split(",")[1] == losses[1].split(",")[1]  # "last loss 1.150476"

    from ip2p_jax.training.checkpoint import restore_weights

    one, _, _ = restore_weights(tmp_path / "one" / "checkpoints")
    two, _, step = restore_weights(tmp_path / "two" / "checkpoints")
    assert step == 3
    worst = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True))
    print(f"train.py, 2 processes x 4 devices against 1 x 8: {losses[1]}; max weight difference {worst:.1e}")
    assert worst <= 1e-4  # learning rate 1e-3: wrong rows or a missed reduction would move weights by ~1e-3
    export = _run(["export.py", "--workdir", tmp_path / "two", "--out", tmp_path / "export"])
    assert export.returncode == 0, export.stderr[-3000:]
