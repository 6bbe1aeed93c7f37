"""Classifier-free guidance over IP2P's two conditions, as pure functions.

The guidance batch is laid out ``[branch, image]`` with the branches in the reference's order:

    0  text + image     (instruction context, image latent)
    1  image only       (null-text context,   image latent)
    2  none             (null-text context,   zero latent)

FoI's decoupled guidance (paper 4.3) is ``dual_guidance`` with a mask on the text term; which mask each step
uses is ``ip2p_jax.foi.guidance``.

Plain Stable Diffusion (text-to-image, IP2P's data generation) has two branches, ``[text, none]`` (the prompt's
context, then the null text's), combined by ``classifier_free_guidance``.

The branches' outputs are whatever the UNet predicts (epsilon or v): guidance combines them linearly, as diffusers
does, and the scheduler converts the result. Both rules take an optional ``guidance_rescale`` (Lin et al. 2024,
section 3.4; ``rescale_guidance``) that pulls the guided output's standard deviation back toward the fully
conditioned branch's, against the over-exposure that strong guidance gives with zero terminal SNR.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _per_image(value: jax.Array | float) -> jax.Array:
    """A scalar or ``(B,)`` setting as float32 ``(B or 1, 1, 1, 1)``."""
    return jnp.reshape(jnp.asarray(value, jnp.float32), (-1, 1, 1, 1))


def rescale_guidance(
    guided_bhwc: jax.Array, conditioned_bhwc: jax.Array, guidance_rescale: jax.Array | float
) -> jax.Array:
    """Lin et al. 2024, section 3.4 (diffusers' ``rescale_noise_cfg``): ``phi * x * std(c) / std(x) + (1 - phi) * x``
    for the guided output ``x`` and the conditioned branch's output ``c``, the standard deviations taken per image
    over all of its ``(H, W, C)`` values.

    Args:
      guided_bhwc: ``(B, H, W, C)`` guided model output (epsilon or v).
      conditioned_bhwc: ``(B, H, W, C)`` the fully conditioned branch's output.
      guidance_rescale: ``phi`` in [0, 1], scalar or ``(B,)``; 0 returns ``guided_bhwc`` unchanged.

    Returns:
      ``(B, H, W, C)`` float32.
    """
    axes = tuple(range(1, guided_bhwc.ndim))
    std_conditioned = jnp.std(conditioned_bhwc, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided_bhwc, axis=axes, keepdims=True, ddof=1)
    # A constant guided output (std 0, never a real model's) is left as it is, where diffusers' division gives NaN.
    ratio = jnp.where(std_guided > 0, std_conditioned / jnp.where(std_guided > 0, std_guided, 1.0), 1.0)
    phi = _per_image(guidance_rescale)
    return phi * (guided_bhwc * ratio) + (1 - phi) * guided_bhwc


def dual_guidance(
    eps_3bhwc: jax.Array,
    guidance_scale: jax.Array | float,
    image_guidance_scale: jax.Array | float,
    text_mask_bhw1: jax.Array | None = None,
    guidance_rescale: jax.Array | float | None = None,
) -> jax.Array:
    """IP2P's guided output ``e_none + s_I (e_img - e_none) + s_T (e_full - e_img) [* M]``.

    With ``guidance_rescale`` (ours: diffusers' IP2P pipeline has none), the result is then rescaled toward the
    text + image branch by ``rescale_guidance``: ``phi * g * std(e_full) / std(g) + (1 - phi) * g`` for the guided
    ``g`` (FoI's mask included), per image over all of its values. It is the rule diffusers applies to two-branch
    guidance, with the fully conditioned branch as the reference.

    Args:
      eps_3bhwc: ``(3, B, H, W, C)`` predictions (epsilon or v) of the three branches in the order above.
      guidance_scale: ``s_T``, scalar or ``(B,)``.
      image_guidance_scale: ``s_I``, scalar or ``(B,)``.
      text_mask_bhw1: optional ``(B, H, W, 1)`` mask restricting the text term (FoI's decoupled guidance).
      guidance_rescale: optional ``phi`` in [0, 1], scalar or ``(B,)``; ``None`` skips the rescale.

    Returns:
      ``(B, H, W, C)`` float32.
    """
    e_full, e_img, e_none = (e.astype(jnp.float32) for e in eps_3bhwc)
    text_term = _per_image(guidance_scale) * (e_full - e_img)
    if text_mask_bhw1 is not None:
        text_term = text_term * text_mask_bhw1
    guided = e_none + _per_image(image_guidance_scale) * (e_img - e_none) + text_term
    if guidance_rescale is None:
        return guided
    return rescale_guidance(guided, e_full, guidance_rescale)


def classifier_free_guidance(
    eps_2bhwc: jax.Array, guidance_scale: jax.Array | float, guidance_rescale: jax.Array | float | None = None
) -> jax.Array:
    """Classifier-free guidance ``e_none + s (e_text - e_none)`` (Ho & Salimans; diffusers' Stable Diffusion), then
    optionally ``rescale_guidance`` toward ``e_text`` (diffusers' ``guidance_rescale``).

    Args:
      eps_2bhwc: ``(2, B, H, W, C)`` predictions (epsilon or v) of the ``[text, none]`` branches.
      guidance_scale: ``s``, scalar or ``(B,)``.
      guidance_rescale: optional ``phi`` in [0, 1], scalar or ``(B,)``; ``None`` skips the rescale.

    Returns:
      ``(B, H, W, C)`` float32.
    """
    e_text, e_none = (e.astype(jnp.float32) for e in eps_2bhwc)
    guided = e_none + _per_image(guidance_scale) * (e_text - e_none)
    if guidance_rescale is None:
        return guided
    return rescale_guidance(guided, e_text, guidance_rescale)
