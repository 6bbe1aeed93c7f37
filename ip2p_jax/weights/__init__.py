"""Loading Stable Diffusion / InstructPix2Pix components from diffusers-layout folders or hub repo ids.

Each loader returns ``(module, params)`` for ``module.apply({"params": params}, ...)``; params are float32
whatever the checkpoint's dtype (an ``fp16`` ``variant`` is read and upcast), and ``dtype`` sets the compute
dtype. Anything wrong raises ``CheckpointError`` before anything is returned.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from transformers import CLIPTokenizer

from ip2p_jax.models.clip import BARE_PARAMETERS, CLIPConfig, CLIPModel
from ip2p_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ip2p_jax.models.stack import ModelStack
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
from ip2p_jax.models.vae import AutoencoderKL, VAEConfig
from ip2p_jax.schedulers import Scheduler
from ip2p_jax.weights import single_file
from ip2p_jax.weights.convert import convert_state_dict, rename_old_vae_attention, torch_key
from ip2p_jax.weights.files import (
    DIFFUSERS_WEIGHTS,
    TRANSFORMERS_WEIGHTS,
    CheckpointError,
    read_config,
    read_safetensors,
    resolve_folder,
)

if TYPE_CHECKING:
    from transformers import CLIPImageProcessorPil

__all__ = [
    "CheckpointError",
    "load_clip",
    "load_clip_preprocessor",
    "load_scheduler",
    "load_single_file",
    "load_single_file_stack",
    "load_stack",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_vae",
]

PathOrRepo = str | os.PathLike
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def _config_error(what: str, folder, error: ValueError) -> CheckpointError:
    return CheckpointError(f"{what} in {folder}: {error}")


def _expected(module, *example_inputs):
    """The shapes of ``module``'s parameters (``jax.ShapeDtypeStruct`` leaves), nothing computed."""
    return jax.eval_shape(module.init, jax.random.key(0), *example_inputs)["params"]


def _converted(module, expected, state_dict, what, rename=lambda key: key, bare_parameters=()):
    params = convert_state_dict(state_dict, expected, what=what, rename=rename, bare_parameters=bare_parameters)
    return module, jax.tree.map(jnp.asarray, params)


def _component_config(folder, what: str, parse):
    try:
        return parse(read_config(folder))
    except ValueError as error:
        raise _config_error(what, folder, error) from error


def unet_module(config: UNetConfig, dtype: Any = jnp.float32) -> tuple[UNet2DConditionModel, Any]:
    """The UNet for ``config`` and its parameters' shapes."""
    module = UNet2DConditionModel(config, dtype=dtype)
    size = 2 ** (len(config.block_out_channels) - 1)
    inputs = (
        jnp.zeros((1, size, size, config.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, config.cross_attention_dim[0])),
    )
    return module, _expected(module, *inputs)


def vae_module(config: VAEConfig, dtype: Any = jnp.float32) -> tuple[AutoencoderKL, Any]:
    """The autoencoder for ``config`` and its parameters' shapes."""
    module = AutoencoderKL(config, dtype=dtype)
    size = 2 ** len(config.block_out_channels)
    return module, _expected(module, jnp.zeros((1, size, size, config.in_channels)))


def text_encoder_module(config: CLIPTextConfig, dtype: Any = jnp.float32) -> tuple[CLIPTextModel, Any]:
    """The CLIP text encoder for ``config`` and its parameters' shapes."""
    module = CLIPTextModel(config, dtype=dtype)
    return module, _expected(module, jnp.zeros((1, 1), jnp.int32))


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
    module, expected = unet_module(_component_config(folder, "UNet", UNetConfig.from_diffusers), dtype)
    state_dict = read_safetensors(folder, DIFFUSERS_WEIGHTS, variant)
    return _converted(module, expected, state_dict, f"UNet ({folder})")


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
    module, expected = vae_module(_component_config(folder, "VAE", VAEConfig.from_diffusers), dtype)
    state_dict = read_safetensors(folder, DIFFUSERS_WEIGHTS, variant)
    return _converted(module, expected, state_dict, f"VAE ({folder})", rename_old_vae_attention)


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
    config = _component_config(folder, "text encoder", CLIPTextConfig.from_transformers)
    module, expected = text_encoder_module(config, dtype)
    state_dict = read_safetensors(folder, TRANSFORMERS_WEIGHTS, variant)
    return _converted(module, expected, state_dict, f"text encoder ({folder})", text_model_key)


