"""The denoising objective shared by the training steps (InstructPix2Pix and text-to-image): what the UNet predicts,
how the loss weighs timesteps, and the noise drawn.

- ``prediction_type``: ``epsilon`` (the noise; Stable Diffusion 1.x, InstructPix2Pix) or ``v_prediction`` (the
  velocity ``v = alpha_t eps - sigma_t x0``, Salimans & Ho 2022; Stable Diffusion 2.x 768-v, and Lin et al.
  2024's recipe with zero terminal SNR, whose last timestep carries no signal to predict the noise from).
- ``snr_gamma``: Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' ``--snr_gamma``, 5 in the paper): each
  example's MSE is weighted by ``min(SNR, gamma) / SNR`` for epsilon and ``min(SNR + 1, gamma) / (SNR + 1)`` for
  v, ``SNR = alphas_cumprod / (1 - alphas_cumprod)``, so that low-noise timesteps no longer dominate the gradient.
  0 turns it off (the plain mean squared error).
- ``noise_offset``: offset noise (diffusers' ``--noise_offset``): ``noise += offset * N(0, 1)`` drawn per example
  and channel, constant over the image, so the model learns to change an image's mean colour. 0 turns it off.

Zero terminal SNR is a property of the noise schedule (``SchedulerConfig.rescale_betas_zero_snr``), not of the
loss: the training steps take the schedule's ``alphas_cumprod``, whose last value is then exactly 0.

Runs read the settings with ``training_objective(config, model)``: a config without them (every run from before
they existed) trains, and exports, as then.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ip2p_jax.schedulers import PREDICTION_TYPES, velocity


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static settings of the loss (the defaults are the plain epsilon-prediction MSE of the IP2P reference).

    Attributes:
      prediction_type: ``epsilon`` or ``v_prediction``.
      snr_gamma: Min-SNR-gamma's ``gamma`` (> 0), or 0 for unweighted MSE.
      noise_offset: the offset noise's scale, or 0.
    """

    prediction_type: str = "epsilon"
    snr_gamma: float = 0.0
    noise_offset: float = 0.0

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        for name in ("snr_gamma", "noise_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
            object.__setattr__(self, name, float(value))


def draw_noise(key: jax.Array, shape: tuple[int, ...], noise_offset: float) -> jax.Array:
    """``N(0, 1)`` noise of ``shape`` ``(B, H, W, C)`` from ``key``, plus ``noise_offset`` times a ``(B, 1, 1, C)``
    normal drawn from ``fold_in(key, 1)`` when ``noise_offset > 0``."""
    noise = jax.random.normal(key, shape, jnp.float32)
    if noise_offset > 0:
        offset = jax.random.normal(jax.random.fold_in(key, 1), (shape[0], 1, 1, shape[-1]), jnp.float32)
        noise = noise + noise_offset * offset
    return noise


def _per_example(alphas_cumprod: jax.Array, timesteps: jax.Array) -> jax.Array:
    """``alphas_cumprod[timesteps]`` as ``(B, 1, 1, 1)`` float32."""
    return jnp.asarray(alphas_cumprod, jnp.float32)[timesteps][:, None, None, None]


def add_noise(alphas_cumprod: jax.Array, timesteps: jax.Array, clean: jax.Array, noise: jax.Array) -> jax.Array:
    """The forward process ``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (``(B, H, W, C)``; ``timesteps`` ``(B,)`` int)."""
    alpha = _per_example(alphas_cumprod, timesteps)
    return jnp.sqrt(alpha) * clean + jnp.sqrt(1 - alpha) * noise


def target(
    alphas_cumprod: jax.Array, timesteps: jax.Array, clean: jax.Array, noise: jax.Array, prediction_type: str
) -> jax.Array:
    """What the UNet should output: the noise, or the velocity ``schedulers.velocity`` (diffusers' ``get_velocity``)."""
    if prediction_type == "epsilon":
        return noise
    alpha = _per_example(alphas_cumprod, timesteps)
    return velocity(clean, noise, jnp.sqrt(alpha), jnp.sqrt(1 - alpha))


class NoisedLatents(NamedTuple):
    """A batch of clean latents taken to random timesteps: ``timesteps`` ``(B,)`` int32, ``noisy`` and ``target``
    ``(B, H, W, C)`` (what the UNet sees and what it should output)."""

    timesteps: jax.Array
    noisy: jax.Array
    target: jax.Array


def noise_latents(
    time_key: jax.Array, noise_key: jax.Array, latents: jax.Array, alphas_cumprod: jax.Array, objective: Objective
) -> NoisedLatents:
    """The diffusion training example of the IP2P and text-to-image steps: each latent's timestep uniform over the
    schedule (``time_key``), its noise (``noise_key``, with the objective's offset), the noised latent and the
    objective's target."""
    timesteps = jax.random.randint(time_key, (latents.shape[0],), 0, alphas_cumprod.shape[0])
    noise = draw_noise(noise_key, latents.shape, objective.noise_offset)
    return NoisedLatents(
        timesteps,
        add_noise(alphas_cumprod, timesteps, latents, noise),
        target(alphas_cumprod, timesteps, latents, noise, objective.prediction_type),
    )


def snr(alphas_cumprod: jax.Array, timesteps: jax.Array) -> jax.Array:
    """``(B,)`` signal-to-noise ratios ``(sqrt(a_t) / sqrt(1 - a_t))^2`` (diffusers' ``compute_snr``)."""
    alpha = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
    return (jnp.sqrt(alpha) / jnp.sqrt(1 - alpha)) ** 2


def min_snr_weights(snr_b: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """``(B,)`` Min-SNR-gamma weights (Hang et al. 2023, eq. 10, for an epsilon or v target as in their 4.2):
    ``min(s, gamma) / s`` with ``s = SNR`` (epsilon) or ``SNR + 1`` (v). At ``SNR = 0`` (the last timestep of a
    zero terminal SNR schedule) the epsilon weight is its limit 1, where diffusers' division gives NaN."""
    s = snr_b + 1 if prediction_type == "v_prediction" else snr_b
    return jnp.where(s > 0, jnp.minimum(s, gamma) / jnp.where(s > 0, s, 1.0), 1.0)


def diffusion_loss(
    prediction: jax.Array,
    target_bhwc: jax.Array,
    alphas_cumprod: jax.Array,
    timesteps: jax.Array,
    objective: Objective,
) -> jax.Array:
    """The scalar loss: ``mean((prediction - target)^2)``, or with ``snr_gamma`` the batch mean of each example's
    mean squared error times its Min-SNR weight (diffusers' ``train_text_to_image.py``)."""
    squared = (prediction.astype(jnp.float32) - target_bhwc) ** 2
    if not objective.snr_gamma:
        return jnp.mean(squared)
    weights = min_snr_weights(snr(alphas_cumprod, timesteps), objective.snr_gamma, objective.prediction_type)
    return jnp.mean(jnp.mean(squared, axis=tuple(range(1, squared.ndim))) * weights)


def training_objective(config: Mapping[str, Any], model: str) -> tuple[Objective, dict[str, Any]]:
    """A run's objective and training noise schedule (``SchedulerConfig`` keywords) from its config's ``objective``
    group (``training/config.py``'s ``diffusion_objective``) and the model folder (or hub id) it starts from;
    ``train.py`` and ``export.py`` both call it, so a run exports the scheduler it trained with.

    Keys, each optional (a saved config from before they existed reads as the defaults):
      ``prediction_type``: ``""`` or absent for the model's own (its ``scheduler_config.json``'s, epsilon if none).
      ``rescale_betas_zero_snr``: ``True`` rescales the model's betas to zero terminal SNR; absent or ``False``
        keeps the model's own schedule (rescaled if its scheduler says so).
      ``snr_gamma``, ``noise_offset``: 0 or absent for off.
    """
    from ip2p_jax.weights import load_noise_schedule, load_prediction_type

    schedule = load_noise_schedule(model)
    if config.get("rescale_betas_zero_snr", False):
        schedule["rescale_betas_zero_snr"] = True
    objective = Objective(
        prediction_type=config.get("prediction_type", "") or load_prediction_type(model),
        snr_gamma=config.get("snr_gamma", 0.0) or 0.0,
        noise_offset=config.get("noise_offset", 0.0) or 0.0,
    )
    return objective, schedule
