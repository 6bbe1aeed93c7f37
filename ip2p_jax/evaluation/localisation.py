"""Word localisation: does a word's cross-attention map land on the thing it names? The question behind FoI's masks.

A scene's clean latent is noised to timestep ``t``, the UNet runs once on a prompt (a caption for a text-to-image
model, an instruction with the input picture's latent for InstructPix2Pix), and the cross-attention probabilities
of every layer of one size are averaged over heads and layers, as FoI's mask step averages them (paper 4.1). Each
word's map then goes through FoI's own mask extraction (``foi.extract_masks``: Gaussian filter, ``gamma`` rounds of
square + min-max, threshold ``tau``) and the mask is compared with the word's exact region at the map's size
(``shapes_edit.mask_iou``: a cell is inside when at least half of its pixels are). A second, threshold-free figure
is the map's mean inside the region over its mean everywhere (1: no preference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax import foi
from ip2p_jax.evaluation.shapes_edit import mask_iou
from ip2p_jax.models.attention import RecordCrossAttention, mean_of_layers


def noised_maps(
    unet_apply: Callable,
    unet_params: Any,
    latents_bhwc: jax.Array,
    noise_bhwc: jax.Array,
    timestep: int,
    alpha_cumprod: float,
    context_btd: jax.Array,
    size: tuple[int, int],
    image_latents_bhwc: jax.Array | None = None,
) -> jax.Array:
    """Head- and layer-averaged cross-attention maps of the UNet at ``timestep``: ``(B, h, w, T)`` float32.

    Args:
      unet_apply: ``(params, sample, timesteps, context, control) -> (eps, aux)``.
      latents_bhwc: clean latents, scaled (``scaling_factor * E(x)``).
      noise_bhwc: the noise added, ``N(0, 1)``.
      alpha_cumprod: ``alpha_bar`` of ``timestep``.
      size: the ``(h, w)`` of the layers averaged.
      image_latents_bhwc: InstructPix2Pix's conditioning channels (unscaled ``E(image).mode()``), or ``None`` for
        a text-to-image UNet.
    """
    noisy = jnp.sqrt(alpha_cumprod) * latents_bhwc + jnp.sqrt(1.0 - alpha_cumprod) * noise_bhwc
    if image_latents_bhwc is not None:
        noisy = jnp.concatenate([noisy, image_latents_bhwc], axis=-1)
    timesteps = jnp.full((noisy.shape[0],), timestep, jnp.int32)
    _, aux = unet_apply(unet_params, noisy, timesteps, context_btd, RecordCrossAttention(sizes=(tuple(size),)))
    if not aux:
        raise ValueError(f"the UNet has no cross-attention layer of size {tuple(size)}")
    return mean_of_layers(aux)


def localisation(
    maps_bhwt: np.ndarray,
    token_weights_bgt: np.ndarray,
    regions_bghw: np.ndarray,
    valid_bg: np.ndarray,
    *,
    gamma: int = 3,
    tau: float = 0.5,
    filter_size: int = 3,
    filter_sigma: float = 0.5,
) -> dict[str, np.ndarray]:
    """Per word: FoI's mask against the word's region, and the map's concentration.

    Args:
      maps_bhwt: ``noised_maps``' output.
      token_weights_bgt: ``(B, G, T)`` each word's tokens' weights (as FoI's keyword weights).
      regions_bghw: ``(B, G, H, W)`` bool, each word's region in pixels (``H``, ``W`` multiples of the maps').
      valid_bg: ``(B, G)`` bool, which words to measure.

    Returns:
      ``{"iou": (B, G), "inside_over_mean": (B, G), "masks": (B, G, h, w)}``; NaN where not valid.
    """
    batch = maps_bhwt.shape[0]
    masks = np.asarray(
        foi.extract_masks(
            jnp.asarray(maps_bhwt),
            jnp.asarray(token_weights_bgt),
            jnp.asarray(valid_bg),
            jnp.full((batch,), tau, jnp.float32),
            gamma,
            filter_size,
            filter_sigma,
        )
    )
    word_maps = np.einsum("bhwt,bgt->bghw", np.asarray(maps_bhwt, np.float64), token_weights_bgt)
    iou = np.full(valid_bg.shape, np.nan)
    ratio = np.full(valid_bg.shape, np.nan)
    size = maps_bhwt.shape[1:3]
    height, width = regions_bghw.shape[2:]
    for b, g in zip(*np.nonzero(valid_bg), strict=True):
        iou[b, g] = mask_iou(masks[b, g], regions_bghw[b, g])
        cells = regions_bghw[b, g].reshape(size[0], height // size[0], size[1], width // size[1]).mean(axis=(1, 3))
        inside = (word_maps[b, g] * cells).sum() / max(cells.sum(), 1e-12)
        ratio[b, g] = inside / max(word_maps[b, g].mean(), 1e-12)
    return {"iou": iou, "inside_over_mean": ratio, "masks": masks}
