"""A tiny random InstructPix2Pix model for smoke runs and tests (``configs/tiny.py``)."""

from __future__ import annotations

from pathlib import Path

TINY_WORDS = ("make", "it", "red", "blue", "green")
TINY_UNET = dict(
    in_channels=8,
    out_channels=4,
    block_out_channels=[16, 32],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def tiny_models(workdir: Path, seed: int, in_channels: int = 8):
    """A random tiny IP2P model (UNet, 2x VAE, 1-layer CLIP) and a tokenizer over the synthetic stream's words,
    written to ``workdir / "tokenizer"``; the same weights ``write_new_model`` writes for this seed. Returns
    ``(unet, params, vae, params, text_encoder, params, tokenizer)``."""
    import jax
    from transformers import CLIPTokenizer

    from ip2p_jax.random_models import random_text_encoder, random_unet, random_vae
    from ip2p_jax.tokenizer import write_clip_vocab

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_vocab(Path(workdir) / "tokenizer", TINY_WORDS))
    unet_key, vae_key, text_key = jax.random.split(jax.random.key(seed), 3)
    unet, unet_params = random_unet(dict(TINY_UNET, in_channels=in_channels), unet_key)
    vae, vae_params = random_vae(TINY_VAE, vae_key)
    text, text_params = random_text_encoder(TINY_TEXT, tokenizer, text_key)
    return unet, unet_params, vae, vae_params, text, text_params, tokenizer
