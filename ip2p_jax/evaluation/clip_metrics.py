"""CLIP metrics of InstructPix2Pix's data generation and evaluation, and PickScore.

InstructPix2Pix (paper 3.1.2 and 4; the reference's ``metrics/clip_similarity.py``) scores an edit ``x0 -> x1``
between captions ``c0 -> c1`` on unit-length CLIP embeddings ``E``:

- caption fit: ``cos(E_img(x), E_txt(c))`` for each image and its caption;
- image similarity: ``cos(E_img(x0), E_img(x1))``, how much of the input the edit kept;
- directional similarity (Gal et al.): ``cos(E_img(x1) - E_img(x0), E_txt(c1) - E_txt(c0))``, whether the image
  changed the way the caption did. The differences are taken between unit-length embeddings.

PickScore (Kirstain et al., the ``yuvalkirstain/PickScore_v1`` model card): ``exp(logit_scale) * cos(E_img(x),
E_txt(c))`` with that checkpoint's own ``logit_scale`` (``exp(logit_scale)`` is about 100 in trained CLIPs).

The formulas are pure functions of embeddings of shape ``(..., P)`` that broadcast against each other; the
model-level functions embed with jitted calls (one compilation per tower and batch shape) and apply them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ip2p_jax.models.clip import CLIPModel


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / |x|`` along ``axis``, as CLIP code normalises embeddings (no epsilon: a zero embedding gives NaN)."""
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``torch.nn.functional.cosine_similarity`` over the last axis: ``(..., P), (..., P) -> (...)``.

    Each vector is divided by ``max(|v|, eps)`` before the dot product, so a zero vector gives 0, not NaN (the
    directional similarity of an edit that changed nothing).
    """
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return jnp.sum(a * b, axis=-1)


def text_image_similarity(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """CLIP score of images against captions: ``(..., P), (..., P) -> (...)`` cosine in [-1, 1]."""
    return cosine_similarity(l2_normalize(image_embeds), l2_normalize(text_embeds))


def image_similarity(image_embeds_0: jax.Array, image_embeds_1: jax.Array) -> jax.Array:
    """Cosine between two images' embeddings: ``(..., P), (..., P) -> (...)``."""
    return cosine_similarity(l2_normalize(image_embeds_0), l2_normalize(image_embeds_1))


def directional_similarity(
    image_embeds_0: jax.Array, image_embeds_1: jax.Array, text_embeds_0: jax.Array, text_embeds_1: jax.Array
) -> jax.Array:
    """``cos(E_img(x1) - E_img(x0), E_txt(c1) - E_txt(c0))`` on unit-length embeddings: 4 x ``(..., P) -> (...)``.

    The embeddings may be raw projections; each is normalised first, as the IP2P reference does.
    """
    image_change = l2_normalize(image_embeds_1) - l2_normalize(image_embeds_0)
    text_change = l2_normalize(text_embeds_1) - l2_normalize(text_embeds_0)
    return cosine_similarity(image_change, text_change)


def pick_score(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """PickScore: ``exp(logit_scale) * <unit image, unit text>``: ``(..., P), (..., P), () -> (...)``.

    For one prompt and ``N`` candidate images pass text ``(1, P)`` and images ``(N, P)``; a softmax over the ``N``
    scores gives the model card's preference probabilities.
    """
    return jnp.exp(logit_scale) * jnp.sum(l2_normalize(image_embeds) * l2_normalize(text_embeds), axis=-1)


@functools.partial(jax.jit, static_argnames="module")
def image_embeddings(module: CLIPModel, params: dict, pixel_values_bhwc: jax.Array) -> jax.Array:
    """CLIP pixel values ``(B, S, S, 3)`` (see ``clip_preprocess``) -> raw image embeddings ``(B, P)`` float32."""
    return module.apply({"params": params}, pixel_values_bhwc, method=CLIPModel.get_image_features)


@functools.partial(jax.jit, static_argnames="module")
def text_embeddings(module: CLIPModel, params: dict, input_ids_bt: jax.Array) -> jax.Array:
    """Token ids ``(B, T)`` int32 (``ip2p_jax.tokenizer.tokenize``) -> raw text embeddings ``(B, P)`` float32."""
    return module.apply({"params": params}, input_ids_bt, method=CLIPModel.get_text_features)


SCORE_NAMES = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")  # the reference's metadata keys


def edit_scores(
    image_embeds_0: jax.Array, image_embeds_1: jax.Array, text_embeds_0: jax.Array, text_embeds_1: jax.Array
) -> dict[str, jax.Array]:
    """The IP2P reference's four CLIP scores of edits ``(x0, c0) -> (x1, c1)`` from raw embeddings ``(..., P)``,
    under the reference's names (``SCORE_NAMES``): each image against its caption (``clip_sim_0``,
    ``clip_sim_1``), the directional similarity (``clip_sim_dir``) and the input-edited image similarity
    (``clip_sim_image``)."""
    return {
        "clip_sim_0": text_image_similarity(image_embeds_0, text_embeds_0),
        "clip_sim_1": text_image_similarity(image_embeds_1, text_embeds_1),
        "clip_sim_dir": directional_similarity(image_embeds_0, image_embeds_1, text_embeds_0, text_embeds_1),
        "clip_sim_image": image_similarity(image_embeds_0, image_embeds_1),
    }


def edit_similarities(
    module: CLIPModel,
    params: dict,
    pixel_values_0: jax.Array,
    pixel_values_1: jax.Array,
    input_ids_0: jax.Array,
    input_ids_1: jax.Array,
) -> dict[str, jax.Array]:
    """The IP2P reference's four CLIP scores of ``B`` edits ``(x0, c0) -> (x1, c1)``.

    Args:
      module, params: a ``CLIPModel`` and its params (``load_clip``); IP2P used OpenAI's ViT-L/14.
      pixel_values_0, pixel_values_1: ``(B, S, S, 3)`` CLIP pixel values of the input and edited images.
      input_ids_0, input_ids_1: ``(B, T)`` token ids of the input and edited captions.

    Returns:
      ``edit_scores``' four scores, each ``(B,)`` float32.
    """
    batch = pixel_values_0.shape[0]
    # One call per tower on both halves: one compilation and one dispatch each.
    images = image_embeddings(module, params, jnp.concatenate([pixel_values_0, pixel_values_1]))
    texts = text_embeddings(module, params, jnp.concatenate([input_ids_0, input_ids_1]))
    image_0, image_1, text_0, text_1 = images[:batch], images[batch:], texts[:batch], texts[batch:]
    return edit_scores(image_0, image_1, text_0, text_1)


def pick_scores(module: CLIPModel, params: dict, pixel_values_bhwc: jax.Array, input_ids_bt: jax.Array) -> jax.Array:
    """PickScore of each image against its prompt (or one prompt ``(1, T)`` against all): ``(B,)`` float32.

    ``module, params`` should be ``load_clip("yuvalkirstain/PickScore_v1")``.
    """
    images = image_embeddings(module, params, pixel_values_bhwc)
    texts = text_embeddings(module, params, input_ids_bt)
    return pick_score(images, texts, params["logit_scale"])
