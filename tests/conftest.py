"""Offline fixtures: a tiny CLIP BPE vocabulary and tiny random PyTorch models saved in the diffusers layout.

Every parameter of the reference models, norms and biases included, is perturbed away from its default
initialisation so that a parity test notices a missing bias or a norm applied with the wrong parameters.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ip2p_jax import compilation_cache
from ip2p_jax.tiny_configs import STAND_IN_VAE
from ip2p_jax.tokenizer import write_clip_vocab

# The programs' persistent compilation cache goes to a folder of this test process's own, removed when it ends,
# never the home folder: the many train.py / export.py / sample.py runs of the suite compile the same tiny programs
# (a tiny train.py run: about 100 s cold, 30 s warm here), and no test is timed. Tests of the cache itself name a
# folder of their own.
_CACHE = tempfile.mkdtemp(prefix="ip2p-jax-test-compilation-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ[compilation_cache.ENVIRONMENT] = _CACHE

# Words the tiny vocabulary knows whole (others fall back to single characters).
VOCAB_WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "make",
    "turn",
    "it",
    "into",
    "blue",
    "red",
    "green",
    "sky",
    "circle",
    "square",
    "add",
    "hat",
    "remove",
    "and",
    "with",
)


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves every parameter away from its initial value, so that norms and biases are not 1 and 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


# The released timbrooks/instruct-pix2pix scheduler/scheduler_config.json.
IP2P_SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.12.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "trained_betas": None,
}

TINY_UNETS = {
    # SD 1.x-like: conv projections, one head count for all blocks, 8 input channels (IP2P).
    "sd1": dict(
        in_channels=8,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=16,
    ),
    # SD 2.x-like: linear projections, per-block head counts, upcast attention, 2 transformer layers in a block.
    "sd2": dict(
        in_channels=8,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
        transformer_layers_per_block=(1, 2, 1),
        norm_num_groups=8,
        sample_size=16,
    ),
    # Plain Stable Diffusion: 4 input channels, the other time-embedding convention, no cross-attention at the top.
    "sd_4ch": dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,
        norm_num_groups=8,
        flip_sin_to_cos=False,
        freq_shift=1,
        sample_size=16,
    ),
}

TINY_TEXT_ENCODERS = {
    "sd1": dict(
        hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"
    ),
    "sd2": dict(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
}

# The library's stand-in VAE (two blocks: it downsamples 2x), as a diffusers constructor's keywords.
TINY_VAE = dict(STAND_IN_VAE, in_channels=3, out_channels=3, sample_size=32)


def make_unet(name: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb_(UNet2DConditionModel(**TINY_UNETS[name]), seed)


def make_text_encoder(name: str, vocab_size: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        eos_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
        **TINY_TEXT_ENCODERS[name],
    )
    return perturb_(CLIPTextModel(config), seed)


# Four blocks, as Stable Diffusion's: the VAE downsamples 8x, so images of any multiple of 8 px are edited.
TINY_VAE_8X = dict(
    TINY_VAE,
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


def make_vae(seed: int = 0, config: dict = TINY_VAE):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb_(AutoencoderKL(**config), seed)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_clip_vocab(tmp_path_factory.mktemp("vocab") / "tokenizer", VOCAB_WORDS)


@pytest.fixture(scope="session")
def vocab_size(tokenizer_dir) -> int:
    return len(json.loads((tokenizer_dir / "vocab.json").read_text()))


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory, tokenizer_dir, vocab_size) -> Path:
    """A diffusers-layout folder of a tiny random IP2P model (SD 1.x-like UNet with 8 input channels)."""
    import shutil

    from diffusers import EulerAncestralDiscreteScheduler

    root = tmp_path_factory.mktemp("tiny-ip2p")
    make_unet("sd1").save_pretrained(root / "unet")
    make_vae().save_pretrained(root / "vae")
    make_text_encoder("sd1", vocab_size).save_pretrained(root / "text_encoder")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    EulerAncestralDiscreteScheduler.from_config(IP2P_SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionInstructPix2PixPipeline"}))
    return root


@pytest.fixture(scope="session")
def pipeline_dir_vae8x(tmp_path_factory, pipeline_dir) -> Path:
    """``pipeline_dir``'s model with a VAE that downsamples 8x (``TINY_VAE_8X``), as Stable Diffusion's does."""
    import shutil

    root = tmp_path_factory.mktemp("tiny-ip2p-vae8x")
    shutil.copytree(pipeline_dir, root, dirs_exist_ok=True)
    shutil.rmtree(root / "vae")
    make_vae(config=TINY_VAE_8X).save_pretrained(root / "vae")
    return root


def max_relative_error(ours, reference) -> float:
    """``max |ours - reference| / max |reference|``, the parity figure used throughout."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def bfloat16_against_float32(model, image, instructions, steps: int) -> tuple[float, float, list[float]]:
    """IP2P with the composite prompt and FoI with ``instructions`` in bfloat16 compute and in float32, same seed:
    the mean absolute pixel differences of both edits (levels of 255) and the IoU between the masks per keyword."""
    import jax.numpy as jnp

    from ip2p_jax import foi
    from ip2p_jax.foi import FoIConfig
    from ip2p_jax.pipeline import InstructPix2PixPipeline

    settings = dict(num_inference_steps=steps, output_type="np", progress=False)
    prompt = foi.composite_prompt([foi.SubInstruction(*i) for i in instructions])[0]
    runs = []
    for dtype in (jnp.float32, jnp.bfloat16):
        pipe = InstructPix2PixPipeline.from_pretrained(model, dtype=dtype)
        assert pipe.unet.dtype == dtype and pipe.vae.dtype == jnp.float32  # the autoencoder stays float32
        edited = pipe(image, instructions=instructions, foi=FoIConfig.for_model(model), **settings)
        runs.append((pipe(image, prompt, strength=0.8, **settings).images, edited.images, edited.masks[0]["latent"]))
    (ip2p, foi_edit, masks), (ip2p_bf16, foi_bf16, masks_bf16) = runs
    ious = [float((a & b).sum() / max((a | b).sum(), 1)) for a, b in zip(masks > 0.5, masks_bf16 > 0.5, strict=True)]
    return 255 * float(np.abs(ip2p - ip2p_bf16).mean()), 255 * float(np.abs(foi_edit - foi_bf16).mean()), ious
