"""Pictures in and out of the models, as diffusers' ``VaeImageProcessor`` does it: PIL images or ``uint8`` arrays
to NHWC float32 in [-1, 1] (``preprocess``), decoder output back to [0, 1] (``postprocess``) and PIL (``to_pil``)."""

from __future__ import annotations

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """A PIL image or an ``(H, W)`` / ``(H, W, 1|3|4)`` uint8 array -> ``(H, W, 3)`` uint8 RGB."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W, 3), got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    return np.asarray(Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB"))


def preprocess(image: ImageLike, multiple: int) -> np.ndarray:
    """As diffusers' ``VaeImageProcessor``: RGB, each side floored to a multiple of ``multiple`` (a Lanczos resize
    when that changes it), scaled to [-1, 1]. Returns ``(H, W, 3)`` float32."""
    rgb = to_rgb_array(image)
    height, width = (rgb.shape[0] // multiple) * multiple, (rgb.shape[1] // multiple) * multiple
    if height == 0 or width == 0:
        raise ValueError(f"image of {rgb.shape[1]}x{rgb.shape[0]} px is smaller than {multiple} px")
    if (height, width) != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.LANCZOS))
    return rgb.astype(np.float32) / 127.5 - 1.0


def postprocess(images_bhwc: np.ndarray) -> np.ndarray:
    """Decoder output about [-1, 1] -> float32 [0, 1]."""
    return np.clip(np.asarray(images_bhwc, np.float32) / 2 + 0.5, 0.0, 1.0)


def to_pil(image_hwc: np.ndarray) -> Image.Image:
    """float [0, 1] ``(H, W, 3)`` -> PIL, rounded as diffusers' ``numpy_to_pil``."""
    return Image.fromarray((image_hwc * 255).round().astype(np.uint8))
