"""Initialising the 8-channel InstructPix2Pix UNet from a 4-channel Stable Diffusion UNet."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from ip2p_jax.models.unet import UNet2DConditionModel


def expand_input_channels(
    unet: UNet2DConditionModel, params: Any, in_channels: int = 8
) -> tuple[UNet2DConditionModel, Any]:
    """The UNet with ``in_channels`` inputs: ``conv_in``'s old input channels copied, the new ones zero and its bias
    kept, so that the new UNet ignores the extra (image latent) channels until trained (the IP2P recipe).

    Returns:
      ``(module, params)``; ``params`` shares every other array with the input.
    """
    old = unet.config.in_channels
    if in_channels < old:
        raise ValueError(f"cannot shrink conv_in from {old} to {in_channels} input channels")
    kernel = params["conv_in"]["kernel"]  # (3, 3, C_in, C_out)
    extra = jnp.zeros((*kernel.shape[:2], in_channels - old, kernel.shape[3]), kernel.dtype)
    new_params = dict(params)
    new_params["conv_in"] = {**params["conv_in"], "kernel": jnp.concatenate([kernel, extra], axis=2)}
    config = dataclasses.replace(unet.config, in_channels=in_channels)
    return UNet2DConditionModel(config, dtype=unet.dtype), new_params