def text_model_key(key: str) -> str:
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
    config = _component_config(folder, "CLIP", CLIPConfig.from_transformers)
    module = CLIPModel(config, dtype=dtype)
    size, channels = config.vision.image_size, config.vision.num_channels
    expected = _expected(module, jnp.zeros((1, size, size, channels)), jnp.zeros((1, 1), jnp.int32))
    state_dict = read_safetensors(folder, TRANSFORMERS_WEIGHTS, variant)
    return _converted(module, expected, state_dict, f"CLIP ({folder})", bare_parameters=BARE_PARAMETERS)


def load_clip_preprocessor(
    path_or_repo_id: PathOrRepo, subfolder: str = "", *, revision: str | None = None
) -> CLIPImageProcessorPil:
    """transformers' CLIP image processor with the ``preprocessor_config.json`` of a folder or hub repo, or with
    CLIP's standard settings where there is none.

    PickScore's model card takes its processor from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; its settings, like
    ``openai/clip-vit-large-patch14``'s, are CLIP's standard ones (``CLIPImageProcessorPil()``). It is the PIL
    backend whatever is installed: what transformers v4 and OpenAI's ``clip`` package compute (uint8 images resized
    with PIL's bicubic); v5's default ``CLIPImageProcessor`` switches to torchvision where that is installed, whose
    float resize differs by a few levels of 255 at edges.

    ``processor(images=..., return_tensors="np")["pixel_values"]`` is NCHW float32; ``CLIPModel`` takes NHWC
    (``.transpose(0, 2, 3, 1)``).
    """
    # Imported here: transformers' image processing imports torch where it is installed (seconds), which the
    # programs importing this module for their other loaders do not need.
    from transformers import CLIPImageProcessorPil

    # Named as the "weights", the config makes the hub download take the folder's JSON files and no tensors.
    folder = resolve_folder(path_or_repo_id, subfolder, weights_name=PREPROCESSOR_CONFIG, revision=revision)
    if not (folder / PREPROCESSOR_CONFIG).is_file():
        return CLIPImageProcessorPil()
    read_config(folder, PREPROCESSOR_CONFIG)  # invalid JSON: a CheckpointError naming the file
    try:
        return CLIPImageProcessorPil.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
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


def load_scheduler(
    path_or_repo_id: PathOrRepo, subfolder: str = "scheduler", *, kind: str | None = None, revision: str | None = None
) -> Scheduler:
    """The scheduler of a diffusers folder or hub repo (``scheduler_config.json``): its own class, or ``kind``
    (``schedulers.SCHEDULERS``) with its settings."""
    return Scheduler.from_folder(resolve_folder(path_or_repo_id, subfolder, revision=revision), kind=kind)


# What a caller does to the UNet as it is read, before anything else is: ``(module, params) -> (module, params)``.
PrepareUNet = Callable[[UNet2DConditionModel, Any], tuple[UNet2DConditionModel, Any]]


def load_stack(
    path_or_repo_id: PathOrRepo,
    *,
    dtype: Any = jnp.float32,
    vae_dtype: Any = None,
    revision: str | None = None,
    variant: str | None = None,
    scheduler_kind: str | None = None,
    with_scheduler: bool = True,
    prepare_unet: PrepareUNet | None = None,
) -> ModelStack:
    """A Stable Diffusion or InstructPix2Pix stack from a diffusers-layout folder or hub repo id (``unet/``,
    ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), the components read in that order.

    Args:
      dtype: the compute dtype of the UNet and the text encoder (params stay float32).
      vae_dtype: the autoencoder's compute dtype; ``None``: ``dtype``.
      revision, variant: the hub revision; the weights' variant (``"fp16"``, upcast to float32).
      scheduler_kind: a scheduler of ``schedulers.SCHEDULERS`` with the checkpoint's settings; ``None``: the
        checkpoint's own class.
      with_scheduler: ``False``: no scheduler is read (``ModelStack.scheduler`` is ``None``; training makes its own).
      prepare_unet: applied to the UNet and its params as soon as they are read, before the other components: a
        caller's requirement (its input channels) fails before anything else is read or downloaded, and a change
        (another attention kernel, more input channels) is what the stack holds.
    """
    options = dict(revision=revision, variant=variant)
    unet, unet_params = load_unet(path_or_repo_id, dtype=dtype, **options)
    if prepare_unet is not None:
        unet, unet_params = prepare_unet(unet, unet_params)
    vae, vae_params = load_vae(path_or_repo_id, dtype=dtype if vae_dtype is None else vae_dtype, **options)
    text_encoder, text_params = load_text_encoder(path_or_repo_id, dtype=dtype, **options)
    return _stack(
        (unet, unet_params),
        (vae, vae_params),
        (text_encoder, text_params),
        path_or_repo_id,
        revision=revision,
        scheduler_kind=scheduler_kind,
        with_scheduler=with_scheduler,
    )


