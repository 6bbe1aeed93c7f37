"""Flax parameter trees -> diffusers-layout folders that diffusers / transformers (PyTorch) and our loaders read.

The inverse of ``convert.py``: a Flax path becomes a PyTorch key (``down_blocks_0/resnets_1/conv1/kernel`` ->
``down_blocks.0.resnets.1.conv1.weight``), kernels go back to PyTorch layouts (a convolution's ``(kh, kw, I, O)``
to ``(O, I, kh, kw)``, a linear layer's ``(I, O)`` to ``(O, I)``, a Dense that PyTorch keeps as a 1x1 convolution
to ``(O, I, 1, 1)``), ``scale`` and ``embedding`` to ``weight``. Weights are written as float32 safetensors.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from ip2p_jax.weights import load_single_file, single_file, text_model_key
from ip2p_jax.weights.convert import torch_key
from ip2p_jax.weights.files import DIFFUSERS_WEIGHTS, FOI_CONFIG, TRANSFORMERS_WEIGHTS, resolve_folder


def torch_state_dict(
    params: Mapping,
    *,
    is_conv_1x1: Callable[[str], bool] = lambda key: False,
    strip_prefix: str = "",
    bare_parameters: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """A PyTorch state dict (float32 NumPy arrays) for a Flax parameter tree. ``is_conv_1x1(key)`` names the
    linear maps PyTorch keeps as 1x1 convolutions; ``strip_prefix`` is removed from the front of every key;
    ``bare_parameters`` are PyTorch keys of parameters that are no module's ``weight`` (CLIP's ``logit_scale``)."""
    state = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        key = ".".join(path) if ".".join(path) in bare_parameters else torch_key(path)
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix) :]
        tensor = np.asarray(value, np.float32)
        if path[-1] == "kernel" and tensor.ndim == 4:
            tensor = tensor.transpose(3, 2, 0, 1)
        elif path[-1] == "kernel" and tensor.ndim == 2:
            tensor = tensor.T
            if is_conv_1x1(key):
                tensor = tensor[:, :, None, None]
        state[key] = np.array(tensor, order="C")  # ascontiguousarray would make a 0-d tensor 1-d
    return state


def unet_conv_1x1(config: Mapping[str, Any]) -> Callable[[str], bool]:
    """The UNet's 1x1 convolutions that are Dense layers here: the transformers' ``proj_in`` / ``proj_out`` unless
    the config says ``use_linear_projection`` (SD 2.x)."""
    if config.get("use_linear_projection", False):
        return lambda key: False
    pattern = re.compile(r"attentions\.\d+\.proj_(in|out)\.weight$")
    return lambda key: bool(pattern.search(key))


def save_component(
    folder: str | Path,
    params: Mapping,
    config: Mapping[str, Any],
    weights_name: str,
    *,
    is_conv_1x1: Callable[[str], bool] = lambda key: False,
    strip_prefix: str = "",
    bare_parameters: tuple[str, ...] = (),
) -> Path:
    """Writes ``folder/config.json`` and ``folder/<weights_name>`` (float32 safetensors). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = torch_state_dict(
        params, is_conv_1x1=is_conv_1x1, strip_prefix=strip_prefix, bare_parameters=bare_parameters
    )
    save_file(state, str(folder / weights_name), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return folder


def save_unet(folder: str | Path, params: Mapping, config: Mapping[str, Any]) -> Path:
    """A diffusers ``UNet2DConditionModel`` folder; ``config`` is its diffusers config dict."""
    config = {"_class_name": "UNet2DConditionModel", **config}
    return save_component(folder, params, config, DIFFUSERS_WEIGHTS, is_conv_1x1=unet_conv_1x1(config))


def save_vae(folder: str | Path, params: Mapping, config: Mapping[str, Any]) -> Path:
    """A diffusers ``AutoencoderKL`` folder; ``config`` is its diffusers config dict."""
    return save_component(folder, params, {"_class_name": "AutoencoderKL", **config}, DIFFUSERS_WEIGHTS)


def save_text_encoder(folder: str | Path, params: Mapping, config: Mapping[str, Any]) -> Path:
    """A transformers ``CLIPTextModel`` folder (keys without ``text_model.``, as transformers v5 writes them)."""
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **config}
    return save_component(folder, params, config, TRANSFORMERS_WEIGHTS, strip_prefix="text_model.")


