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
# The settings beyond diffusers' defaults, alone and combined (zero terminal SNR with the trailing spacing that Lin et
# al. prescribe for it).
V = {"prediction_type": "v_prediction"}
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
KARRAS = {"use_karras_sigmas": True}
VARIANTS = {
    "v": V,
    "zero_snr": ZERO_SNR,
    "zero_snr_v": {**ZERO_SNR, **V},
    "karras": KARRAS,
    "karras_v": {**KARRAS, **V},
    "karras_zero_snr_v": {**KARRAS, **ZERO_SNR, **V},
    "zero_snr_leading": {"rescale_betas_zero_snr": True, "timestep_spacing": "leading"},
}
VARIANT_CASES = [
    pytest.param(kind, name, eta, id=f"{kind}-{name}-eta{eta}")
    for kind in DIFFUSERS_CLASSES
    for name, change in VARIANTS.items()
    for eta in ((0.0, 0.7) if kind == "ddim" else (0.0,))
    # DDIM has no Karras sigmas; epsilon at zero SNR divides by alpha_t = 0 at t = 999 (diffusers' DDIM too).
    if not (kind == "ddim" and ("use_karras_sigmas" in change or name == "zero_snr"))
]


@pytest.fixture(autouse=True)
def correctly_rounded_reference(monkeypatch):
    """diffusers runs with correctly rounded float32 ``sqrt``, ``exp``, ``log``, ``expm1`` and powers (computed in
    float64, rounded once). PyTorch's own float32 versions are within about an ulp but not correctly rounded, by an
    amount that depends on the CPU: on an AMD EPYC, 18 % of the ``sqrt`` results of the zero-SNR table are one ulp
    off, and zero terminal SNR's sigma of 4096 and DPM-Solver's ``exp(-h) - 1`` amplify those ulps past the bars
    below (which were met on other CPUs). With correctly rounded primitives the reference is the same on every CPU,
    and ours (numpy's and XLA's arithmetic) is compared with diffusers' algorithm rather than with a CPU's rounding."""

    def rounded(function):
        def wrapper(x, *args, **kwargs):
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
                return function(x.double(), *args, **kwargs).float()
            return function(x, *args, **kwargs)

        return wrapper

    for name in ("sqrt", "exp", "log", "expm1"):
        monkeypatch.setattr(torch, name, rounded(getattr(torch, name)))
        monkeypatch.setattr(torch.Tensor, name, rounded(getattr(torch.Tensor, name)))
    power = torch.Tensor.__pow__
    monkeypatch.setattr(
        torch.Tensor, "__pow__", lambda x, y: rounded(power)(x, y) if not isinstance(y, torch.Tensor) else power(x, y)
    )


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


def table_class(kind: str, config: dict):
    """The diffusers class whose tables ours follow: Euler's for Euler ancestral with Karras sigmas (diffusers' Euler
    ancestral has no such option; ours takes Euler's Karras tables, as k-diffusion's "Euler a Karras"), else the
    kind's own."""
    if kind == "euler_ancestral" and config.get("use_karras_sigmas"):
        return diffusers.EulerDiscreteScheduler
    return DIFFUSERS_CLASSES[kind]


def tolerance(scale: float) -> float:
    """The bar for samples whose largest magnitude so far is ``scale``: 1e-5, or 2e-7 of ``scale`` (3 float32 ulps)
    where samples exceed 50. Zero terminal SNR starts Euler at sigma 4096, where one float32 ulp of a sample is
    already 2.4e-4: a one-ulp difference in a table entry moves a sample by that much."""
    return max(1e-5, 2e-7 * scale)