def _stack(unet, vae, text_encoder, source, *, revision, scheduler_kind=None, with_scheduler=True) -> ModelStack:
    """``(module, params)`` of each model and ``source``'s tokenizer and scheduler, as a ``ModelStack``."""
    tokenizer = load_tokenizer(source, revision=revision)
    scheduler = load_scheduler(source, kind=scheduler_kind, revision=revision) if with_scheduler else None
    params = {"unet": unet[1], "vae": vae[1], "text_encoder": text_encoder[1]}
    return ModelStack(unet[0], vae[0], text_encoder[0], tokenizer, scheduler, params)


# The hub repo whose configs and tokenizer fit a single file with no ``config`` named, by the UNet's cross-attention
# width and input channels (what diffusers' ``from_single_file`` infers too).
SINGLE_FILE_CONFIGS = {
    (768, 8): "timbrooks/instruct-pix2pix",
    (768, 4): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    (1024, 4): "stabilityai/stable-diffusion-2-1",
}


def single_file_config_source(tensors: dict[str, np.ndarray], path) -> str:
    """The hub repo of ``SINGLE_FILE_CONFIGS`` that fits a single file's UNet, or ``CheckpointError``."""
    conv_in = tensors.get(single_file.UNET_PREFIX + "input_blocks.0.0.weight")
    context = next((v for k, v in tensors.items() if k.endswith("attn2.to_k.weight")), None)
    kind = None if conv_in is None or context is None else (int(context.shape[1]), int(conv_in.shape[1]))
    if kind not in SINGLE_FILE_CONFIGS:
        raise CheckpointError(
            f"{path}: cannot tell which model this is (cross-attention width and UNet input channels {kind}); "
            "name a diffusers folder or hub repo with the same architecture as its config"
        )
    return SINGLE_FILE_CONFIGS[kind]


def _diffusers_keys(expected) -> list[str]:
    return [torch_key(path) for path in traverse_util.flatten_dict(dict(expected))]


