"""What an edit call brings to FoI, checked before anything is encoded or compiled, and what it gets back: the
sub-instructions per image, the settings against the model and the call, given masks, and each image's output
masks. ``InstructPix2PixPipeline.__call__`` runs these; a caller with its own loop can too."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ip2p_jax.foi.config import FoIConfig
from ip2p_jax.foi.instructions import SubInstruction
from ip2p_jax.foi.masks import resize_masks
from ip2p_jax.models.unet import level_size


def instruction_lists(instructions) -> list[list[SubInstruction]]:
    """``instructions`` as one list of ``SubInstruction`` per image (a flat list is one image's)."""

    def one(item) -> SubInstruction:
        if isinstance(item, SubInstruction):
            return item
        if isinstance(item, str):
            return SubInstruction(item)
        return SubInstruction(*item)

    items = list(instructions)
    if items and all(isinstance(x, list) for x in items):
        return [[one(x) for x in subs] for subs in items]
    return [[one(x) for x in items]]


def check_call(
    foi: FoIConfig, settings, unet_config, vae_scale_factor: int, image_sizes: list[tuple[int, int]]
) -> None:
    """FoI settings that depend on the call (``settings``: its ``SamplerSettings``; ``image_sizes``: ``(H, W)`` of each
    size group) or the model (its UNet config and VAE scale factor): the three guidance branches, a mask step among the
    steps run, and a UNet with cross-attention layers at the mask resolution (``mask_downsample``)."""
    if not settings.dual_guidance:
        raise ValueError("FoI needs the three guidance branches (guidance_scale > 1, image_guidance_scale >= 1)")
    if foi.mask_step >= settings.num_steps_run:
        raise ValueError(
            f"mask_step must be below the number of steps run ({settings.num_steps_run}), got {foi.mask_step}"
        )
    levels = unet_config.cross_attention_levels()
    if foi.mask_level not in levels:
        height, width = image_sizes[0]
        latent = (height // vae_scale_factor, width // vae_scale_factor)
        sizes = [level_size(latent, level)[::-1] for level in levels]
        raise ValueError(
            f"mask_downsample {foi.mask_downsample}: the UNet has no cross-attention layer {foi.mask_level} "
            f"levels below the latent; it has them at mask_downsample {', '.join(str(2**x) for x in levels)} "
            f"(layers of {', '.join(f'{w}x{h}' for w, h in sizes)} for a {width}x{height} image)"
        )


def given_masks(masks, image_sizes: list[tuple[int, int]] | None, per_image) -> list[np.ndarray] | None:
    """``masks=`` checked against the call: FoI only, one ``(k, H, W)`` array of 0 / 1 per image (``k`` its number
    of sub-instructions, ``(H, W)`` its size, ``image_sizes``, which the caller need not find without masks); as
    float32 arrays, or ``None`` when none are given."""
    if masks is None:
        return None
    if per_image is None:
        raise ValueError("masks= are FoI's: give them with instructions=")
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        masks = [masks]
    masks = list(masks)
    if len(masks) != len(image_sizes):
        raise ValueError(
            f"masks=: {len(masks)} mask arrays for {len(image_sizes)} images (one (k, H, W) array per image)"
        )
    checked = []
    for index, (given, (height, width), subs) in enumerate(zip(masks, image_sizes, per_image, strict=True)):
        given = np.asarray(given)
        expected = (len(subs), height, width)
        if given.shape != expected:
            raise ValueError(
                f"masks= of image {index}: expected shape {expected} (one mask per sub-instruction at the image's "
                f"size), got {given.shape}"
            )
        if given.dtype != bool and not (np.issubdtype(given.dtype, np.number) and np.isin(given, (0, 1)).all()):
            raise ValueError(f"masks= of image {index}: values must be 0 or 1 (bool, uint8, ...), got {given.dtype}")
        checked.append(given.astype(np.float32))
    return checked


def output_masks(latent_masks_khw: np.ndarray, keyword_maps_khw: np.ndarray, count: int, size: tuple[int, int]) -> dict:
    """One image's ``EditOutput.masks`` entry from its FoI sampler outputs (``K`` slots, of which its ``count``
    sub-instructions fill the first): ``"latent"`` ``(count, h/d, w/d)`` masks, ``"image"`` the same masks resized to
    ``size`` ``(H, W)`` (``foi.resize_masks``), ``"attention"`` ``(count, h/d, w/d)`` keyword maps."""
    full = resize_masks(jnp.asarray(latent_masks_khw[None, :count]), size)[0]
    return {"latent": latent_masks_khw[:count], "image": np.asarray(full), "attention": keyword_maps_khw[:count]}
