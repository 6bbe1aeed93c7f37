"""Training a CLIP contrastively (Radford et al., 2021): a pure step, and retrieval on held-out pairs.

Within a batch of ``B`` (image, caption) pairs, the logits are ``exp(logit_scale)`` times the cosine similarities
of every image with every caption; the loss is the mean of the two cross-entropies (images -> their captions,
captions -> their images). ``logit_scale`` trains, clipped at ``log(100)`` as CLIP clips it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ip2p_jax.evaluation.clip_metrics import l2_normalize
from ip2p_jax.models.clip import CLIPModel
from ip2p_jax.training.state import TrainState, apply_gradients, norm_metrics

MAX_LOGIT_SCALE = float(np.log(100.0))


@dataclasses.dataclass(frozen=True)
class CLIPSettings:
    """Static pieces of the step.

    Attributes:
      clip: the module being trained (both towers).
    """

    clip: CLIPModel
    tx: optax.GradientTransformation
    ema_max_decay: float = 0.999
    accumulation: int = 1
    learning_rate: float = 1e-4


def contrastive_loss(
    image_embeds_bp: jax.Array, text_embeds_bp: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """CLIP's symmetric cross-entropy over a batch of matching pairs (row ``i`` of each goes together).

    Returns:
      ``(loss, accuracy)``: the mean of both directions' cross-entropies, and the share of images whose own
      caption scores highest.
    """
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    logits = scale * l2_normalize(image_embeds_bp) @ l2_normalize(text_embeds_bp).T  # (images, captions)
    labels = jnp.arange(logits.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    return (image_to_text + text_to_image) / 2, accuracy


def clip_step(
    state: TrainState, batch: dict[str, jax.Array], key: jax.Array, frozen: dict, settings: CLIPSettings
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One batch of pairs: loss, gradients, AdamW update, EMA.

    Args:
      state: the train state of the CLIP's params (donated by the jitted caller).
      batch: ``pixel_values`` ``(B, S, S, 3)`` (CLIP-normalised) and ``input_ids`` ``(B, 77)``.
      key, frozen: unused (the interface of ``train_step``); the step is deterministic.

    Returns:
      The new state and float32 metrics: ``loss``, ``accuracy`` (in-batch image -> caption), ``logit_scale``, and
      the norms of ``norm_metrics``.
    """
    del key, frozen

    def loss_fn(params):
        image_embeds, text_embeds, logit_scale = settings.clip.apply(
            {"params": params}, batch["pixel_values"], batch["input_ids"]
        )
        return contrastive_loss(image_embeds, text_embeds, logit_scale)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, updates = apply_gradients(
        state, grads, settings.tx, accumulation=settings.accumulation, ema_max_decay=settings.ema_max_decay
    )
    norms = norm_metrics(grads, new_state.params, updates, settings.learning_rate)
    return new_state, {"loss": loss, "accuracy": accuracy, "logit_scale": new_state.params["logit_scale"], **norms}


def retrieval_top1(image_embeds_np: np.ndarray, text_embeds_np: np.ndarray) -> dict[str, float]:
    """Top-1 retrieval among ``N`` matching pairs: ``caption_to_image`` (each caption's best image is its own) and
    ``image_to_caption`` (each image's best caption is its own)."""
    similarity = l2_normalize(jnp.asarray(image_embeds_np)) @ l2_normalize(jnp.asarray(text_embeds_np)).T
    own = np.arange(similarity.shape[0])
    return {
        "caption_to_image": float(np.mean(np.argmax(np.asarray(similarity), axis=0) == own)),
        "image_to_caption": float(np.mean(np.argmax(np.asarray(similarity), axis=1) == own)),
    }
