"""One InstructPix2Pix training step, a pure function ``(state, batch, key) -> (state, metrics)``.

The recipe of the reference (``ddpm_edit.py`` / diffusers' ``train_instruct_pix2pix.py``): target latents
``scaling_factor * E(edited).sample()``, conditioning latents ``E(input).mode()`` (unscaled), epsilon-prediction
MSE at ``t`` uniform in ``[0, num_train_timesteps)``, conditioning dropout, AdamW, EMA. The objective (v-prediction,
Min-SNR weighting, offset noise) is a setting shared with the text-to-image step (``objective.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ip2p_jax.models.clip_text import CLIPTextModel
from ip2p_jax.models.unet import UNet2DConditionModel
from ip2p_jax.models.vae import AutoencoderKL, sample_latent
from ip2p_jax.training.objective import Objective, diffusion_loss, noise_latents
from ip2p_jax.training.state import TrainState, apply_gradients, norm_metrics


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static pieces of the step: the modules (frozen VAE and text encoder), the noise schedule and the recipe.

    Attributes:
      alphas_cumprod: ``(num_train_timesteps,)`` of the checkpoint's noise schedule (a tuple, to stay hashable).
      dropout: conditioning dropout probability ``p`` (0.05).
      objective: prediction type, Min-SNR weighting and offset noise (the reference's epsilon MSE by default).
      ema_max_decay: 0.9999.
      accumulation: batches per optimizer step (the EMA updates once per optimizer step).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tx: optax.GradientTransformation
    alphas_cumprod: tuple
    dropout: float = 0.05
    ema_max_decay: float = 0.9999
    accumulation: int = 1
    learning_rate: float = 1e-4
    objective: Objective = Objective()


def conditioning_dropout(key: jax.Array, batch: int, p: float) -> tuple[jax.Array, jax.Array]:
    """The reference's dropout: ``r ~ U(0, 1)`` per example; the text is dropped when ``r < 2p``, the image when
    ``p <= r < 3p``. Each case (text only, both, image only) has probability ``p``.

    Returns:
      ``(drop_text, drop_image)``, ``(B,)`` bool.
    """
    r = jax.random.uniform(key, (batch,))
    return r < 2 * p, (r >= p) & (r < 3 * p)


def apply_conditioning_dropout(
    context_btd: jax.Array,
    image_latents_bhwc: jax.Array,
    null_context_1td: jax.Array,
    drop_text: jax.Array,
    drop_image: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The null-text encoding where ``drop_text``, a zero image latent where ``drop_image``."""
    context = jnp.where(drop_text[:, None, None], null_context_1td.astype(context_btd.dtype), context_btd)
    image_latents = jnp.where(drop_image[:, None, None, None], 0.0, image_latents_bhwc)
    return context, image_latents


def train_step(
    state: TrainState, batch: dict[str, jax.Array], key: jax.Array, frozen: dict[str, Any], settings: StepSettings
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One batch: loss, gradients, (accumulated) AdamW update, EMA.

    Args:
      state: the train state (donated by the jitted caller).
      batch: ``input_image`` and ``edited_image`` ``(B, H, W, 3)`` float in [-1, 1], ``input_ids`` ``(B, 77)``.
      key: the run's key; this step's randomness is ``fold_in(key, state.step)``.
      frozen: ``{"vae": params, "text_encoder": params, "null_context": (1, 77, D)}``.
      settings: static settings.

    Returns:
      The new state and float32 metrics: ``loss``, ``grad_norm``, ``param_norm``, ``update_norm``,
      ``learning_rate``.
    """
    k_latent, k_time, k_noise, k_drop = jax.random.split(jax.random.fold_in(key, state.step), 4)
    # One encoder pass over both images: the edited half is sampled (the target), the input half's mode is the
    # (unscaled) conditioning latent.
    batch_size = batch["edited_image"].shape[0]
    pixels = jnp.concatenate([batch["edited_image"], batch["input_image"]])
    mean, logvar = settings.vae.apply({"params": frozen["vae"]}, pixels, method="encode")
    latents = settings.vae.config.scaling_factor * sample_latent(mean[:batch_size], logvar[:batch_size], k_latent)
    image_latents = mean[batch_size:]
    context = settings.text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"])
    drop_text, drop_image = conditioning_dropout(k_drop, batch_size, settings.dropout)
    context, image_latents = apply_conditioning_dropout(
        context, image_latents, frozen["null_context"], drop_text, drop_image
    )

    objective = settings.objective
    alphas_cumprod = jnp.asarray(settings.alphas_cumprod, jnp.float32)
    timesteps, noisy, wanted = noise_latents(k_time, k_noise, latents, alphas_cumprod, objective)
    unet_input = jnp.concatenate([noisy, image_latents], axis=-1)

    def loss_fn(params):
        prediction, _ = settings.unet.apply({"params": params}, unet_input, timesteps, context)
        return diffusion_loss(prediction, wanted, alphas_cumprod, timesteps, objective)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state, updates = apply_gradients(
        state, grads, settings.tx, accumulation=settings.accumulation, ema_max_decay=settings.ema_max_decay
    )
    return new_state, {"loss": loss, **norm_metrics(grads, new_state.params, updates, settings.learning_rate)}
