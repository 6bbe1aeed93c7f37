"""Schedulers against diffusers': tables, and 10-step trajectories with the same model function and noise."""

from __future__ import annotations

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import IP2P_SCHEDULER_CONFIG as IP2P_CONFIG
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from ip2p_jax.schedulers import Scheduler, SchedulerError

DIFFUSERS_CLASSES = {
    "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}
CASES = [
    (kind, spacing, eta)
    for kind in DIFFUSERS_CLASSES
    for spacing in (None, "linspace", "leading", "trailing")
    for eta in ((0.0, 0.7) if kind == "ddim" else (0.0,))
]
NUM_STEPS = 10
SHAPE = (2, 4, 4, 3)


def model_output(x: np.ndarray, t: float) -> np.ndarray:
    """A fixed smooth stand-in for the UNet."""
    return 0.6 * x + 0.3 * np.sin(x * 3 + t / 150.0)


def make_config(spacing, clip_sample=None):
    config = dict(IP2P_CONFIG)
    if spacing is not None:
        config["timestep_spacing"] = spacing
    if clip_sample is not None:
        config["clip_sample"] = clip_sample
    return config


@pytest.mark.parametrize("kind,spacing,eta", CASES)
def test_matches_diffusers(kind, spacing, eta, monkeypatch):
    config = make_config(spacing)
    ours = Scheduler.from_config(config, kind=kind, eta=eta)
    schedule = ours.schedule(NUM_STEPS)
    # From the config alone, the tables agree to float32 precision: PyTorch's float32 linspace and sqrt are not
    # correctly rounded on this CPU (17 % of sqrt results are one ulp off), so some entries differ by an ulp...
    from_config = DIFFUSERS_CLASSES[kind].from_config(config)
    from_config.set_timesteps(NUM_STEPS)
    np.testing.assert_array_equal(np.asarray(schedule.timesteps), from_config.timesteps.numpy().astype(np.float32))
    if ours.sigma_space or kind == "dpmpp_2m":
        np.testing.assert_allclose(np.asarray(schedule.sigmas), from_config.sigmas.numpy(), rtol=1e-6, atol=0)
    # ... and given the same tables, every step is diffusers' arithmetic.
    reference = DIFFUSERS_CLASSES[kind].from_config({**config, "trained_betas": ours.config.betas().tolist()})
    reference.set_timesteps(NUM_STEPS)
    np.testing.assert_array_equal(ours.config.alphas_cumprod(), reference.alphas_cumprod.numpy())
    if ours.sigma_space or kind == "dpmpp_2m":
        reference.sigmas = torch.from_numpy(np.asarray(schedule.sigmas))
    np.testing.assert_allclose(float(ours.init_noise_sigma(schedule)), float(reference.init_noise_sigma), rtol=1e-6)

    rng = np.random.RandomState(0)
    noises = rng.randn(NUM_STEPS, *SHAPE).astype(np.float32)
    start = rng.randn(*SHAPE).astype(np.float32) * float(reference.init_noise_sigma)
    monkeypatch.setattr(  # the ancestral step draws its noise here; feed it ours
        scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: torch.from_numpy(noises[step])
    )
    x_ref, x_ours, previous_x0 = torch.from_numpy(start), jnp.asarray(start), jnp.zeros(SHAPE)
    for step, t in enumerate(reference.timesteps):
        scaled_ref = reference.scale_model_input(x_ref, t)
        scaled_ours = ours.scale_model_input(schedule, step, x_ours)
        np.testing.assert_allclose(np.asarray(scaled_ours), scaled_ref.numpy(), atol=1e-5, rtol=0)
        eps = model_output(scaled_ref.numpy(), float(t))
        extra = {"eta": eta, "variance_noise": torch.from_numpy(noises[step])} if kind == "ddim" else {}
        x_ref = reference.step(torch.from_numpy(eps), t, x_ref, **extra).prev_sample
        x_ours, previous_x0 = ours.step(
            schedule, step, x_ours, jnp.asarray(eps), jnp.asarray(noises[step]), previous_x0
        )
        np.testing.assert_allclose(np.asarray(x_ours), x_ref.numpy(), atol=1e-5, rtol=0, err_msg=f"step {step}")


@pytest.mark.parametrize("kind", ["euler_ancestral", "ddim", "dpmpp_2m"])
def test_add_noise_matches_diffusers(kind):
    ours = Scheduler.from_config(IP2P_CONFIG, kind=kind)
    reference = DIFFUSERS_CLASSES[kind].from_config({**IP2P_CONFIG, "trained_betas": ours.config.betas().tolist()})
    reference.set_timesteps(NUM_STEPS)
    schedule = ours.schedule(NUM_STEPS)
    rng = np.random.RandomState(1)
    clean, noise = rng.randn(*SHAPE).astype(np.float32), rng.randn(*SHAPE).astype(np.float32)
    index = 3
    expected = reference.add_noise(
        torch.from_numpy(clean), torch.from_numpy(noise), reference.timesteps[index : index + 1]
    )
    got = ours.add_noise(schedule, index, jnp.asarray(clean), jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-5, rtol=0)


def test_released_config_picks_euler_ancestral():
    scheduler = Scheduler.from_config(IP2P_CONFIG)
    assert scheduler.kind == "euler_ancestral"
    assert scheduler.config.timestep_spacing == "linspace" and scheduler.config.steps_offset == 1


def test_strength_steps():
    scheduler = Scheduler.from_config(IP2P_CONFIG)
    assert scheduler.steps_for_strength(100, 0.8) == 80
    assert scheduler.steps_for_strength(10, 1.0) == 10
    with pytest.raises(ValueError, match="strength"):
        scheduler.steps_for_strength(10, 0.0)
    with pytest.raises(ValueError, match="runs no step"):
        scheduler.steps_for_strength(10, 0.05)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"prediction_type": "v_prediction"}, "prediction_type='v_prediction' is not implemented"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas=True is not implemented"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2' is not implemented"),
        ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
        ({"frobnicate": 1}, "unknown scheduler setting 'frobnicate'"),
        ({"_class_name": "LMSDiscreteScheduler"}, "scheduler class 'LMSDiscreteScheduler' is not implemented"),
    ],
)
def test_unsupported_settings_are_named(change, message):
    with pytest.raises(SchedulerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Scheduler.from_config({**IP2P_CONFIG, **change})


def test_unknown_scheduler_name():
    with pytest.raises(SchedulerError, match="unknown scheduler 'heun'"):
        Scheduler("heun")
