"""Loading Stable Diffusion / InstructPix2Pix components from diffusers-layout folders or hub repo ids.

Each loader returns ``(module, params)`` for ``module.apply({"params": params}, ...)``; params are float32
whatever the checkpoint's dtype (an ``fp16`` ``variant`` is read and upcast), and ``dtype`` sets the compute
dtype. Anything wrong raises ``CheckpointError`` before anything is returned.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from transformers import CLIPTokenizer

from ip2p_jax.clip_preprocess import CLIPImageProcessorConfig
from ip2p_jax.models.clip import BARE_PARAMETERS, CLIPConfig, CLIPModel
from ip2p_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
from ip2p_jax.models.vae import AutoencoderKL, VAEConfig
from ip2p_jax.weights.convert import convert_state_dict, rename_old_vae_attention
from ip2p_jax.weights.files import CheckpointError, read_config, read_safetensors, resolve_folder

__all__ = [
    "CheckpointError",
    "load_clip",
    "load_clip_preprocessor",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_vae",
]

PathOrRepo = str | os.PathLike
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def _config_error(what: str, folder, error: ValueError) -> CheckpointError:
    return CheckpointError(f"{what} in {folder}: {error}")


def _load(module, example_inputs, folder, weights_name, variant, what, rename=lambda key: key, bare_parameters=()):
    expected = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)["params"]
    state_dict = read_safetensors(folder, weights_name, variant)
    params = convert_state_dict(
        state_dict, expected, what=f"{what} ({folder})", rename=rename, bare_parameters=bare_parameters
    )
    return module, jax.tree.map(jnp.asarray, params)


def load_unet(
    path_or_repo_id: PathOrRepo,
    subfolder: str = "unet",
    *,
    variant: str | None = None,
    revision: str | None = None,
    dtype: Any = jnp.float32,
) -> tuple[UNet2DConditionModel, dict]:
    """The UNet of a diffusers folder or hub repo: ``(UNet2DConditionModel, params)``."""
    folder = resolve_folder(
        path_or_repo_id, subfolder, weights_name=DIFFUSERS_WEIGHTS, variant=variant, revision=revision
    )
    try:
        config = UNetConfig.from_diffusers(read_config(folder))
    except ValueError as error:
        raise _config_error("UNet", folder, error) from error
    module = UNet2DConditionModel(config, dtype=dtype)
    size = 2 ** (len(config.block_out_channels) - 1)
    inputs = (
        jnp.zeros((1, size, size, config.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, config.cross_attention_dim[0])),
    )
    return _load(module, inputs, folder, DIFFUSERS_WEIGHTS, variant, "UNet")


def load_vae(
    path_or_repo_id: PathOrRepo,
    subfolder: str = "vae",
    *,
    variant: str | None = None,
    revision: str | None = None,
    dtype: Any = jnp.float32,
) -> tuple[AutoencoderKL, dict]:
    """The autoencoder of a diffusers folder or hub repo: ``(AutoencoderKL, params)``."""
    folder = resolve_folder(
        path_or_repo_id, subfolder, weights_name=DIFFUSERS_WEIGHTS, variant=variant, revision=revision
    )
    try:
        config = VAEConfig.from_diffusers(read_config(folder))
    except ValueError as error:
        raise _config_error("VAE", folder, error) from error
    module = AutoencoderKL(config, dtype=dtype)
    size = 2 ** len(config.block_out_channels)
    inputs = (jnp.zeros((1, size, size, config.in_channels)),)
    return _load(module, inputs, folder, DIFFUSERS_WEIGHTS, variant, "VAE", rename_old_vae_attention)


def load_text_encoder(
    path_or_repo_id: PathOrRepo,
    subfolder: str = "text_encoder",
    *,
    variant: str | None = None,
    revision: str | None = None,
    dtype: Any = jnp.float32,
) -> tuple[CLIPTextModel, dict]:
    """The CLIP text encoder of a diffusers folder or hub repo (transformers layout): ``(CLIPTextModel, params)``."""
    folder = resolve_folder(
        path_or_repo_id, subfolder, weights_name=TRANSFORMERS_WEIGHTS, variant=variant, revision=revision
    )
    try:
        config = CLIPTextConfig.from_transformers(read_config(folder))
    except ValueError as error:
        raise _config_error("text encoder", folder, error) from error
    module = CLIPTextModel(config, dtype=dtype)
    inputs = (jnp.zeros((1, 1), jnp.int32),)
    return _load(module, inputs, folder, TRANSFORMERS_WEIGHTS, variant, "text encoder", _text_model_prefix)


def _text_model_prefix(key: str) -> str:
    """transformers v4 saved CLIP's text tower under ``text_model.`` (the released SD checkpoints); v5 does not."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def load_clip(
    path_or_repo_id: PathOrRepo,
    subfolder: str = "",
    *,
    variant: str | None = None,
    revision: str | None = None,
    dtype: Any = jnp.float32,
) -> tuple[CLIPModel, dict]:
    """A transformers ``CLIPModel`` folder or hub repo (``openai/clip-vit-large-patch14``,
    ``yuvalkirstain/PickScore_v1``): ``(CLIPModel, params)`` with both towers, both projections and ``logit_scale``.
    """
    folder = resolve_folder(
        path_or_repo_id, subfolder, weights_name=TRANSFORMERS_WEIGHTS, variant=variant, revision=revision
    )
    try:
        config = CLIPConfig.from_transformers(read_config(folder))
    except ValueError as error:
        raise _config_error("CLIP", folder, error) from error
    module = CLIPModel(config, dtype=dtype)
    size, channels = config.vision.image_size, config.vision.num_channels
    inputs = (jnp.zeros((1, size, size, channels)), jnp.zeros((1, 1), jnp.int32))
    return _load(module, inputs, folder, TRANSFORMERS_WEIGHTS, variant, "CLIP", bare_parameters=BARE_PARAMETERS)


