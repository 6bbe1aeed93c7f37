"""Training: the step's recipe, the loss falling, EMA, 4 -> 8 channels, dropout, the objective (v-prediction,
Min-SNR, offset noise, zero terminal SNR), resume, devices, train.py and export."""

from __future__ import annotations

import functools
import importlib.util
import json
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
from ip2p_jax.random_models import smoke_models
from ip2p_jax.schedulers import SchedulerConfig, vp_predictions
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.training import checkpoint
from ip2p_jax.training.init import expand_input_channels
from ip2p_jax.training.objective import (
    Objective,
    add_noise,
    diffusion_loss,
    draw_noise,
    min_snr_weights,
    snr,
    target,
    training_objective,
)
from ip2p_jax.training.state import apply_gradients, create_train_state, ema_decay, make_optimizer
from ip2p_jax.training.step import StepSettings, apply_conditioning_dropout, conditioning_dropout, train_step

BATCH, SIZE = 8, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, its frozen parts, a jitted step (compiled once for the module) and a batch source."""
    unet, params, vae, vae_params, text, text_params, tokenizer = smoke_models(tmp_path_factory.mktemp("tiny"), 0)
    tx = make_optimizer(1e-3)
    settings = StepSettings(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tx=tx,
        alphas_cumprod=tuple(
            SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod().tolist()
        ),
        learning_rate=1e-3,
    )
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


@pytest.mark.parametrize("remat", ["transformer", "resnet_and_transformer"])
def test_remat_keeps_the_loss_and_the_gradients(setup, remat):
    """The UNet's rematerialisation settings recompute activations in the backward pass (the differentiated
    program holds checkpoint regions) and change neither the loss nor the gradients (float32)."""
    unet, params = setup["unet"], setup["params"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, unet.config.in_channels)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(2, 7, setup["frozen"]["null_context"].shape[-1])), jnp.float32)
    goal = jnp.asarray(rng.normal(size=(2, 8, 8, unet.config.out_channels)), jnp.float32)

    def loss_and_grads(model):
        def loss(p):
            eps, _ = model.apply({"params": p}, x, jnp.array([10, 900]), context)
            return jnp.mean((eps - goal) ** 2)

        grad_fn = jax.value_and_grad(loss)
        regions = str(jax.make_jaxpr(grad_fn)(params)).count("remat2[")  # jax.checkpoint's primitive
        return jax.jit(grad_fn)(params), regions

    (plain_loss, plain_grads), plain_regions = loss_and_grads(unet)
    (loss, grads), regions = loss_and_grads(unet.clone(remat=remat))
    assert plain_regions == 0 and regions > 0
    np.testing.assert_allclose(float(loss), float(plain_loss), rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


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
    unet4, params4, *_ = smoke_models(tmp_path, 3, in_channels=4)
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


SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TIMESTEPS = np.array([0, 1, 10, 50, 200, 400, 600, 800, 950, 990, 998, 999])


@pytest.mark.parametrize("zero_snr", [False, True], ids=["sd", "zero-snr"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_diffusers(prediction_type, zero_snr):
    """``compute_snr`` and train_text_to_image.py's ``--snr_gamma`` weights on the same timesteps and table."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    alphas_cumprod = SchedulerConfig(**SD_BETAS, rescale_betas_zero_snr=zero_snr).alphas_cumprod()
    reference = DDPMScheduler(**SD_BETAS, rescale_betas_zero_snr=zero_snr, prediction_type=prediction_type)
    reference.alphas_cumprod = torch.from_numpy(alphas_cumprod)
    timesteps = torch.from_numpy(TIMESTEPS)
    expected_snr = compute_snr(reference, timesteps)
    ours_snr = snr(jnp.asarray(alphas_cumprod), jnp.asarray(TIMESTEPS))
    np.testing.assert_allclose(np.asarray(ours_snr), expected_snr.numpy(), rtol=1e-6)
    for gamma in (1.0, 5.0):
        s = expected_snr + 1 if prediction_type == "v_prediction" else expected_snr
        expected = (torch.stack([s, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / s).numpy()
        got = np.asarray(min_snr_weights(ours_snr, gamma, prediction_type))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6)
        # Zero terminal SNR: at t = 999 diffusers divides 0 by 0 for epsilon; the weight's limit there is 1.
        assert finite.all() != (zero_snr and prediction_type == "epsilon")
        assert np.all(np.isfinite(got)) and (got[-1] == 1.0 or not zero_snr)


def test_targets_and_noising_equal_diffusers():
    """The noised latents and the v target (``DDPMScheduler.add_noise`` / ``get_velocity``), and v converting back
    to the data and the noise (``schedulers.vp_predictions``, which the samplers use)."""
    import torch
    from diffusers import DDPMScheduler

    alphas_cumprod = SchedulerConfig(**SD_BETAS, rescale_betas_zero_snr=True).alphas_cumprod()
    reference = DDPMScheduler(**SD_BETAS, rescale_betas_zero_snr=True)
    reference.alphas_cumprod = torch.from_numpy(alphas_cumprod)
    rng = np.random.RandomState(0)
    clean, noise = (rng.randn(len(TIMESTEPS), 4, 4, 3).astype(np.float32) for _ in range(2))
    nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)  # noqa: E731
    t = torch.from_numpy(TIMESTEPS)
    noisy = add_noise(alphas_cumprod, TIMESTEPS, clean, noise)
    expected = reference.add_noise(nchw(clean), nchw(noise), t).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(noisy), expected, rtol=0, atol=1e-6)
    v = target(alphas_cumprod, TIMESTEPS, clean, noise, "v_prediction")
    expected_v = reference.get_velocity(nchw(clean), nchw(noise), t).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(v), expected_v, rtol=0, atol=1e-6)
    assert target(alphas_cumprod, TIMESTEPS, clean, noise, "epsilon") is noise
    a = alphas_cumprod[TIMESTEPS][:, None, None, None]
    x0, eps = vp_predictions(v, noisy, np.sqrt(a), np.sqrt(1 - a), "v_prediction")
    np.testing.assert_allclose(np.asarray(x0), clean, atol=1e-5)
    np.testing.assert_allclose(np.asarray(eps), noise, atol=1e-5)


