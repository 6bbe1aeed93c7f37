"""A tiny random InstructPix2Pix model for smoke runs and tests (``configs/tiny.py``)."""

from __future__ import annotations

from pathlib import Path

TINY_WORDS = ("make", "it", "red", "blue", "green")


def tiny_models(workdir: Path, seed: int, in_channels: int = 8):
    """A random tiny IP2P model (UNet, 2x VAE, 1-layer CLIP) and a tokenizer over the synthetic stream's words,
    written to ``workdir / "tokenizer"``. Returns ``(unet, params, vae, params, text_encoder, params, tokenizer)``."""
    import jax
    import jax.numpy as jnp
    from transformers import CLIPTokenizer

    from ip2p_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
    from ip2p_jax.models.vae import AutoencoderKL, VAEConfig
    from ip2p_jax.vocabulary import write_clip_vocab

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_vocab(workdir / "tokenizer", TINY_WORDS))
    unet = UNet2DConditionModel(
        UNetConfig.from_diffusers(
            dict(
                in_channels=in_channels,
                out_channels=4,
                block_out_channels=[16, 32],
                layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=16,
                attention_head_dim=2,
                norm_num_groups=8,
            )
        )
    )
    vae = AutoencoderKL(
        VAEConfig.from_diffusers(
            dict(
                block_out_channels=[8, 16],
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2,
                layers_per_block=1,
                norm_num_groups=4,
                latent_channels=4,
            )
        )
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    keys = jax.random.split(jax.random.key(seed), 3)
    unet_params = unet.init(keys[0], jnp.zeros((1, 8, 8, in_channels)), jnp.zeros((1,)), jnp.zeros((1, 77, 16)))[
        "params"
    ]
    vae_params = vae.init(keys[1], jnp.zeros((1, 8, 8, 3)))["params"]
    text_params = text.init(keys[2], jnp.zeros((1, 77), jnp.int32))["params"]
    return unet, unet_params, vae, vae_params, text, text_params, tokenizer