def check_trajectory(kind: str, config: dict, eta: float, monkeypatch) -> tuple[float, float]:
    """Our tables against diffusers' from the config alone (float32 precision), then 10 steps of ours and of
    diffusers' on the same tables with the same model function and noise. Returns the largest difference in samples
    and the largest sample magnitude."""
    ours = Scheduler.from_config(config, kind=kind, eta=eta)
    schedule = ours.schedule(NUM_STEPS)
    karras = bool(config.get("use_karras_sigmas"))
    # From the config alone, the tables agree to float32 precision: PyTorch's float32 linspace is not correctly
    # rounded, so some entries differ by an ulp...
    from_config = table_class(kind, config).from_config(config)
    from_config.set_timesteps(NUM_STEPS)
    expected_timesteps = from_config.timesteps.numpy().astype(np.float32)
    if karras and kind != "dpmpp_2m":  # fractional timesteps interpolated in the (ulp-different) log sigmas
        np.testing.assert_allclose(np.asarray(schedule.timesteps), expected_timesteps, rtol=0, atol=1e-3)
    else:
        np.testing.assert_array_equal(np.asarray(schedule.timesteps), expected_timesteps)
    if ours.sigma_space or kind == "dpmpp_2m":
        np.testing.assert_allclose(np.asarray(schedule.sigmas), from_config.sigmas.numpy(), rtol=2e-6, atol=0)
    # ... and given the same tables, every step is diffusers' arithmetic.
    reference = DIFFUSERS_CLASSES[kind].from_config(config)
    reference.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod())
    reference.set_timesteps(NUM_STEPS)
    if ours.sigma_space or kind == "dpmpp_2m":
        reference.sigmas = torch.from_numpy(np.asarray(schedule.sigmas))
        timesteps = np.asarray(schedule.timesteps)
        reference.timesteps = torch.from_numpy(timesteps.astype(np.int64 if kind == "dpmpp_2m" else np.float32))
    np.testing.assert_allclose(float(ours.init_noise_sigma(schedule)), float(reference.init_noise_sigma), rtol=1e-6)

    rng = np.random.RandomState(0)
    noises = rng.randn(NUM_STEPS, *SHAPE).astype(np.float32)
    start = rng.randn(*SHAPE).astype(np.float32) * float(reference.init_noise_sigma)
    monkeypatch.setattr(  # the ancestral step draws its noise here; feed it ours
        scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: torch.from_numpy(noises[step])
    )
    x_ref, x_ours, previous_x0 = torch.from_numpy(start), jnp.asarray(start), jnp.zeros(SHAPE)
    scale, worst = float(np.abs(start).max()), 0.0
    for step, t in enumerate(reference.timesteps):
        scaled_ref = reference.scale_model_input(x_ref, t)
        scaled_ours = ours.scale_model_input(schedule, step, x_ours)
        np.testing.assert_allclose(np.asarray(scaled_ours), scaled_ref.numpy(), atol=tolerance(scale), rtol=0)
        eps = model_output(scaled_ref.numpy(), float(t))
        extra = {"eta": eta, "variance_noise": torch.from_numpy(noises[step])} if kind == "ddim" else {}
        x_ref = reference.step(torch.from_numpy(eps), t, x_ref, **extra).prev_sample
        x_ours, previous_x0 = ours.step(
            schedule, step, x_ours, jnp.asarray(eps), jnp.asarray(noises[step]), previous_x0
        )
        assert np.all(np.isfinite(x_ref.numpy()))
        scale = max(scale, float(np.abs(x_ref.numpy()).max()))
        worst = max(worst, float(np.abs(np.asarray(x_ours) - x_ref.numpy()).max()))
        np.testing.assert_allclose(
            np.asarray(x_ours), x_ref.numpy(), atol=tolerance(scale), rtol=0, err_msg=f"step {step}"
        )
    return worst, scale


@pytest.mark.parametrize("kind,spacing,eta", CASES)
def test_matches_diffusers(kind, spacing, eta, monkeypatch):
    check_trajectory(kind, make_config(spacing), eta, monkeypatch)


@pytest.mark.parametrize("kind,variant,eta", VARIANT_CASES)
def test_settings_match_diffusers(kind, variant, eta, monkeypatch):
    """v-prediction, zero terminal SNR and Karras sigmas, alone and combined."""
    worst, scale = check_trajectory(kind, {**IP2P_CONFIG, **VARIANTS[variant]}, eta, monkeypatch)
    print(f"{kind} {variant} eta {eta}: 10 steps, max difference {worst:.1e} (samples up to {scale:.0f})")


