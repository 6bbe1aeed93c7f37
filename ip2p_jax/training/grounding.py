"""A token-grounding objective on cross-attention maps, in the spirit of TokenCompose (Wang et al., CVPR 2024).

FoI reads its masks from the keyword's cross-attention map, so a model whose words land on the things they name
gives FoI masks that find the target. Stable Diffusion learned that from billions of captions; the miniature
lineage (docs/shapes.md) teaches it directly in text-to-image pretraining (never in the InstructPix2Pix stage).

For a grounded word ``g`` of an example (its tokens' weights ``w_g``, its region ``R_g``) and a recorded
cross-attention layer (head-averaged probabilities ``A`` of shape ``(h, w, T)``), the word's map is
``a_g = sum_t w_gt A[:, :, t]`` and the region at the layer's size is ``r_g`` (the share of each cell's pixels
inside ``R_g``). Two terms, each averaged over the valid words and the recorded layers:

* **token** (TokenCompose's ``L_token``): ``(1 - sum(a_g * r_g) / sum(a_g)) ** 2``, the word's attention mass
  outside its region. It concentrates the map but leaves it peaked.
* **pixel** (TokenCompose's ``L_pixel``): the binary cross-entropy of ``a_g`` against ``r_g`` at every cell: the
  cells of the region attend to the word (probability towards 1), the others do not (towards 0). It makes the
  map flat over the region, which is what a thresholded mask needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-6


def region_shares(masks_bghw: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Pixel masks ``(B, G, H, W)`` -> the share of each cell's pixels inside, ``(B, G, h, w)`` float32 (``H``, ``W``
    multiples of ``size``)."""
    batch, groups, height, width = masks_bghw.shape
    rows, cols = size
    if height % rows or width % cols:
        raise ValueError(f"{height}x{width} masks do not divide into {rows}x{cols} cells")
    cells = masks_bghw.astype(jnp.float32).reshape(batch, groups, rows, height // rows, cols, width // cols)
    return cells.mean(axis=(3, 5))


def word_maps(maps_bhwt: jax.Array, token_weights_bgt: jax.Array) -> jax.Array:
    """``(B, h, w, T)`` probabilities and ``(B, G, T)`` token weights -> ``(B, G, h, w)`` word maps."""
    return jnp.einsum("bhwt,bgt->bghw", maps_bhwt, token_weights_bgt)


def grounding_losses(
    maps_by_layer: dict[str, jax.Array],
    token_weights_bgt: jax.Array,
    masks_bghw: jax.Array,
    valid_bg: jax.Array,
) -> dict[str, jax.Array]:
    """The token and pixel terms over recorded layers.

    Args:
      maps_by_layer: ``{layer name: (B, h, w, T)}`` head-averaged cross-attention probabilities (what
        ``RecordCrossAttention`` returns).
      token_weights_bgt: ``(B, G, T)``; row ``g`` weights the tokens of grounded word ``g`` (summing to 1).
      masks_bghw: ``(B, G, H, W)`` each word's region in pixels.
      valid_bg: ``(B, G)`` bool, which words count (padding, dropped captions and empty regions do not).

    Returns:
      ``{"token": scalar, "pixel": scalar}`` float32; 0 when no word is valid.
    """
    valid = valid_bg.astype(jnp.float32)
    count = jnp.maximum(valid.sum(), 1.0)
    token, pixel = [], []
    for maps in maps_by_layer.values():
        a = word_maps(maps.astype(jnp.float32), token_weights_bgt)
        r = region_shares(masks_bghw, maps.shape[1:3])
        inside = (a * r).sum(axis=(2, 3)) / jnp.maximum(a.sum(axis=(2, 3)), EPS)
        token.append(((1.0 - inside) ** 2 * valid).sum() / count)
        p = jnp.clip(a, EPS, 1.0 - EPS)
        bce = -(r * jnp.log(p) + (1.0 - r) * jnp.log(1.0 - p)).mean(axis=(2, 3))
        pixel.append((bce * valid).sum() / count)
    return {"token": jnp.mean(jnp.stack(token)), "pixel": jnp.mean(jnp.stack(pixel))}
