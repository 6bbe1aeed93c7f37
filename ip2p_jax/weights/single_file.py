"""Single-file checkpoints in the original (CompVis LDM) layout <-> diffusers-layout state dicts.

The original InstructPix2Pix release (``instruct-pix2pix-00-22000.ckpt``), MagicBrush and the Stable Diffusion 1.x /
2.x ``.ckpt`` and ``.safetensors`` files keep the whole model in one state dict:

- the UNet under ``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` / ``output_blocks``; an EMA copy,
  where the file has one, under ``model_ema.`` with the dots of the name removed);
- the autoencoder under ``first_stage_model.`` (``encoder.down.{i}.block.{j}``, ``mid.attn_1`` with 1x1
  convolutions for its projections);
- the text encoder under ``cond_stage_model.``: SD 1.x's is transformers' CLIP text model under
  ``cond_stage_model.transformer.``, SD 2.x's is OpenCLIP's under ``cond_stage_model.model.`` (fused ``in_proj``
  attention, ``resblocks``; SD 2.x reads the penultimate layer, so the last block is unused).

One direction is written per component, diffusers key -> LDM key (``ldm_unet_key``, ``ldm_vae_key``,
``ldm_text_key``); loading inverts it over the keys the model expects (``from_ldm``), so the two directions cannot
disagree. The layout is the one diffusers' ``from_single_file`` reads (``diffusers.loaders.single_file_utils``,
which the tests use as the reference).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ip2p_jax.models.unet import UNetConfig
from ip2p_jax.models.vae import VAEConfig
from ip2p_jax.weights.files import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Keys a single file may hold beside the weights: LDM's noise-schedule buffers (diffusers takes the schedule from
# the scheduler config), the EMA's bookkeeping, transformers' position-id buffer, and OpenCLIP's parts that SD 2.x
# does not use (checked apart: ``open_clip_to_transformers``).
_LDM_BUFFERS = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar"
    r"|model_ema\.decay|model_ema\.num_updates)$"
    r"|(^|\.)position_ids$"
)


# ---------------------------------------------------------------------------------------------- reading the file


def read_single_file(path: str | Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a single-file checkpoint, float32 NumPy arrays keyed by their LDM names.

    ``.safetensors`` is read directly. A pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run code when
    unpickled, so it is read only with ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``
    (PyTorch is needed for it); a Lightning checkpoint's ``state_dict`` entry is taken. Raises ``CheckpointError``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: a single-file checkpoint ends in one of {', '.join(SUFFIXES)}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="flax") as handle:
                return {key: np.asarray(handle.get_tensor(key), np.float32) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own errors for truncated or foreign files
            raise CheckpointError(f"cannot read {path}: {error}") from error
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a PyTorch pickle, which can run code when it is read: pass allow_pickle=True "
            "(sample.py --allow-pickle) if you trust it, or convert it to .safetensors"
        )
    return _read_pickle(path)


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise CheckpointError(f"reading {path} needs PyTorch (pip install torch); .safetensors does not") from error
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for objects other than tensors, OSError, ...
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {error}") from error
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds no state dict")
    return {key: value.detach().float().numpy() for key, value in state.items() if isinstance(value, torch.Tensor)}


def write_single_file(path: str | Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """Writes an LDM-keyed state dict as float32 ``.safetensors``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: single files are written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path), {"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------- diffusers -> LDM

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_KINDS = r"(resnets|attentions|downsamplers|upsamplers)"
_UNET_BLOCK = re.compile(rf"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?{_KINDS}\.(\d+)\.(.+)")


def _rename_first(rest: str, names: Mapping[str, str]) -> str:
    """``rest`` with its leading module name (one of ``names``) renamed."""
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def ldm_unet_key(key: str, config: UNetConfig) -> str:
    """A diffusers UNet key -> its LDM key (``down_blocks.1.resnets.0.norm1.weight`` ->
    ``model.diffusion_model.input_blocks.4.0.in_layers.0.weight`` for two layers per block)."""
    top = _rename_first(key, _UNET_TOP)
    if top != key:
        return UNET_PREFIX + top
    match = _UNET_BLOCK.fullmatch(key)
    if match is None:
        raise KeyError(key)
    block, i, kind, j, rest = match.groups()
    if kind == "resnets":
        rest = _rename_first(rest, _UNET_RESNET)
    # LDM numbers the layers of all blocks in one list: each block holds layers_per_block layers (one more going
    # up, for the skip connection of the downsampler), a layer is [resnet, attention?, resampler?].
    layers = config.layers_per_block
    if block == "mid_block":
        index = f"middle_block.{2 * int(j) if kind == 'resnets' else 1}"
    elif block == "down_blocks":
        first = 1 + int(i) * (layers + 1)
        if kind == "downsamplers":
            return f"{UNET_PREFIX}input_blocks.{first + layers}.0.{rest.replace('conv.', 'op.', 1)}"
        index = f"input_blocks.{first + int(j)}.{1 if kind == 'attentions' else 0}"
    else:
        first = int(i) * (layers + 1)
        if kind == "upsamplers":
            position = 2 if config.up_block_types[int(i)] == "CrossAttnUpBlock2D" else 1
            return f"{UNET_PREFIX}output_blocks.{first + layers}.{position}.{rest}"
        index = f"output_blocks.{first + int(j)}.{1 if kind == 'attentions' else 0}"
    return f"{UNET_PREFIX}{index}.{rest}"


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_BLOCK = re.compile(rf"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?{_KINDS}\.(\d+)\.(.+)")
# The autoencoder's attention projections, linear in diffusers and 1x1 convolutions in LDM.
_VAE_CONV_1X1 = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def ldm_vae_key(key: str, config: VAEConfig) -> str:
    """A diffusers autoencoder key -> its LDM key (``decoder.up_blocks.0.resnets.1.conv1.weight`` ->
    ``first_stage_model.decoder.up.3.block.1.conv1.weight`` for four blocks: LDM numbers the decoder's blocks
    from the bottom)."""
    match = _VAE_BLOCK.fullmatch(key)
    if match is None:
        return VAE_PREFIX + re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    part, block, i, kind, j, rest = match.groups()
    if kind == "resnets":
        rest = _rename_first(rest, {"conv_shortcut": "nin_shortcut"})
    if block == "mid_block":
        name = f"mid.block_{int(j) + 1}" if kind == "resnets" else "mid.attn_1"
        return f"{VAE_PREFIX}{part}.{name}.{_rename_first(rest, _VAE_ATTENTION)}"
    level = int(i) if block == "down_blocks" else len(config.block_out_channels) - 1 - int(i)
    where = f"{part}.{'down' if block == 'down_blocks' else 'up'}.{level}"
    if kind in ("downsamplers", "upsamplers"):
        return f"{VAE_PREFIX}{where}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    return f"{VAE_PREFIX}{where}.block.{j}.{rest}"


def ldm_text_key(key: str) -> str:
    """A transformers CLIP text key (``text_model.…``) -> SD 1.x's."""
    return CLIP_PREFIX + key


def to_ldm(
    state_dict: Mapping[str, np.ndarray], ldm_key: Callable[[str], str], *, vae: bool = False
) -> dict[str, np.ndarray]:
    """A diffusers state dict -> the LDM-keyed one (with 1x1 convolutions for the autoencoder's attention)."""
    out = {}
    for key, tensor in state_dict.items():
        name = ldm_key(key)
        if vae and _VAE_CONV_1X1.search(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------------- LDM -> diffusers


def ema_key(ldm_key: str) -> str:
    """Where LDM keeps a UNet weight's EMA copy, dots removed: ``model.diffusion_model.out.0.weight`` ->
    ``model_ema.diffusion_modelout0weight``."""
    return EMA_PREFIX + ldm_key.removeprefix("model.").replace(".", "")


def from_ldm(
    tensors: Mapping[str, np.ndarray],
    expected_keys: Iterable[str],
    ldm_key: Callable[[str], str],
    *,
    what: str,
    source: Callable[[str], str] = lambda key: key,
) -> tuple[dict[str, np.ndarray], set[str]]:
    """The diffusers state dict of one component: each expected diffusers key from its LDM name
    (``source(ldm_key(key))``) in ``tensors``. Returns it with the LDM names used; raises ``CheckpointError``
    naming the LDM names that are missing (``what``: the file and component, for the message)."""
    state, used, missing = {}, set(), []
    for key in expected_keys:
        name = source(ldm_key(key))
        if name in tensors:
            state[key] = tensors[name]
            used.add(name)
        else:
            missing.append(name)
    if missing:
        raise CheckpointError(f"{what}: missing tensors ({len(missing)}): {sorted(missing)}")
    return state, used


def open_clip_to_transformers(tensors: Mapping[str, np.ndarray], num_layers: int) -> tuple[dict, set[str]]:
    """SD 2.x's OpenCLIP text encoder -> transformers' CLIP text keys, its first ``num_layers`` blocks (SD 2.x
    reads the penultimate layer; diffusers' model has one block fewer than the file). Returns the state dict and
    every ``cond_stage_model.model.`` key it accounts for (the unused blocks, ``text_projection`` and
    ``logit_scale`` included)."""
    state, used = {}, set()
    renames = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    tops = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
    }
    for name, tensor in tensors.items():
        if not name.startswith(OPEN_CLIP_PREFIX):
            continue
        key = name[len(OPEN_CLIP_PREFIX) :]
        match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if key in tops:
            state[tops[key]] = tensor
        elif match and int(match.group(1)) >= num_layers or key in ("text_projection", "logit_scale", "attn_mask"):
            pass  # unused by SD 2.x
        elif match and match.group(2).startswith("attn.in_proj_"):
            layer, leaf = match.group(1), match.group(2).removeprefix("attn.in_proj_")
            for projection, part in zip(("q", "k", "v"), np.split(tensor, 3), strict=True):
                state[f"text_model.encoder.layers.{layer}.self_attn.{projection}_proj.{leaf}"] = part
        elif match:
            state[f"text_model.encoder.layers.{match.group(1)}.{_rename_first(match.group(2), renames)}"] = tensor
        else:
            continue  # not accounted for: reported as unknown
        used.add(name)
    return state, used


def unknown_keys(tensors: Iterable[str], used: set[str]) -> list[str]:
    """The file's keys that no component took and that are not known buffers."""
    return sorted(k for k in tensors if k not in used and not _LDM_BUFFERS.search(k) and not k.startswith(EMA_PREFIX))
