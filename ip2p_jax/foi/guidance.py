"""Paper 4.3: decoupled guidance, IP2P's text term restricted to the union of the masks for the first steps:

    eps = e_none + s_I (e_img - e_none) + s_T (e_full - e_img) * M_union

``guidance.dual_guidance`` computes it given the mask (``IP2PStep``'s ``text_mask``); this module says which mask
each step uses.
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
