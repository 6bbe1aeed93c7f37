"""Images -> CLIP pixel values, NHWC float32.

Two ways, for two references:

- ``preprocess``: as transformers' ``CLIPImageProcessor`` with its PIL backend (``CLIPImageProcessorPil``, what
  ``CLIPImageProcessor`` falls back to without torchvision, and what transformers v4 and OpenAI's ``clip`` package
  do): RGB, shortest side resized with PIL's bicubic filter on uint8, centre crop, ``/ 255``, CLIP's mean and std.
  This is what PickScore's model card and most CLIP-score code feed the model. With torchvision installed,
  transformers v5's default ``CLIPImageProcessor`` resizes float tensors with torchvision instead, which differs
  from PIL by a few levels of 255 at edges.
- ``ip2p_pixel_values``: as the InstructPix2Pix reference's ``ClipSimilarity.encode_image`` (the filter of its data
  generation and the metric of its paper): float images in [0, 1], squashed to ``size x size`` (no crop) with
  PyTorch's bicubic interpolation (``align_corners=False``, no antialiasing), CLIP's mean and std. Pure JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# preprocessor_config.json keys that name classes or are settled by the input type, not the pixels.
_IGNORED_SETTINGS = ("image_processor_type", "feature_extractor_type", "processor_class", "do_convert_rgb")


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessorConfig:
    """The settings of a transformers ``preprocessor_config.json`` for CLIP; the defaults are CLIP's own.

    Attributes:
      size: an int resizes the shortest side to it (aspect ratio kept); ``(height, width)`` resizes to exactly that.
      resample: the PIL filter code (3 is bicubic).
      crop_size: ``(height, width)`` of the centre crop.
      rescale_factor: multiplies the uint8 values (1 / 255).
      image_mean, image_std: per channel, applied after rescaling.
    """

    do_resize: bool = True
    size: int | tuple[int, int] = 224
    resample: int = Image.Resampling.BICUBIC.value
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPImageProcessorConfig:
        """Validates a ``preprocessor_config.json`` dict; unknown settings raise ``ValueError``.

        ``size`` may be an int (old files: the shortest side), ``{"shortest_edge": n}`` or ``{"height", "width"}``;
        ``crop_size`` an int (a square) or ``{"height", "width"}``, as transformers reads them.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in fields | set(_IGNORED_SETTINGS))
        if unknown:
            raise ValueError(f"image processor config: unknown settings {unknown}")
        kwargs = {k: v for k, v in config.items() if k in fields}
        if "size" in kwargs:
            kwargs["size"] = _parse_size(kwargs["size"], "size", int_is_square=False)
        if "crop_size" in kwargs:
            kwargs["crop_size"] = _parse_size(kwargs["crop_size"], "crop_size", int_is_square=True)
        for name in ("image_mean", "image_std"):
            if name in kwargs:
                value = kwargs[name]
                kwargs[name] = tuple(float(v) for v in (value if isinstance(value, Sequence) else [value] * 3))
                if len(kwargs[name]) != 3:
                    raise ValueError(f"image processor config: {name} has {len(kwargs[name])} values, not 3")
        try:
            Image.Resampling(kwargs.get("resample", cls.resample))
        except ValueError as error:
            raise ValueError(f"image processor config: resample={kwargs['resample']!r} is no PIL filter") from error
        return cls(**kwargs)


def _parse_size(value: Any, name: str, int_is_square: bool) -> int | tuple[int, int]:
    if isinstance(value, int):
        return (value, value) if int_is_square else value
    if isinstance(value, Mapping) and set(value) == {"shortest_edge"} and not int_is_square:
        return int(value["shortest_edge"])
    if isinstance(value, Mapping) and set(value) == {"height", "width"}:
        return int(value["height"]), int(value["width"])
    raise ValueError(f"image processor config: {name}={value!r} is not supported")


ImageLike = Image.Image | np.ndarray


def _to_rgb(image: ImageLike) -> Image.Image:
    """As transformers' ``convert_to_rgb``: transparency is composited onto white."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise TypeError(f"image arrays must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """The long side scales with the short one and is truncated, not rounded (transformers, after torchvision)."""
    short, long = min(height, width), max(height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


def preprocess_one(image: ImageLike, config: CLIPImageProcessorConfig = CLIPImageProcessorConfig()) -> np.ndarray:
    """One image (PIL, or uint8 ``(H, W, 3)``) -> float32 ``(crop_h, crop_w, 3)`` pixel values."""
    pil = _to_rgb(image)
    if config.do_resize:
        shape = config.size if isinstance(config.size, tuple) else _resized_shape(pil.height, pil.width, config.size)
        pil = pil.resize((shape[1], shape[0]), resample=Image.Resampling(config.resample))
    pixels = np.asarray(pil)
    if config.do_center_crop:
        height, width = pixels.shape[:2]
        crop_h, crop_w = config.crop_size
        if crop_h > height or crop_w > width:
            # transformers pads with black here; that only happens with a crop larger than the resize.
            raise ValueError(f"cannot crop {crop_h}x{crop_w} out of a {height}x{width} image")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        pixels = pixels[top : top + crop_h, left : left + crop_w]
    if config.do_rescale:
        # Float64 product, then float32: the same rounding as transformers' ``rescale``.
        values = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        values = pixels.astype(np.float32)
    if config.do_normalize:
        values = (values - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    return values


def preprocess(
    images: ImageLike | Sequence[ImageLike], config: CLIPImageProcessorConfig = CLIPImageProcessorConfig()
) -> np.ndarray:
    """Images -> CLIP pixel values ``(B, crop_h, crop_w, 3)`` float32, equal to ``CLIPImageProcessorPil``'s (NHWC).

    Args:
      images: a PIL image, a uint8 ``(H, W, 3)`` array, a uint8 ``(B, H, W, 3)`` batch, or a sequence of images
        (sizes may differ).
      config: the processor's settings (``load_clip_preprocessor`` reads a checkpoint's).
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, Image.Image | np.ndarray):
        images = [images]
    if not images:
        raise ValueError("no images to preprocess")
    return np.stack([preprocess_one(image, config) for image in images])


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
