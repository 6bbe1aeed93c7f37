"""A tiny random InstructPix2Pix model for smoke runs and tests (``configs/tiny.py``)."""

from __future__ import annotations

from pathlib import Path

TINY_WORDS = ("make", "it", "red", "blue", "green")
TINY_UNET = dict(
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
# The noise schedule of Stable Diffusion (and of every tiny model): what train.py trains with.
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


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

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_vocab(Path(workdir) / "tokenizer", TINY_WORDS))
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(dict(TINY_UNET, in_channels=in_channels)))
    vae = AutoencoderKL(VAEConfig.from_diffusers(TINY_VAE))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id, **TINY_TEXT
        )
    )
    keys = jax.random.split(jax.random.key(seed), 3)
    unet_params = unet.init(keys[0], jnp.zeros((1, 8, 8, in_channels)), jnp.zeros((1,)), jnp.zeros((1, 77, 16)))[
        "params"
    ]
    vae_params = vae.init(keys[1], jnp.zeros((1, 8, 8, 3)))["params"]
    text_params = text.init(keys[2], jnp.zeros((1, 77), jnp.int32))["params"]
    return unet, unet_params, vae, vae_params, text, text_params, tokenizer


def write_tiny_model(folder: Path, seed: int, in_channels: int = 8) -> Path:
    """``tiny_models`` saved as a diffusers InstructPix2Pix folder (loadable by our loaders and by diffusers)."""
    from ip2p_jax.weights import export

    folder = Path(folder)
    _, unet_params, _, vae_params, _, text_params, tokenizer = tiny_models(folder, seed, in_channels)
    export.save_unet(folder / "unet", unet_params, dict(TINY_UNET, in_channels=in_channels))
    export.save_vae(folder / "vae", vae_params, TINY_VAE)
    text_config = dict(
        TINY_TEXT,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    export.save_text_encoder(folder / "text_encoder", text_params, text_config)
    export.write_scheduler(folder / "scheduler", export.ip2p_scheduler_config(**SD_BETAS))
    export.write_model_index(folder)
    return folder
