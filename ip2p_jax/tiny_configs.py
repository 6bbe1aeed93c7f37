"""The architectures and vocabularies of the library's tiny random models, as diffusers / transformers config
dicts; ``random_models.py`` builds them.

Two stacks, for two purposes:

- ``SMOKE_*``, the training smoke model: the 8-channel InstructPix2Pix model of ``configs/tiny.py``, which trains on
  the synthetic colour-edit stream on a laptop CPU in about a minute (``random_models.smoke_models``; the tests of
  training and ``benchmarks/train.py``'s ``tiny``).
- ``STAND_IN_*``, the generation / evaluation stand-in: a Stable Diffusion (4 input channels) or InstructPix2Pix (8)
  stack and a CLIP that stand in for real checkpoints in the ``tiny`` variants of ``configs/generate_data.py`` and
  ``configs/evaluate_clip.py`` (``random_models.tiny_text_to_image``, ``random_models.tiny_clip``;
  ``benchmarks/generate_data.py`` and ``benchmarks/unet.py``'s ``tiny``).

Plain data, with no JAX import: the benchmarks' PyTorch workers read them and report their own peak memory.
"""

from __future__ import annotations

# ---- the training smoke model (configs/tiny.py)

# The synthetic stream's words.
SMOKE_WORDS = ("make", "it", "red", "blue", "green")
SMOKE_UNET = dict(
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
SMOKE_VAE = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)
SMOKE_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)

# ---- the generation / evaluation stand-in (the tiny variants of configs/generate_data.py, configs/evaluate_clip.py)

# The words of examples/triples_tiny.jsonl (any other text still encodes, one token per character).
STAND_IN_WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "an",
    "cat",
    "dog",
    "on",
    "sofa",
    "bench",
    "red",
    "blue",
    "car",
    "house",
    "in",
    "snow",
    "make",
    "it",
    "turn",
    "into",
    "add",
    "hat",
    "with",
    "painting",
    "sunset",
    "at",
)
# No ``in_channels``: its builder sets 4 (Stable Diffusion) or 8 (InstructPix2Pix); diffusers' default is 4.
STAND_IN_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
STAND_IN_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)
STAND_IN_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
STAND_IN_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