def save_clip(folder: str | Path, params: Mapping, config: Mapping[str, Any]) -> Path:
    """A transformers ``CLIPModel`` folder (both towers, projections, ``logit_scale``); ``config`` is its
    ``config.json`` dict."""
    from ip2p_jax.models.clip import BARE_PARAMETERS

    config = {"architectures": ["CLIPModel"], "model_type": "clip", **config}
    return save_component(folder, params, config, TRANSFORMERS_WEIGHTS, bare_parameters=BARE_PARAMETERS)


def clip_preprocessor_config(image_size: int) -> dict:
    """``preprocessor_config.json`` of a CLIP trained on ``image_size`` px pictures: CLIP's standard processing
    (bicubic resize of the shortest side, centre crop, CLIP's mean and std) at that size."""
    from ip2p_jax.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }


def export_clip(out: str | Path, params: Mapping, source: str | Path) -> Path:
    """Writes a trained CLIP as a transformers ``CLIPModel`` folder: ``params`` with the config, image processor
    settings and tokenizer files of ``source`` (the folder training started from). Refuses a non-empty ``out``."""
    out, source = Path(out), Path(source)
    _refuse_non_empty(out)
    save_clip(out, params, json.loads((source / "config.json").read_text()))
    for name in ("preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


def ip2p_scheduler_config(
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    num_train_timesteps: int,
    rescale_betas_zero_snr: bool = False,
    prediction_type: str = "epsilon",
) -> dict:
    """The released InstructPix2Pix scheduler (Euler ancestral) over the noise schedule the UNet was trained with,
    for its prediction type. A zero terminal SNR schedule gets the trailing timestep spacing (Lin et al. 2024, 3.3),
    so that sampling starts at the last timestep, pure noise."""
    config = {
        "_class_name": "EulerAncestralDiscreteScheduler",
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": beta_schedule,
        "num_train_timesteps": num_train_timesteps,
        "prediction_type": prediction_type,
        "steps_offset": 1,
        "trained_betas": None,
    }
    if rescale_betas_zero_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def write_scheduler(folder: str | Path, config: Mapping[str, Any]) -> None:
    """``folder/scheduler_config.json``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "scheduler_config.json").write_text(json.dumps(dict(config), indent=2) + "\n")


PIPELINE_CLASSES = {"ip2p": "StableDiffusionInstructPix2PixPipeline", "sd": "StableDiffusionPipeline"}


def write_model_index(folder: str | Path, kind: str = "ip2p") -> None:
    """``model_index.json`` of a ``StableDiffusionInstructPix2PixPipeline`` (``kind="ip2p"``) or a text-to-image
    ``StableDiffusionPipeline`` (``"sd"``), without safety checker."""
    index = {
        "_class_name": PIPELINE_CLASSES[kind],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _refuse_non_empty(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export into a new folder")


def export_vae(out: str | Path, params: Mapping, config: Mapping[str, Any]) -> Path:
    """Writes a trained autoencoder as a diffusers ``AutoencoderKL`` folder (``config`` is its diffusers config,
    ``scaling_factor`` included). Refuses a non-empty ``out``."""
    out = Path(out)
    _refuse_non_empty(out)
    return save_vae(out, params, config)


def export_ip2p(
    out: str | Path,
    unet_params: Mapping,
    source: str | Path,
    scheduler_config: Mapping[str, Any],
    *,
    revision: str | None = None,
) -> Path:
    """Writes an InstructPix2Pix pipeline folder (a Stable Diffusion one for a 4-channel, text-to-image UNet): the
    UNet from ``unet_params`` with ``source``'s UNet config, and ``source``'s VAE, text encoder and tokenizer copied
    unchanged (they are frozen in training); ``source`` is the diffusers folder or hub id training started from.
    A local ``source``'s ``foi_config.json`` (FoI settings chosen for its architecture) is carried over, so that
    FoI and the localisation tool read the same mask size from the fine-tuned folder. Refuses a non-empty ``out``.
    """
    out = Path(out)
    _refuse_non_empty(out)
    unet_folder = resolve_folder(source, "unet", weights_name=DIFFUSERS_WEIGHTS, revision=revision)
    unet_config = json.loads((unet_folder / "config.json").read_text())
    unet_config["in_channels"] = int(np.shape(unet_params["conv_in"]["kernel"])[2])
    out.mkdir(parents=True, exist_ok=True)
    save_unet(out / "unet", unet_params, unet_config)
    for component, weights in (("vae", DIFFUSERS_WEIGHTS), ("text_encoder", TRANSFORMERS_WEIGHTS), ("tokenizer", None)):
        folder = resolve_folder(source, component, weights_name=weights, revision=revision)
        shutil.copytree(folder, out / component, ignore=shutil.ignore_patterns("*.bin", "*.fp16.*", "*.ckpt"))
    write_scheduler(out / "scheduler", scheduler_config)
    write_model_index(out, "ip2p" if unet_config["in_channels"] == 8 else "sd")
    if (Path(source) / FOI_CONFIG).is_file():
        shutil.copy(Path(source) / FOI_CONFIG, out / FOI_CONFIG)
    return out


def export_single_file(source: str | Path, out: str | Path, *, revision: str | None = None) -> Path:
    """Writes a diffusers pipeline folder (or hub repo) as one LDM-layout ``.safetensors`` file
    (``weights/single_file.py``), as the original InstructPix2Pix / Stable Diffusion tools read it: the UNet, the
    autoencoder and the text encoder, in SD 1.x's layout (transformers' CLIP under ``cond_stage_model.transformer.``),
    float32. ``InstructPix2PixPipeline.from_single_file(out, config=source)`` reads it back unchanged. Refuses an
    existing ``out``."""
    from functools import partial

    from ip2p_jax.models.unet import UNetConfig
    from ip2p_jax.models.vae import VAEConfig
    from ip2p_jax.weights.convert import IGNORED_KEYS, rename_old_vae_attention
    from ip2p_jax.weights.files import read_config, read_safetensors

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export into a new file")
    tensors = {}
    for component, weights, rename, ldm_key, vae in (
        ("unet", DIFFUSERS_WEIGHTS, None, single_file.ldm_unet_key, False),
        ("vae", DIFFUSERS_WEIGHTS, rename_old_vae_attention, single_file.ldm_vae_key, True),
        ("text_encoder", TRANSFORMERS_WEIGHTS, text_model_key, single_file.ldm_text_key, False),
    ):
        folder = resolve_folder(source, component, weights_name=weights, revision=revision)
        state = read_safetensors(folder, weights)
        state = {rename(key) if rename else key: value for key, value in state.items()}
        state = {key: value for key, value in state.items() if not IGNORED_KEYS.search(key)}
        if component != "text_encoder":
            parse = UNetConfig.from_diffusers if component == "unet" else VAEConfig.from_diffusers
            ldm_key = partial(ldm_key, config=parse(read_config(folder)))
        tensors.update(single_file.to_ldm(state, ldm_key, vae=vae))
    return single_file.write_single_file(out, tensors)


def folder_from_single_file(
    path: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    allow_pickle: bool = False,
    ema: bool = False,
) -> Path:
    """Writes a single-file LDM checkpoint as a diffusers pipeline folder, the form ``train.py``
    (``--config.model``), ``generate_data.py`` and diffusers' ``from_pretrained`` start from: the file's UNet,
    autoencoder and text encoder (``weights.load_single_file``: ``config``, ``allow_pickle`` and ``ema`` as there),
    the tokenizer and scheduler of ``config``. Refuses a non-empty ``out``."""
    out = Path(out)
    _refuse_non_empty(out)
    components, config = load_single_file(path, config, allow_pickle=allow_pickle, ema=ema)
    unet_config = json.loads((resolve_folder(config, "unet", weights_name="config.json") / "config.json").read_text())
    unet_config["in_channels"] = components["unet"][0].config.in_channels
    out.mkdir(parents=True, exist_ok=True)
    save_unet(out / "unet", components["unet"][1], unet_config)
    for component, save in (("vae", save_vae), ("text_encoder", save_text_encoder)):
        folder = resolve_folder(config, component, weights_name="config.json")
        save(out / component, components[component][1], json.loads((folder / "config.json").read_text()))
    for component in ("tokenizer", "scheduler"):
        shutil.copytree(resolve_folder(config, component), out / component)
    write_model_index(out, "ip2p" if unet_config["in_channels"] == 8 else "sd")
    return out
