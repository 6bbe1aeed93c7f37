"""Random models built in code: any architecture from its diffusers / transformers config (what training from
scratch starts from, ``training/new_model.py``), and the library's tiny stacks, whose configs are
``tiny_configs.py``'s: the training smoke model of ``configs/tiny.py`` (``smoke_models``), and the stand-in of the
``tiny`` variants of ``configs/generate_data.py`` and ``configs/evaluate_clip.py``, a Stable Diffusion (4 input
channels) or InstructPix2Pix (8) text-to-image stack and a CLIP (``tiny_text_to_image``, ``tiny_clip``), all Flax
with random weights, over small CLIP vocabularies. They run the real code paths on a laptop CPU in seconds; their
pictures mean nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ip2p_jax.models.clip import CLIPConfig, CLIPModel, CLIPVisionConfig
from ip2p_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ip2p_jax.models.stack import ModelStack
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
from ip2p_jax.models.vae import AutoencoderKL, VAEConfig
from ip2p_jax.schedulers import Scheduler, SchedulerConfig
from ip2p_jax.tiny_configs import (
    SMOKE_TEXT,
    SMOKE_UNET,
    SMOKE_VAE,
    SMOKE_WORDS,
    STAND_IN_TEXT,
    STAND_IN_UNET,
    STAND_IN_VAE,
    STAND_IN_VISION,
    STAND_IN_WORDS,
)

# Stable Diffusion's noise schedule, with the released checkpoints' Euler ancestral settings.
SD_SCHEDULER = SchedulerConfig(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="linspace"
)


def text_encoder_config(config: Mapping[str, Any], tokenizer) -> dict[str, Any]:
    """A transformers ``CLIPTextModel`` config: ``config``'s sizes with the tokenizer's vocabulary and ids."""
    return {
        "hidden_act": "quick_gelu",
        "max_position_embeddings": tokenizer.model_max_length,
        **dict(config),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def random_unet(config: Mapping[str, Any], key: jax.Array, dtype: Any = jnp.float32):
    """``(module, params)`` of a UNet with this diffusers config, randomly initialised (float32 params)."""
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(dict(config)), dtype=dtype)
    cfg = unet.config
    x = jnp.zeros((1, 8, 8, cfg.in_channels))
    context = jnp.zeros((1, 77, cfg.cross_attention_dim[0]))  # per block in the config, one text width
    # Jitted: eager initialisation would run the UNet op by op and hold its intermediates.
    return unet, jax.jit(unet.init)(key, x, jnp.zeros((1,)), context)["params"]


def random_vae(config: Mapping[str, Any], key: jax.Array, dtype: Any = jnp.float32):
    """``(module, params)`` of an ``AutoencoderKL`` with this diffusers config, randomly initialised."""
    vae = AutoencoderKL(VAEConfig.from_diffusers(dict(config)), dtype=dtype)
    return vae, vae.init(key, jnp.zeros((1, 8, 8, vae.config.in_channels)))["params"]


def random_text_encoder(config: Mapping[str, Any], tokenizer, key: jax.Array, dtype: Any = jnp.float32):
    """``(module, params)`` of a CLIP text encoder (transformers config dict, vocabulary from ``tokenizer``)."""
    text = CLIPTextModel(CLIPTextConfig.from_transformers(text_encoder_config(config, tokenizer)), dtype=dtype)
    return text, text.init(key, jnp.zeros((1, 77), jnp.int32))["params"]


def tiny_tokenizer(folder: Path, words: Sequence[str] = STAND_IN_WORDS):
    """A CLIP tokenizer over ``words`` (the stand-in's by default), its files written to ``folder``."""
    from transformers import CLIPTokenizer

    from ip2p_jax.tokenizer import write_clip_vocab

    return CLIPTokenizer.from_pretrained(str(write_clip_vocab(Path(folder), words)))


def smoke_models(workdir: Path, seed: int, in_channels: int = 8):
    """The training smoke model (``configs/tiny.py``): a random tiny IP2P model (UNet, 2x VAE, 1-layer CLIP) and a
    tokenizer over the synthetic stream's words, written to ``workdir / "tokenizer"``; the same weights
    ``write_new_model`` writes for this seed. Returns ``(unet, params, vae, params, text_encoder, params,
    tokenizer)``."""
    tokenizer = tiny_tokenizer(Path(workdir) / "tokenizer", SMOKE_WORDS)
    unet_key, vae_key, text_key = jax.random.split(jax.random.key(seed), 3)
    unet, unet_params = random_unet(dict(SMOKE_UNET, in_channels=in_channels), unet_key)
    vae, vae_params = random_vae(SMOKE_VAE, vae_key)
    text, text_params = random_text_encoder(SMOKE_TEXT, tokenizer, text_key)
    return unet, unet_params, vae, vae_params, text, text_params, tokenizer


def tiny_text_to_image(folder: Path, seed: int, in_channels: int = 4, dtype: Any = jnp.float32) -> ModelStack:
    """The stand-in: a random tiny SD (``in_channels=4``) or IP2P (8) stack; the vocabulary is written to
    ``folder``.

    The VAE halves the image size (latents of 16 x 16 for 32 px images).
    """
    tokenizer = tiny_tokenizer(folder)
    unet_key, vae_key, text_key = jax.random.split(jax.random.key(seed), 3)
    unet, unet_params = random_unet(dict(STAND_IN_UNET, in_channels=in_channels), unet_key, dtype)
    vae, vae_params = random_vae(STAND_IN_VAE, vae_key, dtype)
    text_encoder, text_params = random_text_encoder(STAND_IN_TEXT, tokenizer, text_key, dtype)
    params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}
    return ModelStack(unet, vae, text_encoder, tokenizer, Scheduler("euler_ancestral", SD_SCHEDULER), params)


def tiny_clip(folder: Path, seed: int, image_size: int = 32) -> tuple[CLIPModel, dict, Any]:
    """The stand-in's CLIP: a random tiny CLIP taking ``image_size`` px images: ``(module, params, tokenizer)``."""
    tokenizer = tiny_tokenizer(folder)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id, **STAND_IN_TEXT
    )
    config = CLIPConfig(text=text, vision=CLIPVisionConfig(image_size=image_size, **STAND_IN_VISION), projection_dim=16)
    module = CLIPModel(config)
    pixels = jnp.zeros((1, image_size, image_size, 3))
    params = module.init(jax.random.key(seed), pixels, jnp.zeros((1, 77), jnp.int32))["params"]
    return module, params, tokenizer
