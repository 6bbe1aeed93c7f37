"""Training a CLIP contrastively (Radford et al., 2021): a pure step, and retrieval on held-out pairs.

Within a batch of ``B`` (image, caption) pairs, the logits are ``exp(logit_scale)`` times the cosine similarities
of every image with every caption; the loss is the mean of the two cross-entropies (images -> their captions,
captions -> their images). ``logit_scale`` trains, clipped at ``log(100)`` as CLIP clips it.

Hard negatives (``data/hard_negatives.py``): each image may also meet ``N`` captions of its own that differ from
its caption by one word and do not describe it. They join that image's row of logits as extra wrong answers
(image -> caption only: they belong to no image), so the loss can fall only by reading the changed word.

Word presence (``presence_weight`` above 0): each image also meets the single words of the scenes' shapes
("circle", "square", ...) as ``S`` more captions, and the cross-entropy of its ``(S,)`` logits against the uniform
distribution over the shapes it holds joins the loss. In-batch captions tell scenes apart by whatever is easiest
(colours, counts); this term can fall only by seeing each shape and reading its word. It has no parameters of its
own: the exported CLIP is a plain one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ip2p_jax.data import hard_negatives
from ip2p_jax.evaluation.clip_metrics import l2_normalize
from ip2p_jax.models.clip import CLIPModel
from ip2p_jax.training.state import TrainState, apply_gradients, norm_metrics

MAX_LOGIT_SCALE = float(np.log(100.0))


@dataclasses.dataclass(frozen=True)
class CLIPSettings:
    """Static pieces of the step.

    Attributes:
      clip: the module being trained (both towers).
    presence_weight: the word-presence term's weight (0: off; the step then needs no ``shapes_present``).
    """

    clip: CLIPModel
    tx: optax.GradientTransformation
    ema_max_decay: float = 0.999
    accumulation: int = 1
    learning_rate: float = 1e-4
    presence_weight: float = 0.0


def contrastive_loss(
    image_embeds_bp: jax.Array,
    text_embeds_bp: jax.Array,
    logit_scale: jax.Array,
    negative_embeds_bnp: jax.Array | None = None,
    negative_valid_bn: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """CLIP's symmetric cross-entropy over a batch of matching pairs (row ``i`` of each goes together).

    Args:
      image_embeds_bp, text_embeds_bp: ``(B, P)`` projections of the images and their captions.
      logit_scale: the learned log temperature.
      negative_embeds_bnp: optional ``(B, N, P)`` projections of each image's hard negative captions, appended to
        its row of image -> caption logits.
      negative_valid_bn: ``(B, N)`` bool, which negatives are real (padding never competes).

    Returns:
      ``(loss, accuracy)``: the mean of both directions' cross-entropies, and the share of images whose own
      caption scores highest (among the batch's captions and its own negatives).
    """
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    images = l2_normalize(image_embeds_bp)
    logits = scale * images @ l2_normalize(text_embeds_bp).T  # (images, captions)
    labels = jnp.arange(logits.shape[0])
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    if negative_embeds_bnp is not None:
        negatives = scale * jnp.einsum("bp,bnp->bn", images, l2_normalize(negative_embeds_bnp))
        negatives = jnp.where(negative_valid_bn, negatives, -jnp.inf)
        logits = jnp.concatenate([logits, negatives], axis=1)  # (images, captions + own negatives)
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    return (image_to_text + text_to_image) / 2, accuracy


def word_presence_loss(
    image_embeds_bp: jax.Array, word_embeds_sp: jax.Array, logit_scale: jax.Array, present_bs: jax.Array
) -> jax.Array:
    """The mean over images of the cross-entropy between the softmax of an image's logits against ``S`` words and
    the uniform distribution over the words present in it (every image holds at least one).

    Args:
      image_embeds_bp: ``(B, P)`` projections of the images.
      word_embeds_sp: ``(S, P)`` projections of the single words.
      logit_scale: the learned log temperature (shared with the contrastive loss).
      present_bs: ``(B, S)`` bool, which words each image holds.
    """
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    logits = scale * l2_normalize(image_embeds_bp) @ l2_normalize(word_embeds_sp).T
    target = present_bs / jnp.sum(present_bs, axis=1, keepdims=True)
    return optax.softmax_cross_entropy(logits, target).mean()


def clip_step(
    state: TrainState, batch: dict[str, jax.Array], key: jax.Array, frozen: dict, settings: CLIPSettings
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One batch of pairs: loss, gradients, AdamW update, EMA.

    Args:
      state: the train state of the CLIP's params (donated by the jitted caller).
      batch: ``pixel_values`` ``(B, S, S, 3)`` (CLIP-normalised) and ``input_ids`` ``(B, T)``; optionally
        ``negative_input_ids`` ``(B, N, T)`` and ``negative_valid`` ``(B, N)`` bool (hard negatives); ``T`` is the
        captions' length (77, or less after ``trim_padding``).
      key: unused (the interface of ``train_step``); the step is deterministic.
      frozen: with ``presence_weight``: ``presence_input_ids`` ``(S, T)``, the shape words' ids; and the batch
        then has ``shapes_present`` ``(B, S)`` bool.

    Returns:
      The new state and float32 metrics: ``loss``, ``accuracy`` (in-batch image -> caption), ``logit_scale``, the
      norms of ``norm_metrics``; with word presence also ``contrastive_loss`` and ``presence_loss``.
    """
    del key

    def loss_fn(params):
        ids, negative_ids = batch["input_ids"], batch.get("negative_input_ids")
        batch_size, length = ids.shape
        if negative_ids is not None:  # one pass of the text tower over the captions and their negatives
            ids = jnp.concatenate([ids, negative_ids.reshape(-1, length)])
        if settings.presence_weight:  # ... and the shape words (padded or cut to the captions' length)
            words = frozen["presence_input_ids"]
            words = jnp.pad(words, ((0, 0), (0, max(0, length - words.shape[1]))))[:, :length]
            ids = jnp.concatenate([ids, words])
        image_embeds, text_embeds, logit_scale = settings.clip.apply({"params": params}, batch["pixel_values"], ids)
        negatives, valid = None, None
        if negative_ids is not None:
            negatives = text_embeds[batch_size : batch_size * (1 + negative_ids.shape[1])]
            negatives, valid = negatives.reshape(*negative_ids.shape[:2], -1), batch["negative_valid"]
        loss, accuracy = contrastive_loss(image_embeds, text_embeds[:batch_size], logit_scale, negatives, valid)
        if not settings.presence_weight:
            return loss, (accuracy, {})
        word_embeds = text_embeds[-frozen["presence_input_ids"].shape[0] :]
        presence = word_presence_loss(image_embeds, word_embeds, logit_scale, batch["shapes_present"])
        parts = {"contrastive_loss": loss, "presence_loss": presence}
        return loss + settings.presence_weight * presence, (accuracy, parts)

    (loss, (accuracy, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, updates = apply_gradients(
        state, grads, settings.tx, accumulation=settings.accumulation, ema_max_decay=settings.ema_max_decay
    )
    norms = norm_metrics(grads, new_state.params, updates, settings.learning_rate)
    metrics = {"loss": loss, "accuracy": accuracy, "logit_scale": new_state.params["logit_scale"], **parts}
    return new_state, {**metrics, **norms}


def trim_padding(input_ids_bt: np.ndarray, eos_token_id: int, multiple: int = 16) -> np.ndarray:
    """Token ids without the padding columns no sequence needs, to a multiple of ``multiple`` columns: ``(B, 77)`` ->
    ``(B, L)``, each row's end token kept. The text tower's attention is causal, so every position up to the end
    token (and so the embedding pooled there) is unchanged; the tower does a fraction of the work on short captions
    (the hard negatives make the text tower the larger part of a step). Few lengths, so few compilations."""
    is_end = input_ids_bt == eos_token_id
    if not is_end.any(axis=1).all():  # (a legacy config's end token id; nothing to trim by)
        return input_ids_bt
    needed = int(np.max(np.argmax(is_end, axis=1))) + 1
    return input_ids_bt[:, : min(input_ids_bt.shape[1], -(-needed // multiple) * multiple)]


def word_pick_questions(scenes, kind: str) -> tuple[np.ndarray, list[str], np.ndarray, int]:
    """The questions of a word pick on ``(scene, order)`` pairs: for every object, its scene's full caption against
    the same caption with the object's shape or colour (``kind``) changed (``hard_negatives.word_variants``).

    Returns:
      ``(scene_index (M,), captions (M * V), true_index (M,), V)``: each question's scene, its ``V`` captions in a
      row, and which of them is true.
    """
    rows, captions, truth, count = [], [], [], 0
    for index, (scene, order) in enumerate(scenes):
        for true, texts in hard_negatives.word_variants(scene, order, kind):
            rows.append(index)
            captions += texts
            truth.append(true)
            count = len(texts)
    return np.asarray(rows), captions, np.asarray(truth), count


def pick_accuracy(image_embeds_np: np.ndarray, variant_embeds_np: np.ndarray, true_index_np: np.ndarray) -> float:
    """How often each image scores its true caption highest among its variants (``hard_negatives.word_variants``).

    Args:
      image_embeds_np: ``(M, P)`` the image of each question (repeated per object).
      variant_embeds_np: ``(M, V, P)`` the ``V`` captions each image chooses among.
      true_index_np: ``(M,)`` which of them is true.
    """
    images = l2_normalize(jnp.asarray(image_embeds_np))
    scores = jnp.einsum("mp,mvp->mv", images, l2_normalize(jnp.asarray(variant_embeds_np)))
    return float(np.mean(np.argmax(np.asarray(scores), axis=1) == true_index_np))


def retrieval_top1(image_embeds_np: np.ndarray, text_embeds_np: np.ndarray) -> dict[str, float]:
    """Top-1 retrieval among ``N`` matching pairs: ``caption_to_image`` (each caption's best image is its own) and
    ``image_to_caption`` (each image's best caption is its own)."""
    similarity = l2_normalize(jnp.asarray(image_embeds_np)) @ l2_normalize(jnp.asarray(text_embeds_np)).T
    own = np.arange(similarity.shape[0])
    return {
        "caption_to_image": float(np.mean(np.argmax(np.asarray(similarity), axis=0) == own)),
        "image_to_caption": float(np.mean(np.argmax(np.asarray(similarity), axis=1) == own)),
    }
