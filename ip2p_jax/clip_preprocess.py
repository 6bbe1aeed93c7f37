"""The InstructPix2Pix reference's CLIP image input, in JAX: ``ip2p_pixel_values``.

As the reference's ``ClipSimilarity.encode_image`` (the filter of its data generation and the metric of its paper):
float images in [0, 1], squashed to ``size x size`` (no crop) with PyTorch's bicubic interpolation
(``align_corners=False``, no antialiasing), then CLIP's mean and std. Jittable, so it runs inside the generation
and evaluation steps.

CLIP's standard preprocessing (shortest side resized with PIL's bicubic on uint8, centre crop, a checkpoint's
``preprocessor_config.json``) is transformers' own ``CLIPImageProcessor``: ``weights.load_clip_preprocessor``
returns it. On an image already at the CLIP's size both ways agree (no resize happens in either).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The reference's (and OpenAI CLIP's) normalisation, also written into the preprocessor_config.json of the CLIPs
# trained here (weights/export.py) and used by train.py.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """The 4 taps (at offsets -1, 0, 1, 2) of the Keys cubic kernel at fractions ``t``; PyTorch uses a = -0.75.

    Evaluated in ``t``'s dtype with the outer taps at ``t + 1`` and ``(1 - t) + 1``, as PyTorch does: the outer
    polynomial cancels heavily, and ``2 - t`` rounds differently enough to show at 1e-5.
    """
    a = t.dtype.type(a)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = t.dtype.type(1)
    return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 matrix of ``F.interpolate(mode="bicubic", align_corners=False)`` on one axis.

    Source coordinates are ``(i + 0.5) * in / out - 0.5``, unclamped; taps beyond the border read the edge pixel.
    Coordinates and weights are rounded to float32 as PyTorch's CPU kernel rounds them for float32 images: the
    float32 scale, then one rounding of ``scale * (i + 0.5) - 0.5`` (a fused multiply-add there); rounded twice,
    the coordinates of a 300 px side are off by enough to move the result by 1e-5. Without antialiasing a
    downscale samples only 4 input pixels per output pixel, as the reference does.
    """
    f32 = np.float32
    scale = np.float64(f32(in_size) / f32(out_size))
    source = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(f32)
    start = np.floor(source)
    weights = _cubic_weights(np.clip(source - start, f32(0), f32(1)))
    taps = np.clip(start[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def ip2p_pixel_values(
    images_bhwc: jax.Array,
    size: int = 224,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> jax.Array:
    """The InstructPix2Pix reference's CLIP input: ``(B, H, W, 3)`` float in [0, 1] -> ``(B, size, size, 3)`` float32.

    The whole image is resized to a square (aspect ratio not kept, no crop) with PyTorch's bicubic, then normalised.
    Jittable; the resize is two matrix products with ``torch_bicubic_matrix``.
    """
    _, height, width, _ = images_bhwc.shape
    rows, cols = torch_bicubic_matrix(height, size), torch_bicubic_matrix(width, size)
    highest = jax.lax.Precision.HIGHEST  # TPUs would otherwise multiply float32 in bfloat16 passes
    x = jnp.einsum("oh,bhwc->bowc", rows, images_bhwc.astype(jnp.float32), precision=highest)
    x = jnp.einsum("pw,bowc->bopc", cols, x, precision=highest)
    return (x - jnp.asarray(image_mean, jnp.float32)) / jnp.asarray(image_std, jnp.float32)
