"""Noise schedules and pure step functions, computed as diffusers computes them for the same config.

A scheduler is a frozen description (kind + ``SchedulerConfig``). ``scheduler.schedule(num_inference_steps)``
builds the step tables on the host with diffusers' own float arithmetic (numpy, float64 then float32); the
per-step functions are pure jax functions of those tables, the step index, the sample and the model output, so
they run inside ``lax.scan``. Ancestral noise is an argument, never drawn inside a step.

All samples are latents ``(..., H, W, C)`` float32. ``model_output`` is what the UNet predicts, by the config's
``prediction_type``: the noise (``epsilon``) or the velocity ``v = alpha_t eps - sigma_t x0`` (``v_prediction``,
Salimans & Ho 2022, section 4; Stable Diffusion 2.x 768-v). The conversions between the two live here, once, for
the steps and for training (``training/objective.py``).

Beyond diffusers' defaults: zero terminal SNR (``rescale_betas_zero_snr``, Lin et al. 2024, Algorithm 1; use it
with ``timestep_spacing="trailing"``) for every step, and Karras et al.'s sigmas (``use_karras_sigmas``) for Euler,
Euler ancestral and DPM-Solver++ 2M.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULERS = ("euler_ancestral", "euler", "ddim", "dpmpp_2m")
PREDICTION_TYPES = ("epsilon", "v_prediction")
KARRAS_SCHEDULERS = ("euler_ancestral", "euler", "dpmpp_2m")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5 (diffusers and k-diffusion)
# diffusers' stand-in for the last ``alphas_cumprod`` of a zero terminal SNR schedule (0) in the sigma-space steps and
# DPM-Solver, so that the first sigma is finite (about 4096); DDIM and training keep the 0.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24

# diffusers class names -> ours, so a checkpoint's ``scheduler_config.json`` picks its own scheduler.
_DIFFUSERS_CLASSES = {
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "EulerDiscreteScheduler": "euler",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}

# Settings whose every value we implement.
_FREE_SETTINGS = {
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "timestep_spacing",
    "steps_offset",
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "prediction_type",
    "rescale_betas_zero_snr",
    "use_karras_sigmas",
}
# Settings accepted only at the value given here (diffusers' default for that setting).
_FIXED_SETTINGS = {
    "trained_betas": None,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "thresholding": False,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "final_sigmas_type": "zero",
    "sigma_min": None,
    "sigma_max": None,
    "use_flow_sigmas": False,
}
# DPM-Solver's own settings: checked when DPM-Solver++ 2M runs, irrelevant to the other steps.
_DPM_SETTINGS = {
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_lu_lambdas": False,
    "variance_type": None,
    "lambda_min_clipped": -math.inf,
}
# Settings that change nothing for the steps implemented here.
_INERT_SETTINGS = {
    "skip_prk_steps",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "flow_shift",
    "shift",
    "use_dynamic_shifting",
    "time_shift_type",
    "beta_schedule_type",
}


class SchedulerError(ValueError):
    """A scheduler name or config setting this port does not implement."""


# ---------------------------------------------------------------------------------------------- parametrisations
#
# A sample at noise level t is ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t = sqrt(alphas_cumprod[t])`` and
# ``sigma_t = sqrt(1 - alphas_cumprod[t])`` (DDPM's, "VP", space), or ``x = x0 + sigma eps`` with
# ``sigma = sigma_t / alpha_t`` (Euler's sigma space, ``x = x_t / alpha_t``). The UNet predicts ``eps`` or
# ``v = alpha_t eps - sigma_t x0``; these functions turn either into the data and noise predictions.


def vp_coefficients(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(alpha_t, sigma_t)`` of the VP process at sigma-space level ``sigma``: ``alpha_t = 1 / sqrt(sigma^2 + 1)``."""
    alpha_t = 1 / jnp.sqrt(sigma**2 + 1)
    return alpha_t, sigma * alpha_t