def test_offset_noise_is_constant_over_each_image_and_channel():
    key, shape = jax.random.key(3), (4, 8, 8, 3)
    plain = draw_noise(key, shape, 0.0)
    np.testing.assert_array_equal(plain, jax.random.normal(key, shape, jnp.float32))  # unchanged without offset
    offset = np.asarray(draw_noise(key, shape, 0.1)) - np.asarray(plain)
    expected = 0.1 * np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (4, 1, 1, 3)))
    np.testing.assert_allclose(offset, np.broadcast_to(expected, shape), rtol=1e-5, atol=1e-7)


def test_losses_are_the_references():
    """No setting: exactly the reference's epsilon MSE. Min-SNR: train_text_to_image.py's weighted loss."""
    import torch
    import torch.nn.functional as F

    rng = np.random.RandomState(1)
    prediction, wanted = (rng.randn(len(TIMESTEPS), 4, 4, 3).astype(np.float32) for _ in range(2))
    alphas_cumprod = SchedulerConfig(**SD_BETAS).alphas_cumprod()
    plain = diffusion_loss(prediction, wanted, alphas_cumprod, TIMESTEPS, Objective())
    assert float(plain) == float(jnp.mean((jnp.asarray(prediction) - wanted) ** 2))
    for prediction_type in ("epsilon", "v_prediction"):
        objective = Objective(prediction_type, snr_gamma=5.0)
        got = diffusion_loss(prediction, wanted, alphas_cumprod, TIMESTEPS, objective)
        weights = torch.from_numpy(np.asarray(min_snr_weights(snr(alphas_cumprod, TIMESTEPS), 5.0, prediction_type)))
        loss = F.mse_loss(torch.from_numpy(prediction), torch.from_numpy(wanted), reduction="none")
        expected = (loss.mean(dim=[1, 2, 3]) * weights).mean()
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)


def _load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "..", "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_training_objective_defaults_to_the_model_and_reads_old_configs(pipeline_dir, tmp_path):
    """Configs (and checkpoints' saved configs) without the settings train and export as before; the settings, or
    a model whose scheduler has them, change the objective and the schedule."""
    from ip2p_jax.weights import load_noise_schedule

    for config in ({"task": "ip2p"}, _load_config("shapes_t2i.py"), _load_config("tiny.py").to_dict()):
        objective, schedule = training_objective(config, pipeline_dir)
        assert objective == Objective() and schedule == load_noise_schedule(pipeline_dir)
        assert schedule["rescale_betas_zero_snr"] is False
    changed = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "snr_gamma": 5, "noise_offset": 0.05}
    objective, schedule = training_objective(changed, pipeline_dir)
    assert objective == Objective("v_prediction", 5.0, 0.05) and schedule["rescale_betas_zero_snr"] is True
    v_model = tmp_path / "v-model"
    (v_model / "scheduler").mkdir(parents=True)
    saved = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    saved.update(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    (v_model / "scheduler" / "scheduler_config.json").write_text(json.dumps(saved))
    objective, schedule = training_objective({}, v_model)
    assert objective.prediction_type == "v_prediction" and schedule["rescale_betas_zero_snr"] is True
    assert training_objective({"prediction_type": "epsilon"}, v_model)[0].prediction_type == "epsilon"
    for bad, message in (({"prediction_type": "sample"}, "prediction_type"), ({"snr_gamma": -1}, "snr_gamma")):
        with pytest.raises(ValueError, match=message):
            training_objective(bad, pipeline_dir)


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
        print(
            f"{name}: loss {other_loss:.6f} vs {loss:.6f}, max param difference {worst:.1e}, "
            f"{int(other['sharded'])} arrays sharded over fsdp"
        )
        assert abs(other_loss - loss) <= 1e-5 * abs(loss), (name, other_loss, loss)
        assert worst <= 1e-6, (name, worst)
        assert (int(other["sharded"]) > 0) == name.endswith("x2")


def _run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=900, **kwargs)