@pytest.mark.parametrize(
    "kind,change",
    [("euler_ancestral", {}), ("ddim", {}), ("dpmpp_2m", {}), ("dpmpp_2m", KARRAS), ("ddim", {**ZERO_SNR, **V})],
)
def test_add_noise_matches_diffusers(kind, change):
    config = {**IP2P_CONFIG, **change}
    ours = Scheduler.from_config(config, kind=kind)
    reference = DIFFUSERS_CLASSES[kind].from_config(config)
    reference.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod())
    reference.set_timesteps(NUM_STEPS)
    schedule = ours.schedule(NUM_STEPS)
    if kind == "dpmpp_2m":  # Karras sigmas lie between training timesteps: DPM-Solver noises by the step's sigma
        reference.sigmas = torch.from_numpy(np.asarray(schedule.sigmas))
    rng = np.random.RandomState(1)
    clean, noise = rng.randn(*SHAPE).astype(np.float32), rng.randn(*SHAPE).astype(np.float32)
    for index in (0, 3):
        expected = reference.add_noise(
            torch.from_numpy(clean), torch.from_numpy(noise), reference.timesteps[index : index + 1]
        )
        got = ours.add_noise(schedule, index, jnp.asarray(clean), jnp.asarray(noise))
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_zero_terminal_snr_tables_match_diffusers(beta_schedule):
    """Lin et al.'s rescaled betas end at beta 1 (alphas_cumprod 0); the sigma-space steps and DPM-Solver put 2**-24
    there instead (sigma about 4096), DDIM and training keep 0, each as its diffusers class does."""
    config = {**IP2P_CONFIG, "beta_schedule": beta_schedule, "rescale_betas_zero_snr": True}
    for kind, cls in DIFFUSERS_CLASSES.items():
        ours = Scheduler.from_config(config, kind=kind).alphas_cumprod()
        expected = cls.from_config(config).alphas_cumprod.numpy()
        assert ours[-1] == expected[-1] == (0.0 if kind == "ddim" else 2.0**-24)
        # float32 precision (3 ulps of 1): PyTorch's float32 linspace rounds some entries one ulp off
        np.testing.assert_allclose(ours, expected, rtol=0, atol=3e-7)
    # The shift subtracts sqrt(alphas_cumprod[-1]) from values close to it, and each beta is one minus a ratio of
    # neighbours, so those ulps become differences of up to 8e-6 in the last betas.
    betas = Scheduler.from_config(config).config.betas()
    expected = diffusers.DDIMScheduler.from_config(config).betas.numpy()
    assert betas[-1] == expected[-1] == 1.0
    np.testing.assert_allclose(betas, expected, rtol=0, atol=1e-5)


def test_replace_picks_dpmpp_2m_karras_from_a_checkpoint_config():
    released = Scheduler.from_config(IP2P_CONFIG)
    karras = released.replace("dpmpp_2m", use_karras_sigmas=True)
    assert karras.kind == "dpmpp_2m" and karras.config.use_karras_sigmas
    assert karras.config.beta_schedule == "scaled_linear" and released.config.use_karras_sigmas is False
    with pytest.raises(SchedulerError, match="use_karras_sigmas=True is not implemented for ddim"):
        karras.replace("ddim")


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
        ({"prediction_type": "sample"}, "prediction_type='sample' is not implemented (only epsilon, v_prediction)"),
        ({"_class_name": "DDIMScheduler", "use_karras_sigmas": True}, "use_karras_sigmas=True is not implemented"),
        ({"use_exponential_sigmas": True}, "use_exponential_sigmas=True is not implemented"),
        ({"rescale_betas_zero_snr": 1}, "rescale_betas_zero_snr must be true or false"),
        ({"sigma_max": 80.0}, "sigma_max=80.0 is not implemented"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2' is not implemented"),
        ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
        ({"frobnicate": 1}, "unknown scheduler setting 'frobnicate'"),
        ({"_class_name": "LMSDiscreteScheduler"}, "scheduler class 'LMSDiscreteScheduler' is not implemented"),
    ],
)
def test_unsupported_settings_are_named(change, message):
    with pytest.raises(SchedulerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Scheduler.from_config({**IP2P_CONFIG, **change})


def test_null_karras_setting_is_off():
    """diffusers' Euler declares ``use_karras_sigmas: bool | None``; a saved ``null`` means off."""
    scheduler = Scheduler.from_config(
        {**IP2P_CONFIG, "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": None}
    )
    assert scheduler.config.use_karras_sigmas is False


def test_unknown_scheduler_name():
    with pytest.raises(SchedulerError, match="unknown scheduler 'heun'"):
        Scheduler("heun")
