"""Classifier-free guidance over IP2P's two conditions, as pure functions.

The guidance batch is laid out ``[branch, image]`` with the branches in the reference's order:

    0  text + image     (instruction context, image latent)
    1  image only       (null-text context,   image latent)
    2  none             (null-text context,   zero latent)

FoI's decoupled guidance (paper 4.3) lives in ``ip2p_jax.foi`` next to the other FoI formulas and calls
``dual_guidance`` here with a mask.

Plain Stable Diffusion (text-to-image, IP2P's data generation) has two branches, ``[text, none]`` (the prompt's
context, then the null text's), combined by ``classifier_free_guidance``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BRANCHES = ("text_image", "image", "none")


def uses_dual_guidance(guidance_scale: float, image_guidance_scale: float) -> bool:
    """Whether sampling runs the three branches; otherwise one conditioned branch, as diffusers does
    (``guidance_scale > 1 and image_guidance_scale >= 1``)."""
    return guidance_scale > 1.0 and image_guidance_scale >= 1.0


def dual_guidance(
    eps_3bhwc: jax.Array,
    guidance_scale: jax.Array | float,
    image_guidance_scale: jax.Array | float,
    text_mask_bhw1: jax.Array | None = None,
) -> jax.Array:
    """IP2P's guided epsilon ``e_none + s_I (e_img - e_none) + s_T (e_full - e_img) [* M]``.

    Args:
      eps_3bhwc: ``(3, B, H, W, C)`` predictions of the three branches in ``BRANCHES`` order.
      guidance_scale: ``s_T``, scalar or ``(B,)``.
      image_guidance_scale: ``s_I``, scalar or ``(B,)``.
      text_mask_bhw1: optional ``(B, H, W, 1)`` mask restricting the text term (FoI's decoupled guidance).

    Returns:
      ``(B, H, W, C)`` float32.
    """
    e_full, e_img, e_none = (e.astype(jnp.float32) for e in eps_3bhwc)
    s_t = jnp.reshape(jnp.asarray(guidance_scale, jnp.float32), (-1, 1, 1, 1))
    s_i = jnp.reshape(jnp.asarray(image_guidance_scale, jnp.float32), (-1, 1, 1, 1))
    text_term = s_t * (e_full - e_img)
    if text_mask_bhw1 is not None:
        text_term = text_term * text_mask_bhw1
    return e_none + s_i * (e_img - e_none) + text_term


def classifier_free_guidance(eps_2bhwc: jax.Array, guidance_scale: jax.Array | float) -> jax.Array:
    """Classifier-free guidance ``e_none + s (e_text - e_none)`` (Ho & Salimans; diffusers' Stable Diffusion).

    Args:
      eps_2bhwc: ``(2, B, H, W, C)`` predictions of the ``[text, none]`` branches.
      guidance_scale: ``s``, scalar or ``(B,)``.

    Returns:
      ``(B, H, W, C)`` float32.
    """
    e_text, e_none = (e.astype(jnp.float32) for e in eps_2bhwc)
    scale = jnp.reshape(jnp.asarray(guidance_scale, jnp.float32), (-1, 1, 1, 1))
    return e_none + scale * (e_text - e_none)