@pytest.mark.slow
def test_train_py_runs_saves_samples_and_resumes(tmp_path):
    command = ["train.py", "--config", "configs/tiny.py", "--workdir", tmp_path]
    small = [
        "--config.steps=2",
        "--config.checkpoint.every=1",
        "--config.log_every=1",
        "--config.data.global_batch_size=2",
    ]
    samples = ["--config.sample.every=2", "--config.sample.count=2", "--config.sample.steps=2"]
    first = _run(command + small + samples)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert list((tmp_path / "tensorboard").iterdir())
    # Two rows (input | target | edit) of 32 px pictures.
    assert Image.open(tmp_path / "samples" / "step_0000002.png").size == (3 * 32, 2 * 32)
    # Resuming a finished run restores the last checkpoint, says that it has no step left and how to train more,
    # and compiles nothing.
    resumed = _run(command + small + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2 (data position 2)" in resumed.stderr
    assert "nothing to train" in resumed.stderr and "--config.steps=N with N > 2" in resumed.stderr
    assert "done:" not in resumed.stderr and "nan" not in resumed.stderr
    more = _run(command + small[1:] + ["--config.steps=3"])  # and raising the step count trains on
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed at step 2" in more.stderr and "done: step 3" in more.stderr
    missing = _run(command[:-1] + [tmp_path / "none", "--resume"])
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr


@pytest.mark.slow
def test_a_v_prediction_run_exports_a_folder_that_diffusers_edits_as_we_do(tmp_path):
    """train.py with every objective setting (v-prediction, zero terminal SNR, Min-SNR 5, offset noise) on the tiny
    model, then export.py: the folder's scheduler says what the run trained, and diffusers' pipeline and ours edit
    the same way from it."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from ip2p_jax.pipeline import InstructPix2PixPipeline

    objective = [
        "--config.objective.prediction_type=v_prediction",
        "--config.objective.rescale_betas_zero_snr=True",
        "--config.objective.snr_gamma=5",
        "--config.objective.noise_offset=0.05",
    ]
    small = ["--config.steps=3", "--config.data.global_batch_size=4", "--config.checkpoint.every=3"]
    run = _run(["train.py", "--config", "configs/tiny.py", "--workdir", tmp_path / "run", *objective, *small])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: step 3" in run.stderr
    single_file = tmp_path / "model.safetensors"
    export = _run(
        ["export.py", "--workdir", tmp_path / "run", "--out", tmp_path / "model", "--single-file=" + str(single_file)]
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert "v_prediction prediction" in export.stderr
    written = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert written["prediction_type"] == "v_prediction" and written["rescale_betas_zero_snr"] is True
    assert written["timestep_spacing"] == "trailing"

    ours = InstructPix2PixPipeline.from_pretrained(tmp_path / "model")
    assert ours.scheduler.prediction_type == "v_prediction" and ours.scheduler.config.rescale_betas_zero_snr
    # The same model as one LDM-layout file reads back unchanged.
    from_file = InstructPix2PixPipeline.from_single_file(single_file, config=tmp_path / "model")
    for got, want in zip(jax.tree.leaves(from_file.params), jax.tree.leaves(ours.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    reference = StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["make it red", "make it blue"]
    latents = rng.randn(2, 4, 16, 16).astype(np.float32)
    settings = dict(num_inference_steps=5, guidance_scale=7.5, image_guidance_scale=1.5, output_type="np")
    expected = reference(prompts, image=images, latents=torch.from_numpy(latents), **settings).images
    got = ours(images, prompts, scheduler="euler", latents=latents.transpose(0, 2, 3, 1), progress=False, **settings)
    difference = float(np.abs(got.images - expected).max())
    print(f"exported v-prediction, zero-SNR run, Euler (trailing), 5 steps: max abs pixel difference {difference:.2e}")
    assert difference <= 2e-3


@pytest.mark.slow
def test_train_py_trains_an_autoencoder_on_shapes_and_exports_it(tmp_path):
    from diffusers import AutoencoderKL

    from ip2p_jax.weights import load_vae

    data = ["--config.data.name=shapes_edit/small", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    small = [
        "--config.steps=2",
        "--config.data.global_batch_size=2",
        "--config.sample.every=2",
        "--config.sample.count=2",
    ]
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
    command = ["train.py", "--config", "configs/tiny.py", "--config.steps=3", "--config.data.global_batch_size=8"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    single = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    multi = dict(
        env,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_NUM_PROCESSES="2",
        JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
    )

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
