"""Noise schedules and pure step functions, computed as diffusers computes them for the same config.

A scheduler is a frozen description (kind + ``SchedulerConfig``). ``scheduler.schedule(num_inference_steps)``
builds the step tables on the host with diffusers' own float arithmetic (numpy, float64 then float32); the
per-step functions are pure jax functions of those tables, the step index, the sample and the model output, so
they run inside ``lax.scan``. Ancestral noise is an argument, never drawn inside a step.

All samples are latents ``(..., H, W, C)`` float32; ``model_output`` is the epsilon prediction.
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
}
# Settings accepted only at the value given here (diffusers' default for that setting).
_FIXED_SETTINGS = {
    "prediction_type": "epsilon",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "rescale_betas_zero_snr": False,
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
# Settings that change nothing for the epsilon-prediction steps implemented here.
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


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The settings of a diffusers ``scheduler_config.json`` that the steps depend on (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    timestep_spacing: str | None = None  # None: the diffusers class's default (leading for DDIM, else linspace)
    steps_offset: int = 0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any], kind: str) -> SchedulerConfig:
        """Validate a diffusers scheduler config: a setting we do not implement is an error that names it."""
        values = {}
        for key, value in config.items():
            if key.startswith("_") or key in _INERT_SETTINGS:
                continue
            if key in _FREE_SETTINGS:
                values[key] = value
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
        config = cls(**values)
        if config.beta_schedule not in ("linear", "scaled_linear"):
            raise SchedulerError(f"beta_schedule={config.beta_schedule!r} is not implemented (linear, scaled_linear)")
        if config.timestep_spacing not in (None, "linspace", "leading", "trailing"):
            raise SchedulerError(
                f"timestep_spacing={config.timestep_spacing!r} is not one of linspace/leading/trailing"
            )
        return config

    def betas(self) -> np.ndarray:
        """``(num_train_timesteps,)`` float32 betas, correctly rounded from float64.

        PyTorch's float32 ``linspace`` (which diffusers uses) rounds some entries one ulp differently, and
        differently by the CPU's vector width, so the tables agree with diffusers' to float32 precision, not bit
        for bit; given the same betas, every step below is diffusers' arithmetic.
        """
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        # scaled_linear: linear in sqrt(beta), Stable Diffusion's schedule.
        return np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float32) ** 2

    def alphas_cumprod(self) -> np.ndarray:
        """``(num_train_timesteps,)`` float32 cumulative products of ``1 - beta``, accumulated in float64 as
        PyTorch's CPU ``cumprod`` does."""
        return np.cumprod((1.0 - self.betas()).astype(np.float64)).astype(np.float32)


@struct.dataclass
class Schedule:
    """The step tables for one ``num_inference_steps`` (jax arrays, usable under ``jit``).

    Attributes:
      timesteps: ``(n,)`` float32 model timesteps, first step first.
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

    @property
    def sigma_space(self) -> bool:
        """Whether samples live in sigma space (``x0 + sigma * eps``, Euler) rather than DDPM's scaled space."""
        return self.kind in ("euler_ancestral", "euler")

    # ------------------------------------------------------------------ tables (host, numpy)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """``(n,)`` float64 timesteps exactly as the diffusers class computes them for this config."""
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

    def schedule(self, num_inference_steps: int) -> Schedule:
        """The step tables for ``num_inference_steps`` steps."""
        alphas_cumprod = self.config.alphas_cumprod()
        timesteps = self.timesteps(num_inference_steps)
        all_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
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
          model_output: the (guided) epsilon prediction, same shape.
          noise: standard normal noise of the sample's shape; used by Euler ancestral and DDIM with ``eta > 0``.
          previous_x0: DPM-Solver++'s data prediction of the previous step (zeros at the first step).

        Returns:
          ``(next_sample, x0)``: the sample at the next step and this step's data prediction, to pass as
          ``previous_x0`` to the next call.
        """
        sample, model_output = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        if self.kind in ("euler_ancestral", "euler"):
            sigma, sigma_next = schedule.sigmas[index], schedule.sigmas[index + 1]
            x0 = sample - sigma * model_output
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

    def _ddim_step(self, schedule, index, sample, eps, noise):
        alpha, alpha_prev = schedule.alphas[index], schedule.alphas_prev[index]
        beta = 1 - alpha
        x0 = (sample - jnp.sqrt(beta) * eps) / jnp.sqrt(alpha)
        if self.config.clip_sample:
            x0 = jnp.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        variance = (1 - alpha_prev) / beta * (1 - alpha / alpha_prev)
        std = self.eta * jnp.sqrt(variance)
        direction = jnp.sqrt(1 - alpha_prev - std**2) * eps
        prev = jnp.sqrt(alpha_prev) * x0 + direction
        if self.eta > 0:
            prev = prev + std * noise
        return prev, x0

    def _dpmpp_2m_step(self, schedule, index, sample, eps, previous_x0):
        sigmas = schedule.sigmas

        def alpha_sigma(sigma):  # sigma space -> (alpha_t, sigma_t) of the VP process
            alpha_t = 1 / jnp.sqrt(sigma**2 + 1)
            return alpha_t, sigma * alpha_t

        alpha_s0, sigma_s0 = alpha_sigma(sigmas[index])
        alpha_t, sigma_t = alpha_sigma(sigmas[index + 1])
        x0 = (sample - sigma_s0 * eps) / alpha_s0
        lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
        lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
        h = lambda_t - lambda_s0
        first_order = (sigma_t / sigma_s0) * sample - alpha_t * (jnp.exp(-h) - 1) * x0
        # Second order (midpoint) from the previous data prediction; the first and last steps are first order.
        alpha_s1, sigma_s1 = alpha_sigma(sigmas[jnp.maximum(index - 1, 0)])
        h_0 = lambda_s0 - (jnp.log(alpha_s1) - jnp.log(sigma_s1))
        d1 = (h / h_0) * (x0 - previous_x0)
        second_order = first_order - 0.5 * alpha_t * (jnp.exp(-h) - 1) * d1
        last = index == schedule.timesteps.shape[0] - 1
        return jnp.where((index == 0) | last, first_order, second_order), x0
