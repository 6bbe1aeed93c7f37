"""A text-to-image or InstructPix2Pix model stack: what ``weights.load_stack`` reads from a diffusers-layout folder
and ``random_models.tiny_text_to_image`` builds in code."""

from __future__ import annotations

import dataclasses
from typing import Any

from ip2p_jax.models.clip_text import CLIPTextModel
from ip2p_jax.models.unet import UNet2DConditionModel
from ip2p_jax.models.vae import AutoencoderKL
from ip2p_jax.schedulers import Scheduler


@dataclasses.dataclass
class ModelStack:
    """A Stable Diffusion (4 input channels) or InstructPix2Pix (8) stack: modules, their float32 params, the
    tokenizer and the scheduler.

    Attributes:
      unet, vae, text_encoder: Flax modules.
      tokenizer: the CLIP tokenizer of the text encoder.
      scheduler: the checkpoint's (or the tiny model's) scheduler; ``None`` when it was not read (training makes
        its own from its objective).
      params: ``{"unet": ..., "vae": ..., "text_encoder": ...}``.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler: Scheduler | None
    params: dict
