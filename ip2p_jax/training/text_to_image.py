"""One text-to-image (latent diffusion) training step: Stable Diffusion's objective, with an optional grounding term.

Target latents ``scaling_factor * E(image).sample()``, the caption encoded by the frozen text encoder and replaced
by the encoding of ``""`` with probability ``caption_dropout`` (so that classifier-free guidance has an
unconditional model), epsilon-prediction MSE at ``t`` uniform in ``[0, num_train_timesteps)`` (or the objective of
``objective.py``: v-prediction, Min-SNR weighting, offset noise). With grounding
weights above zero the UNet also returns its cross-attention maps at ``grounding_sizes`` and the step adds
``token_weight * L_token + pixel_weight * L_pixel`` (``grounding.py``) for the words of captions that were kept.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ip2p_jax.models.attention import RecordCrossAttention
from ip2p_jax.models.clip_text import CLIPTextModel
from ip2p_jax.models.unet import UNet2DConditionModel
from ip2p_jax.models.vae import AutoencoderKL, sample_latent
from ip2p_jax.training.grounding import grounding_losses
from ip2p_jax.training.objective import Objective, diffusion_loss, noise_latents
from ip2p_jax.training.state import TrainState, apply_gradients, norm_metrics


@dataclasses.dataclass(frozen=True)
class TextToImageStepSettings:
    """Static pieces of the step.

    Attributes:
      unet: the 4-channel UNet being trained; ``vae`` and ``text_encoder`` are frozen.
      alphas_cumprod: ``(num_train_timesteps,)`` of the noise schedule (a tuple, to stay hashable).
      caption_dropout: probability of training on the empty caption (Stable Diffusion: 0.1).
      token_weight, pixel_weight: weights of the grounding terms (0 turns a term off; both 0 records no maps).
      grounding_sizes: the ``(h, w)`` sizes of the cross-attention layers the grounding terms read.
      objective: prediction type, Min-SNR weighting and offset noise (epsilon MSE by default).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tx: optax.GradientTransformation
    alphas_cumprod: tuple
    caption_dropout: float = 0.1
    token_weight: float = 0.0
    pixel_weight: float = 0.0
    grounding_sizes: tuple[tuple[int, int], ...] = ()
    ema_max_decay: float = 0.9999
    accumulation: int = 1
    learning_rate: float = 1e-4
    objective: Objective = Objective()

    @property
    def grounded(self) -> bool:
        return (self.token_weight > 0 or self.pixel_weight > 0) and bool(self.grounding_sizes)


def text_to_image_step(
    state: TrainState, batch: dict[str, jax.Array], key: jax.Array, frozen: dict[str, Any], settings
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One batch: loss, gradients, AdamW update, EMA.

    Args:
      state: the train state of the UNet's params (donated by the jitted caller).
      batch: ``image`` ``(B, H, W, 3)`` float in [-1, 1], ``input_ids`` ``(B, 77)``, and for grounding
        ``token_weights`` ``(B, G, 77)``, ``word_masks`` ``(B, G, H, W)`` and ``word_valid`` ``(B, G)``.
      key: the run's key; this step's randomness is ``fold_in(key, state.step)``.
      frozen: ``{"vae": params, "text_encoder": params, "null_context": (1, 77, D)}``.
      settings: ``TextToImageStepSettings``.

    Returns:
      The new state and float32 metrics: ``loss`` (the total), ``mse``, ``token`` and ``pixel`` (unweighted, when
      grounded), and the norms of ``norm_metrics``.
    """
    k_latent, k_time, k_noise, k_drop = jax.random.split(jax.random.fold_in(key, state.step), 4)
    images = batch["image"]
    batch_size = images.shape[0]
    mean, logvar = settings.vae.apply({"params": frozen["vae"]}, images, method="encode")
    latents = settings.vae.config.scaling_factor * sample_latent(mean, logvar, k_latent)
    context = settings.text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"])
    dropped = jax.random.uniform(k_drop, (batch_size,)) < settings.caption_dropout
    context = jnp.where(dropped[:, None, None], frozen["null_context"].astype(context.dtype), context)

    objective = settings.objective
    alphas_cumprod = jnp.asarray(settings.alphas_cumprod, jnp.float32)
    timesteps, noisy, wanted = noise_latents(k_time, k_noise, latents, alphas_cumprod, objective)
    control = RecordCrossAttention(sizes=settings.grounding_sizes) if settings.grounded else None

    def loss_fn(params):
        prediction, maps = settings.unet.apply({"params": params}, noisy, timesteps, context, control)
        mse = diffusion_loss(prediction, wanted, alphas_cumprod, timesteps, objective)
        if not settings.grounded:
            return mse, {"mse": mse}
        valid = batch["word_valid"] & ~dropped[:, None]
        terms = grounding_losses(maps, batch["token_weights"], batch["word_masks"], valid)
        total = mse + settings.token_weight * terms["token"] + settings.pixel_weight * terms["pixel"]
        return total, {"mse": mse, **terms}

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, updates = apply_gradients(
        state, grads, settings.tx, accumulation=settings.accumulation, ema_max_decay=settings.ema_max_decay
    )
    return new_state, {"loss": loss, **parts, **norm_metrics(grads, new_state.params, updates, settings.learning_rate)}