def load_clip_preprocessor(
    path_or_repo_id: PathOrRepo, subfolder: str = "", *, revision: str | None = None
) -> CLIPImageProcessorConfig:
    """The ``preprocessor_config.json`` of a folder or hub repo, or CLIP's standard settings where there is none.

    PickScore's model card takes its processor from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; its settings, like
    ``openai/clip-vit-large-patch14``'s, are CLIP's standard ones (``CLIPImageProcessorConfig()``).
    """
    # Named as the "weights", the config makes the hub download take the folder's JSON files and no tensors.
    folder = resolve_folder(path_or_repo_id, subfolder, weights_name=PREPROCESSOR_CONFIG, revision=revision)
    if not (folder / PREPROCESSOR_CONFIG).is_file():
        return CLIPImageProcessorConfig()
    try:
        return CLIPImageProcessorConfig.from_transformers(read_config(folder, PREPROCESSOR_CONFIG))
    except ValueError as error:
        raise _config_error("CLIP image processor", folder, error) from error


def load_tokenizer(
    path_or_repo_id: PathOrRepo, subfolder: str = "tokenizer", *, revision: str | None = None
) -> CLIPTokenizer:
    """The CLIP tokenizer of a diffusers folder or hub repo (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``)."""
    folder = resolve_folder(path_or_repo_id, subfolder, revision=revision)
    names = {p.name for p in folder.iterdir()}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise CheckpointError(f"{folder} has neither tokenizer.json nor vocab.json and merges.txt")
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {error}") from error


def load_noise_schedule(
    path_or_repo_id: PathOrRepo, subfolder: str = "scheduler", *, revision: str | None = None
) -> dict[str, Any]:
    """The training noise schedule of a checkpoint (``beta_start``, ``beta_end``, ``beta_schedule``,
    ``num_train_timesteps``, ``rescale_betas_zero_snr``, diffusers' defaults where absent) from its
    ``scheduler_config.json``, whatever the scheduler class: keywords of ``schedulers.SchedulerConfig``."""
    config = read_config(resolve_folder(path_or_repo_id, subfolder, revision=revision), "scheduler_config.json")
    if config.get("trained_betas") is not None:
        raise CheckpointError(f"{path_or_repo_id}: schedulers with trained_betas are not supported")
    defaults = dict(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, rescale_betas_zero_snr=False
    )
    return {key: config.get(key, default) for key, default in defaults.items()}


def load_prediction_type(
    path_or_repo_id: PathOrRepo, subfolder: str = "scheduler", *, revision: str | None = None
) -> str:
    """What a checkpoint's UNet predicts, from its ``scheduler_config.json``: ``epsilon`` (diffusers' default) or
    ``v_prediction``."""
    config = read_config(resolve_folder(path_or_repo_id, subfolder, revision=revision), "scheduler_config.json")
    return config.get("prediction_type", "epsilon")
