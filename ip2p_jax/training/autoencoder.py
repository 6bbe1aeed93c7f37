"""Training the KL autoencoder (diffusers' ``AutoencoderKL``) from scratch: a pure step and the latent scale.

The loss is Stable Diffusion's autoencoder objective without its perceptual and adversarial terms, which flat
synthetic pictures do not need: the L1 error of the reconstruction of a latent *sample*, plus ``kl_weight`` times
the KL divergence of the encoder's diagonal Gaussian from ``N(0, 1)``, each averaged over elements.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ip2p_jax.models.vae import AutoencoderKL, sample_latent
from ip2p_jax.training.state import TrainState, apply_gradients, norm_metrics


@dataclasses.dataclass(frozen=True)
class AutoencoderSettings:
    """Static pieces of the step.

    Attributes:
      vae: the module being trained.
      kl_weight: weight of the mean KL term against the mean L1 reconstruction error.
    """

    vae: AutoencoderKL
    tx: optax.GradientTransformation
    kl_weight: float = 1e-5
    ema_max_decay: float = 0.999
    accumulation: int = 1
    learning_rate: float = 1e-4


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Elementwise ``KL(N(mean, exp(logvar)) || N(0, 1))``."""
    return 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)


def autoencoder_step(
    state: TrainState, batch: dict[str, jax.Array], key: jax.Array, frozen: dict, settings: AutoencoderSettings
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One batch of pictures: loss, gradients, AdamW update, EMA.

    Args:
      state: the train state of the VAE's params (donated by the jitted caller).
      batch: ``images`` ``(B, H, W, 3)`` float in [-1, 1].
      key: the run's key; this step's randomness is ``fold_in(key, state.step)``.
      frozen: unused (the interface of ``train_step``).

    Returns:
      The new state and float32 metrics: ``loss``, ``l1``, ``kl``, ``grad_norm``, ``param_norm``, ``update_norm``,
      ``learning_rate``.
    """
    del frozen
    images = batch["images"]
    sample_key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
        variables = {"params": params}
        mean, logvar = settings.vae.apply(variables, images, method="encode")
        reconstruction = settings.vae.apply(variables, sample_latent(mean, logvar, sample_key), method="decode")
        l1 = jnp.mean(jnp.abs(reconstruction - images))
        kl = jnp.mean(kl_divergence(mean, logvar))
        return l1 + settings.kl_weight * kl, (l1, kl)

    (loss, (l1, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, updates = apply_gradients(
        state, grads, settings.tx, accumulation=settings.accumulation, ema_max_decay=settings.ema_max_decay
    )
    norms = norm_metrics(grads, new_state.params, updates, settings.learning_rate)
    return new_state, {"loss": loss, "l1": l1, "kl": kl, **norms}


def latent_scaling_factor(vae: AutoencoderKL, params, images_bhwc: jax.Array, key: jax.Array) -> float:
    """``1 / std`` of latent samples of ``images``: the ``scaling_factor`` that gives the diffusion model latents of
    unit variance, as Stable Diffusion's 0.18215 was chosen."""
    mean, logvar = vae.apply({"params": params}, images_bhwc, method="encode")
    return float(1.0 / jnp.std(sample_latent(mean, logvar, key)))