def vp_predictions(
    model_output: jax.Array, sample: jax.Array, alpha_t: jax.Array, sigma_t: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """``(x0, eps)`` predicted by ``model_output`` at the VP sample ``x_t = alpha_t x0 + sigma_t eps``.

    ``epsilon``: ``x0 = (x_t - sigma_t eps) / alpha_t``. ``v_prediction`` (``alpha_t^2 + sigma_t^2 = 1``):
    ``x0 = alpha_t x_t - sigma_t v`` and ``eps = alpha_t v + sigma_t x_t``, finite even at ``alpha_t = 0``.
    """
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t, model_output
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output, alpha_t * model_output + sigma_t * sample
    raise SchedulerError(f"prediction_type={prediction_type!r} is not implemented ({', '.join(PREDICTION_TYPES)})")


def sigma_space_x0(model_output: jax.Array, sample: jax.Array, sigma: jax.Array, prediction_type: str) -> jax.Array:
    """``x0`` predicted by ``model_output`` at the sigma-space sample ``x = x0 + sigma eps``: ``vp_predictions`` at
    ``x_t = x / sqrt(sigma^2 + 1)``, written as the Euler steps of diffusers write it (``x - sigma eps``;
    ``x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)``)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
    raise SchedulerError(f"prediction_type={prediction_type!r} is not implemented ({', '.join(PREDICTION_TYPES)})")


def velocity(clean: jax.Array, noise: jax.Array, alpha_t: jax.Array, sigma_t: jax.Array) -> jax.Array:
    """The v-prediction target ``v = alpha_t eps - sigma_t x0`` (diffusers' ``get_velocity``)."""
    return alpha_t * noise - sigma_t * clean


# ---------------------------------------------------------------------------------------------- tables


def _cumprod(x: np.ndarray) -> np.ndarray:
    """float32 cumulative products accumulated in float64, as PyTorch's CPU ``cumprod`` accumulates float32."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose schedule ends at zero SNR (Lin et al. 2024, Algorithm 1), in float32 as diffusers computes them:
    ``sqrt(alphas_cumprod)`` shifted so that its last value is 0 and scaled so that its first is unchanged."""
    alphas_bar_sqrt = np.sqrt(_cumprod(1 - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    return 1 - np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """``(num_steps,)`` float64 sigmas from ``sigma_max`` down to ``sigma_min``, evenly spaced in ``sigma^(1/rho)``
    (Karras et al. 2022, eq. 5, ``rho = 7``)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of ``sigmas``: linear interpolation of ``log sigma`` in the float32 table ``log_sigmas``
    (``log`` of each training timestep's sigma, increasing), with diffusers' arithmetic."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The settings of a diffusers ``scheduler_config.json`` that the steps depend on (diffusers' defaults).

    ``prediction_type`` is ``epsilon`` or ``v_prediction``; ``rescale_betas_zero_snr`` rescales the betas to zero
    terminal SNR; ``use_karras_sigmas`` replaces the spaced timesteps' sigmas by Karras et al.'s (Euler, Euler
    ancestral and DPM-Solver++ 2M only).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    timestep_spacing: str | None = None  # None: the diffusers class's default (leading for DDIM, else linspace)
    steps_offset: int = 0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise SchedulerError(f"beta_schedule={self.beta_schedule!r} is not implemented (linear, scaled_linear)")
        if self.timestep_spacing not in (None, "linspace", "leading", "trailing"):
            raise SchedulerError(f"timestep_spacing={self.timestep_spacing!r} is not one of linspace/leading/trailing")
        if self.prediction_type not in PREDICTION_TYPES:
            raise SchedulerError(
                f"scheduler setting prediction_type={self.prediction_type!r} is not implemented "
                f"(only {', '.join(PREDICTION_TYPES)})"
            )
        for name in ("rescale_betas_zero_snr", "use_karras_sigmas"):
            if not isinstance(getattr(self, name), bool):
                raise SchedulerError(f"scheduler setting {name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, config: dict[str, Any], kind: str) -> SchedulerConfig:
        """Validate a diffusers scheduler config: a setting we do not implement is an error that names it."""
        values = {}
        for key, value in config.items():
            if key.startswith("_") or key in _INERT_SETTINGS:
                continue
            if key in _FREE_SETTINGS:
                # diffusers' Euler declares ``use_karras_sigmas: bool | None``; None is off.
                values[key] = False if key == "use_karras_sigmas" and value is None else value
            elif key in _DPM_SETTINGS:
                if kind == "dpmpp_2m" and value != _DPM_SETTINGS[key]:
                    raise SchedulerError(
                        f"scheduler setting {key}={value!r} is not implemented (only {_DPM_SETTINGS[key]!r})"
                    )
            elif key in _FIXED_SETTINGS:
                if value != _FIXED_SETTINGS[key]:
                    raise SchedulerError(
                        f"scheduler setting {key}={value!r} is not implemented (only {_FIXED_SETTINGS[key]!r})"
                    )
            else:
                raise SchedulerError(f"unknown scheduler setting {key!r}")
        return cls(**values)

    def betas(self) -> np.ndarray:
        """``(num_train_timesteps,)`` float32 betas, correctly rounded from float64 (then rescaled to zero terminal
        SNR if set).

        PyTorch's float32 ``linspace`` and ``sqrt`` (which diffusers uses) round some entries one ulp differently,
        and differently by the CPU's vector width, so the tables agree with diffusers' to float32 precision, not bit
        for bit; given the same tables, every step below is diffusers' arithmetic.
        """
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        else:  # scaled_linear: linear in sqrt(beta), Stable Diffusion's schedule.
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float32) ** 2
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> np.ndarray:
        """``(num_train_timesteps,)`` float32 cumulative products of ``1 - beta``, accumulated in float64 as
        PyTorch's CPU ``cumprod`` does; the last is exactly 0 with zero terminal SNR (training's table)."""
        return _cumprod(1.0 - self.betas())


@struct.dataclass
class Schedule:
    """The step tables for one ``num_inference_steps`` (jax arrays, usable under ``jit``).

    Attributes:
      timesteps: ``(n,)`` float32 model timesteps, first step first (fractional for Euler with Karras sigmas).
      sigmas: ``(n + 1,)`` float32 noise levels in sigma space (``sqrt((1 - a) / a)``), last 0; Euler and DPM.
      alphas: ``(n,)`` float32 ``alphas_cumprod`` at each timestep (DDIM).
      alphas_prev: ``(n,)`` float32 ``alphas_cumprod`` at each step's target timestep (DDIM).
    """

    timesteps: jax.Array
    sigmas: jax.Array
    alphas: jax.Array
    alphas_prev: jax.Array


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """One of ``SCHEDULERS`` with its config; pure functions of a ``Schedule``.

    Attributes:
      kind: ``euler_ancestral`` (the released IP2P checkpoint's), ``euler``, ``ddim`` or ``dpmpp_2m``.
      config: the checkpoint's settings.
      eta: DDIM's stochasticity (0 = deterministic); ignored by the others.
    """

    kind: str
    config: SchedulerConfig = SchedulerConfig()
    eta: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULERS:
            raise SchedulerError(f"unknown scheduler {self.kind!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.config.use_karras_sigmas and self.kind not in KARRAS_SCHEDULERS:
            raise SchedulerError(
                f"scheduler setting use_karras_sigmas=True is not implemented for {self.kind} "
                f"(only {', '.join(KARRAS_SCHEDULERS)})"
            )
        if self.config.timestep_spacing is None:  # diffusers' per-class default
            spacing = "leading" if self.kind == "ddim" else "linspace"
            object.__setattr__(self, "config", dataclasses.replace(self.config, timestep_spacing=spacing))

    @classmethod
    def from_config(cls, config: dict[str, Any], kind: str | None = None, eta: float = 0.0) -> Scheduler:
        """From a diffusers scheduler config dict; ``kind`` defaults to the config's own ``_class_name``."""
        if kind is None:
            class_name = config.get("_class_name")
            if class_name not in _DIFFUSERS_CLASSES:
                raise SchedulerError(f"scheduler class {class_name!r} is not implemented; pass one of {SCHEDULERS}")
            kind = _DIFFUSERS_CLASSES[class_name]
        if kind not in SCHEDULERS:
            raise SchedulerError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")
        return cls(kind, SchedulerConfig.from_dict(config, kind), eta)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, kind: str | None = None, eta: float = 0.0) -> Scheduler:
        """From ``folder/scheduler_config.json`` (a checkpoint's ``scheduler/`` folder)."""
        with open(os.path.join(folder, "scheduler_config.json")) as f:
            return cls.from_config(json.load(f), kind, eta)

    def replace(self, kind: str | None = None, **config_changes) -> Scheduler:
        """This scheduler as another ``kind`` and/or with changed config settings, e.g. DPM++ 2M Karras from a
        checkpoint's own: ``pipe.scheduler.replace("dpmpp_2m", use_karras_sigmas=True)``. The other settings, the
        timestep spacing included, stay as they are (as diffusers' ``from_config`` of the saved config keeps them)."""
        config = dataclasses.replace(self.config, **config_changes)
        return Scheduler(self.kind if kind is None else kind, config, self.eta)

    @property
    def sigma_space(self) -> bool:
        """Whether samples live in sigma space (``x0 + sigma * eps``, Euler) rather than DDPM's scaled space."""
        return self.kind in ("euler_ancestral", "euler")

    @property
    def prediction_type(self) -> str:
        """What the model predicts: ``epsilon`` or ``v_prediction``."""
        return self.config.prediction_type

    # ------------------------------------------------------------------ tables (host, numpy)

    def alphas_cumprod(self) -> np.ndarray:
        """``(num_train_timesteps,)`` float32 ``alphas_cumprod`` as this diffusers class holds it: with zero terminal
        SNR the last is ``ZERO_SNR_ALPHA_CUMPROD`` for the sigma-space steps and DPM-Solver, 0 for DDIM."""
        alphas_cumprod = self.config.alphas_cumprod()
        if self.config.rescale_betas_zero_snr and self.kind != "ddim":
            alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
        return alphas_cumprod

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """``(n,)`` float64 timesteps of the config's ``timestep_spacing``, as the diffusers class spaces them."""
        n, train, c = num_inference_steps, self.config.num_train_timesteps, self.config
        if n < 1 or n > train:
            raise SchedulerError(f"num_inference_steps must be in [1, {train}], got {n}")
        dpm = self.kind == "dpmpp_2m"
        integer = self.kind in ("ddim", "dpmpp_2m")
        if c.timestep_spacing == "linspace":
            if dpm:  # DPM-Solver spaces n + 1 points and drops the last (t = 0).
                t = np.linspace(0, train - 1, n + 1).round()[::-1][:-1]
            else:
                t = np.linspace(0, train - 1, n)[::-1]
                t = t.round() if integer else t
        elif c.timestep_spacing == "leading":
            ratio = train // (n + 1) if dpm else train // n
            t = (np.arange(0, n + 1 if dpm else n) * ratio).round()[::-1]
            t = (t[:-1] if dpm else t) + c.steps_offset
        else:  # trailing
            t = np.round(np.arange(train, 0, -train / n)) - 1
        return (t.astype(np.int64) if integer else t).astype(np.float64)

    def _tables(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps (n,) float64, sigmas (n + 1,) float32)`` as the diffusers class computes them."""
        alphas_cumprod = self.alphas_cumprod()
        all_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # float32, increasing in t
        timesteps = self._spaced_timesteps(num_inference_steps)
        sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
        if self.config.use_karras_sigmas:
            # DPM-Solver spans the whole training range; the Euler steps span the spaced timesteps' sigmas.
            low, high = (all_sigmas[0], all_sigmas[-1]) if self.kind == "dpmpp_2m" else (sigmas[-1], sigmas[0])
            sigmas = karras_sigmas(float(low), float(high), num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(all_sigmas))
            if self.kind == "dpmpp_2m":  # integer model timesteps
                timesteps = timesteps.round()
        return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def schedule(self, num_inference_steps: int) -> Schedule:
        """The step tables for ``num_inference_steps`` steps."""
        alphas_cumprod = self.alphas_cumprod()
        timesteps, sigmas = self._tables(num_inference_steps)
        index = timesteps.astype(np.int64)
        alphas = alphas_cumprod[index]
        final = np.float32(1.0) if self.config.set_alpha_to_one else alphas_cumprod[0]
        prev = index - self.config.num_train_timesteps // num_inference_steps
        alphas_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final)
        return Schedule(
            timesteps=jnp.asarray(timesteps, jnp.float32),
            sigmas=jnp.asarray(sigmas),
            alphas=jnp.asarray(alphas, jnp.float32),
            alphas_prev=jnp.asarray(alphas_prev, jnp.float32),
        )

    def steps_for_strength(self, num_inference_steps: int, strength: float) -> int:
        """How many of the last steps an edit at ``strength`` runs: ``int(n * strength)``, as diffusers' img2img."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        steps = min(int(num_inference_steps * strength), num_inference_steps)
        if steps < 1:
            raise ValueError(f"strength {strength} with {num_inference_steps} steps runs no step")
        return steps

    # ------------------------------------------------------------------ per-step functions (jax)

    def init_noise_sigma(self, schedule: Schedule) -> jax.Array:
        """Scale of the initial noise at the first step (``scheduler.init_noise_sigma``)."""
        if not self.sigma_space:
            return jnp.float32(1.0)
        sigma_max = schedule.sigmas[0]
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return jnp.sqrt(sigma_max**2 + 1)

    def add_noise(self, schedule: Schedule, index: jax.Array, clean: jax.Array, noise: jax.Array) -> jax.Array:
        """The sample at step ``index`` for clean latents (``scheduler.add_noise`` at ``timesteps[index]``)."""
        if self.sigma_space:
            return clean + schedule.sigmas[index] * noise
        if self.kind == "dpmpp_2m":  # from the step's sigma, which Karras sigmas put between training timesteps
            alpha_t, sigma_t = vp_coefficients(schedule.sigmas[index])
            return alpha_t * clean + sigma_t * noise
        alpha = schedule.alphas[index]
        return jnp.sqrt(alpha) * clean + jnp.sqrt(1 - alpha) * noise

    def scale_model_input(self, schedule: Schedule, index: jax.Array, sample: jax.Array) -> jax.Array:
        """What the UNet sees of the sample: ``sample / sqrt(sigma^2 + 1)`` in sigma space, else unchanged."""
        if self.sigma_space:
            return sample / jnp.sqrt(schedule.sigmas[index] ** 2 + 1)
        return sample

    def step(
        self,
        schedule: Schedule,
        index: jax.Array,
        sample: jax.Array,
        model_output: jax.Array,
        noise: jax.Array | None = None,
        previous_x0: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """One step from ``timesteps[index]`` to the next.

        Args:
          schedule: the tables of ``self.schedule(n)``.
          index: the step index in ``[0, n)`` (a traced int is fine).
          sample: the current sample, float32.
          model_output: the (guided) model output, epsilon or v by ``config.prediction_type``; same shape.
          noise: standard normal noise of the sample's shape; used by Euler ancestral and DDIM with ``eta > 0``.
          previous_x0: DPM-Solver++'s data prediction of the previous step (zeros at the first step).

        Returns:
          ``(next_sample, x0)``: the sample at the next step and this step's data prediction, to pass as
          ``previous_x0`` to the next call.
        """
        sample, model_output = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        if self.kind in ("euler_ancestral", "euler"):
            sigma, sigma_next = schedule.sigmas[index], schedule.sigmas[index + 1]
            x0 = sigma_space_x0(model_output, sample, sigma, self.prediction_type)
            derivative = (sample - x0) / sigma
            if self.kind == "euler":
                return sample + derivative * (sigma_next - sigma), x0
            # Ancestral: go down to sigma_down deterministically, then add fresh noise of scale sigma_up.
            sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
            return sample + derivative * (sigma_down - sigma) + noise * sigma_up, x0
        if self.kind == "ddim":
            return self._ddim_step(schedule, index, sample, model_output, noise)
        return self._dpmpp_2m_step(schedule, index, sample, model_output, previous_x0)

    def _ddim_step(self, schedule, index, sample, model_output, noise):
        alpha, alpha_prev = schedule.alphas[index], schedule.alphas_prev[index]
        beta = 1 - alpha
        x0, eps = vp_predictions(model_output, sample, jnp.sqrt(alpha), jnp.sqrt(beta), self.prediction_type)
        if self.config.clip_sample:
            x0 = jnp.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        variance = (1 - alpha_prev) / beta * (1 - alpha / alpha_prev)
        std = self.eta * jnp.sqrt(variance)
        direction = jnp.sqrt(1 - alpha_prev - std**2) * eps
        prev = jnp.sqrt(alpha_prev) * x0 + direction
        if self.eta > 0:
            prev = prev + std * noise
        return prev, x0

    def _dpmpp_2m_step(self, schedule, index, sample, model_output, previous_x0):
        sigmas = schedule.sigmas
        alpha_s0, sigma_s0 = vp_coefficients(sigmas[index])
        alpha_t, sigma_t = vp_coefficients(sigmas[index + 1])
        x0, _ = vp_predictions(model_output, sample, alpha_s0, sigma_s0, self.prediction_type)
        lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
        lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
        h = lambda_t - lambda_s0
        first_order = (sigma_t / sigma_s0) * sample - alpha_t * (jnp.exp(-h) - 1) * x0
        # Second order (midpoint) from the previous data prediction; the first and last steps are first order.
        alpha_s1, sigma_s1 = vp_coefficients(sigmas[jnp.maximum(index - 1, 0)])
        h_0 = lambda_s0 - (jnp.log(alpha_s1) - jnp.log(sigma_s1))
        d1 = (h / h_0) * (x0 - previous_x0)
        second_order = first_order - 0.5 * alpha_t * (jnp.exp(-h) - 1) * d1
        last = index == schedule.timesteps.shape[0] - 1
        return jnp.where((index == 0) | last, first_order, second_order), x0
