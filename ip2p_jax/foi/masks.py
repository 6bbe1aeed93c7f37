"""Paper 4.1: masks from IP2P's own cross-attention, ``M_i = 1(sharpen(gauss(A[e_i]), gamma) >= tau)``; the
union mask of 4.3, and masks resized to every layer's and the latent's resolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.models.unet import level_size


def mask_size(latent_size: tuple[int, int], mask_downsample: int) -> tuple[int, int]:
    """The FoI mask resolution: the size of the UNet's layers at level ``log2(mask_downsample)``
    (``mask_downsample`` a power of two)."""
    if mask_downsample < 1 or mask_downsample & (mask_downsample - 1):
        raise ValueError(f"mask_downsample must be a power of two >= 1, got {mask_downsample!r}")
    return level_size(latent_size, mask_downsample.bit_length() - 1)


def gaussian_filter(maps_bhw: jax.Array, size: int = 3, sigma: float = 0.5) -> jax.Array:
    """Normalised ``size x size`` Gaussian blur of each ``(H, W)`` map, reflect-padded (paper 4.1: "each patch a
    linear combination of its neighbours", as Attend-and-Excite's smoothing, which the paper cites)."""
    offsets = np.arange(size) - (size - 1) / 2
    kernel_1d = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = np.outer(kernel_1d, kernel_1d)
    kernel = jnp.asarray(kernel / kernel.sum(), jnp.float32)
    pad = size // 2
    padded = jnp.pad(maps_bhw, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    height, width = maps_bhw.shape[1:]
    out = jnp.zeros_like(maps_bhw)
    for i in range(size):
        for j in range(size):
            out = out + kernel[i, j] * padded[:, i : i + height, j : j + width]
    return out


def min_max(maps_bhw: jax.Array) -> jax.Array:
    """Scales each map to [0, 1]; a constant map becomes all zeros (it has no region to prefer)."""
    low = maps_bhw.min(axis=(1, 2), keepdims=True)
    high = maps_bhw.max(axis=(1, 2), keepdims=True)
    return (maps_bhw - low) / jnp.maximum(high - low, 1e-12) * (high > low)


def sharpen(maps_bhw: jax.Array, gamma: int) -> jax.Array:
    """Paper 4.1: ``gamma`` times ``A = minmax(A ** 2)``, raising the contrast of the target region."""
    for _ in range(gamma):
        maps_bhw = min_max(maps_bhw**2)
    return maps_bhw


def keyword_maps(maps_bhwt: jax.Array, keyword_weights_bkt: jax.Array) -> jax.Array:
    """Each sub-instruction's keyword map ``A[e_i]``: ``(B, h, w, T)``, ``(B, K, T)`` -> ``(B, K, h, w)``
    (multi-token keywords averaged)."""
    return jnp.einsum("bhwt,bkt->bkhw", maps_bhwt, keyword_weights_bkt)


def branch_keyword_maps(maps_kbhwt: jax.Array, keyword_weights_bkt: jax.Array) -> jax.Array:
    """The per-instruction mode's keyword maps: sub-instruction ``i``'s keyword read in its own text branch's maps.
    ``(K, B, h, w, T)`` (branch first), ``(B, K, T)`` -> ``(B, K, h, w)``."""
    return jnp.einsum("kbhwt,bkt->bkhw", maps_kbhwt, keyword_weights_bkt)


def noise_difference_maps(outputs_nbhwc: jax.Array, slots: int, per_instruction: bool, size) -> jax.Array:
    """DiffEdit-style maps (Couairon et al. 2023, the paper's baseline): where the instruction changes the
    prediction, ``|e(I, T) - e(I, 0)|`` averaged over channels and brought to the mask resolution ``size`` by area
    averaging. ``outputs_nbhwc``: the guidance branches' ``(n, B, h, w, c)``, the image-only branch second to last;
    per instruction, slot ``k``'s map from branch ``k``, else the composite branch's map for every slot.
    Returns ``(B, K, *size)`` float32."""
    outputs = outputs_nbhwc.astype(jnp.float32)
    text = outputs[:slots] if per_instruction else outputs[:1]
    maps = jnp.abs(text - outputs[-2][None]).mean(axis=-1)  # (K or 1, B, h, w)
    rows, cols = (_area_matrix(maps.shape[axis], size[i]) for i, axis in enumerate((2, 3)))
    maps = jnp.einsum("yi,kbij,xj->bkyx", rows, maps, cols)
    return jnp.broadcast_to(maps, (maps.shape[0], slots, *size))


def _area_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)``: output cell ``j`` averages the input cells under ``[j, j + 1) * size_in / size_out``,
    each weighted by the length it overlaps (area averaging, for any ratio)."""
    edges = np.arange(size_out + 1) * size_in / size_out
    i = np.arange(size_in)
    overlap = np.clip(np.minimum(edges[1:, None], i + 1) - np.maximum(edges[:-1, None], i), 0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def extract_masks(
    maps_bhwt: jax.Array,
    keyword_weights_bkt: jax.Array,
    valid_bk: jax.Array,
    tau_b: jax.Array,
    gamma: int = 3,
    filter_size: int = 3,
    filter_sigma: float = 0.5,
) -> jax.Array:
    """Paper 4.1, end to end: ``M_i = 1(sharpen(gauss(A[e_i]), gamma) >= tau)``.

    Args:
      maps_bhwt: head- and layer-averaged cross-attention probabilities of the text+image branch at the mask
        resolution, ``(B, h, w, T)``.
      keyword_weights_bkt: ``(B, K, T)`` from ``instruction_tokens``.
      valid_bk: ``(B, K)`` bool; padded slots get empty masks.
      tau_b: ``(B,)`` thresholds.

    Returns:
      ``(B, K, h, w)`` float32 masks of 0 and 1.
    """
    maps = keyword_maps(maps_bhwt.astype(jnp.float32), keyword_weights_bkt)
    return masks_from_keyword_maps(maps, valid_bk, tau_b, gamma, filter_size, filter_sigma)


def masks_from_keyword_maps(
    maps_bkhw: jax.Array,
    valid_bk: jax.Array,
    tau_b: jax.Array,
    gamma: int = 3,
    filter_size: int = 3,
    filter_sigma: float = 0.5,
) -> jax.Array:
    """``extract_masks`` from the keyword maps ``A[e_i]`` ``(B, K, h, w)`` (``keyword_maps``, or each
    sub-instruction's own text branch's in the per-instruction mode): filter, sharpen, threshold; ``(B, K, h, w)``
    float32 masks of 0 and 1, empty in padded slots."""
    batch, slots = maps_bkhw.shape[:2]
    maps = maps_bkhw.astype(jnp.float32)
    flat = maps.reshape(batch * slots, *maps.shape[2:])
    flat = sharpen(gaussian_filter(flat, filter_size, filter_sigma), gamma)
    sharpened = flat.reshape(maps.shape)
    masks = sharpened >= tau_b[:, None, None, None]
    return (masks & valid_bk[:, :, None, None]).astype(jnp.float32)


def draw_tau(key: jax.Array, tau: float | tuple[float, float]) -> jax.Array:
    """The threshold of one image: ``tau`` itself, or uniform in the range ``(low, high)`` (paper 5.1: [0.4, 0.7])."""
    if isinstance(tau, int | float):
        return jnp.float32(tau)
    low, high = tau
    return jax.random.uniform(key, (), jnp.float32, low, high)


def _overlap_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` 0 / 1: output cell ``j`` covers ``[j, j + 1) * size_in / size_out`` of the input, and
    is 1 where that interval overlaps input cell ``i``'s ``[i, i + 1)`` by a positive length (exact integers)."""
    i, j = np.arange(size_in)[None, :], np.arange(size_out)[:, None]
    return ((i * size_out < (j + 1) * size_in) & ((i + 1) * size_out > j * size_in)).astype(np.float32)


def resize_masks(masks_bkhw: jax.Array, size: tuple[int, int]) -> jax.Array:
    """0 / 1 masks ``(B, K, h, w)`` to another resolution ``(B, K, *size)``, keeping them 0 / 1; per axis:

    * shrinking: an output cell is inside when any input cell it overlaps is (max-pooling over the overlap, which
      also serves ratios that are not whole, 19 -> 10): a 2 x 2 blob at 16 x 16 survives in an 8 x 8 layer, where
      bilinear sampling and ``>= 0.5`` would leave 0.25 and erase it;
    * enlarging: bilinear (half-pixel centres, no antialiasing), then ``>= 0.5``.

    Both grids span the same image. Shrinking axes are pooled first; the order does not matter (bilinear's two
    taps have weights summing to 1, so one of them carries at least 0.5).
    """
    height, width = masks_bkhw.shape[2:]
    if (height, width) == tuple(size):
        return masks_bkhw
    if size[0] < height:
        masks_bkhw = jnp.einsum("yi,bkix->bkyx", _overlap_matrix(height, size[0]), masks_bkhw)
    if size[1] < width:
        masks_bkhw = jnp.einsum("xj,bkyj->bkyx", _overlap_matrix(width, size[1]), masks_bkhw)
    if size[0] < height or size[1] < width:
        masks_bkhw = (masks_bkhw > 0).astype(jnp.float32)
    if tuple(masks_bkhw.shape[2:]) == tuple(size):
        return masks_bkhw
    resized = jax.image.resize(masks_bkhw, (*masks_bkhw.shape[:2], *size), method="bilinear", antialias=False)
    return (resized >= 0.5).astype(jnp.float32)


def union_mask(masks_bkhw: jax.Array) -> jax.Array:
    """``M_union = clip(sum_i M_i, 0, 1)`` (paper 4.3): ``(B, K, h, w)`` -> ``(B, h, w)``."""
    return jnp.clip(masks_bkhw.sum(axis=1), 0.0, 1.0)
