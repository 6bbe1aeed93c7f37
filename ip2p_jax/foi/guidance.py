"""Paper 4.3: decoupled guidance, IP2P's text term restricted to the union of the masks for the first steps:

    eps = e_none + s_I (e_img - e_none) + s_T (e_full - e_img) * M_union

``guidance.dual_guidance`` computes it given the mask (``IP2PStep``'s ``text_mask``); this module says which mask
each step uses. Below it, our per-instruction extension: one text branch per sub-instruction, each guided inside
its own mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ip2p_jax.foi.masks import resize_masks, union_mask


def decoupled_text_mask(masks_bkhw: jax.Array, latent_size: tuple[int, int], in_window: jax.Array) -> jax.Array:
    """The text term's mask of one step: ``M_union`` at the latent's resolution inside the decoupled window, ones
    (plain IP2P guidance) after it.

    Args:
      masks_bkhw: ``(B, K, h, w)`` sub-instruction masks at the mask resolution.
      latent_size: ``(H, W)`` of the latent.
      in_window: scalar bool, whether this step is in the window (``in_decoupled_window``).

    Returns:
      ``(B, H, W, 1)`` float32.
    """
    union = resize_masks(union_mask(masks_bkhw)[:, None], latent_size)[:, 0, :, :, None]
    return jnp.where(in_window, union, jnp.ones_like(union))


def in_decoupled_window(enabled: bool, fraction: float, run_index: jax.Array, steps_run: int) -> jax.Array:
    """Whether step ``run_index`` (0 = the first step run) uses decoupled guidance: the first ``fraction`` of the
    ``steps_run`` steps (paper: 75 %), when ``enabled``."""
    return enabled & (run_index < fraction * steps_run)


# ---------------------------------------------------------------------------------------------- ours: one branch each
#
# In the per-instruction mode (``FoIConfig.text_branches``; docs/foi.md) each sub-instruction k has a text+image
# branch of its own, encoded alone, and its text term is guided inside its own mask:
#
#     eps = e_none + s_I (e_img - e_none) + sum_k M_k * s_T (e(I, T_k) - e_img)
#
# The decoupled window applies per mask: after it every M_k is 1 and the terms add up, as Composable Diffusion's
# conjunction adds concepts (Liu et al. 2022). With one sub-instruction this is the composite mode's formula.


def per_instruction_guidance(
    eps_nbhwc: jax.Array,
    guidance_scale: jax.Array | float,
    image_guidance_scale: jax.Array | float,
    text_masks_kbhw1: jax.Array,
) -> jax.Array:
    """The guided output of ``K`` text branches.

    Args:
      eps_nbhwc: ``(K + 2, B, H, W, C)`` predictions (epsilon or v) of ``[text+image 1..K, image only, none]``.
      guidance_scale: ``s_T``, scalar or ``(B,)``.
      image_guidance_scale: ``s_I``, scalar or ``(B,)``.
      text_masks_kbhw1: ``(K, B, H, W, 1)`` each branch's mask on its text term (``branch_text_masks``; 0 for a
        padded slot).

    Returns:
      ``(B, H, W, C)`` float32; ``guidance.dual_guidance`` with the mask when ``K = 1``, to the bit.
    """
    eps = eps_nbhwc.astype(jnp.float32)
    e_text, e_img, e_none = eps[:-2], eps[-2], eps[-1]
    per_image = lambda value: jnp.reshape(jnp.asarray(value, jnp.float32), (-1, 1, 1, 1))  # noqa: E731
    text_terms = per_image(guidance_scale) * (e_text - e_img) * text_masks_kbhw1
    return e_none + per_image(image_guidance_scale) * (e_img - e_none) + text_terms.sum(axis=0)


def branch_text_masks(
    masks_bkhw: jax.Array, valid_bk: jax.Array, latent_size: tuple[int, int], in_window: jax.Array
) -> jax.Array:
    """Each text branch's mask on its text term in one step: ``M_k`` at the latent's resolution inside the decoupled
    window, 1 after it; 0 for padded slots. ``(B, K, h, w)`` -> ``(K, B, H, W, 1)`` float32."""
    masks = resize_masks(masks_bkhw, latent_size)
    masks = jnp.where(in_window, masks, jnp.ones_like(masks)) * valid_bk[:, :, None, None]
    return jnp.moveaxis(masks, 1, 0)[..., None]