def load_single_file(
    path: PathOrRepo,
    config: PathOrRepo | None = None,
    *,
    allow_pickle: bool = False,
    ema: bool = False,
    revision: str | None = None,
    dtype: Any = jnp.float32,
) -> tuple[dict[str, tuple[Any, dict]], str | os.PathLike]:
    """The UNet, autoencoder and text encoder of a single-file LDM checkpoint (``weights/single_file.py``):
    ``({"unet": (module, params), "vae": ..., "text_encoder": ...}, config)``.

    Their configs come from ``config``, a diffusers folder or hub repo id of the same architecture (only its JSON
    files are read), except the UNet's input channels, which are the file's (an InstructPix2Pix file with Stable
    Diffusion's config); with no ``config``, the hub repo of ``SINGLE_FILE_CONFIGS`` that fits the file. A component
    the file lacks (a file of the UNet alone) is loaded from ``config``. ``ema`` takes the UNet's EMA weights where
    the file has both. A pickle is read only with ``allow_pickle`` (it can run code). Every tensor of the file must
    be accounted for: an unknown key is a ``CheckpointError`` that names it.
    """
    tensors = single_file.read_single_file(path, allow_pickle=allow_pickle)
    config = config if config is not None else single_file_config_source(tensors, path)

    def config_of(subfolder, parse, what):
        # Named as the "weights", the config makes the hub download take the folder's JSON files and no tensors.
        folder = resolve_folder(config, subfolder, weights_name="config.json", revision=revision)
        return _component_config(folder, what, parse)

    conv_in = tensors.get(single_file.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError(f"{path} holds no UNet (no {single_file.UNET_PREFIX}input_blocks.0.0.weight)")
    unet_config = config_of("unet", UNetConfig.from_diffusers, "UNet")
    unet_config = dataclasses.replace(unet_config, in_channels=int(conv_in.shape[1]))
    unet, expected = unet_module(unet_config, dtype)
    ldm_key = functools.partial(single_file.ldm_unet_key, config=unet_config)
    source = single_file.ema_key if ema else (lambda key: key)
    if ema and not any(key.startswith(single_file.EMA_PREFIX) for key in tensors):
        raise CheckpointError(f"{path} holds no EMA weights (model_ema.*): load it with ema=False")
    states = {
        "unet": single_file.from_ldm(tensors, _diffusers_keys(expected), ldm_key, what=f"UNet of {path}", source=source)
    }
    modules = {"unet": (unet, expected)}
    if ema:  # the raw weights are then known and unused
        states["unet"][1].update(k for k in tensors if k.startswith(single_file.UNET_PREFIX))

    if any(key.startswith(single_file.VAE_PREFIX) for key in tensors):
        vae_config = config_of("vae", VAEConfig.from_diffusers, "VAE")
        modules["vae"] = vae_module(vae_config, jnp.float32)
        ldm_key = functools.partial(single_file.ldm_vae_key, config=vae_config)
        states["vae"] = single_file.from_ldm(
            tensors, _diffusers_keys(modules["vae"][1]), ldm_key, what=f"VAE of {path}"
        )

    has_clip = any(key.startswith(single_file.CLIP_PREFIX) for key in tensors)
    has_open_clip = any(key.startswith(single_file.OPEN_CLIP_PREFIX) for key in tensors)
    if has_clip or has_open_clip:
        text_config = config_of("text_encoder", CLIPTextConfig.from_transformers, "text encoder")
        modules["text_encoder"] = text_encoder_module(text_config, dtype)
        if has_clip:
            # Files written with transformers before v4.20 lack the ``text_model.`` level.
            def clip_source(name: str) -> str:
                return name if name in tensors else name.replace(".transformer.text_model.", ".transformer.", 1)

            keys = _diffusers_keys(modules["text_encoder"][1])
            states["text_encoder"] = single_file.from_ldm(
                tensors, keys, single_file.ldm_text_key, what=f"text encoder of {path}", source=clip_source
            )
        else:
            states["text_encoder"] = single_file.open_clip_to_transformers(tensors, text_config.num_hidden_layers)

    unknown = single_file.unknown_keys(tensors, set().union(*(used for _, used in states.values())))
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise CheckpointError(f"{path}: tensors that no part of the model takes ({len(unknown)}): {shown}")
    components = {name: _converted(*modules[name], states[name][0], f"{name} of {path}") for name in states}
    options = dict(revision=revision)
    if "vae" not in components:
        components["vae"] = load_vae(config, **options)
    if "text_encoder" not in components:
        components["text_encoder"] = load_text_encoder(config, dtype=dtype, **options)
    return components, config


def load_single_file_stack(
    path: PathOrRepo,
    config: PathOrRepo | None = None,
    *,
    allow_pickle: bool = False,
    ema: bool = False,
    revision: str | None = None,
    dtype: Any = jnp.float32,
    prepare_unet: PrepareUNet | None = None,
) -> ModelStack:
    """``load_single_file``'s models with the tokenizer and the scheduler of its ``config`` (the one it names by
    default), as a ``ModelStack``; ``prepare_unet`` as for ``load_stack``, applied before those two are read."""
    components, config = load_single_file(
        path, config, allow_pickle=allow_pickle, ema=ema, revision=revision, dtype=dtype
    )
    unet = components["unet"] if prepare_unet is None else prepare_unet(*components["unet"])
    return _stack(unet, components["vae"], components["text_encoder"], config, revision=revision)
