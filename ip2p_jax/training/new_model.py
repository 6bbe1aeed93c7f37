"""New, randomly initialised models written as diffusers / transformers folders: what training from scratch starts
from (``config.model = "new"`` in ``train.py``): an InstructPix2Pix or Stable Diffusion folder, or a CLIP.

The architectures are diffusers / transformers config dicts, so the folder loads with our loaders and with
diffusers'. The tokenizer is a small CLIP BPE vocabulary over the given words (``tokenizer.write_clip_vocab``); the text
encoder stays as initialised (training keeps it frozen), or is a trained CLIP's text tower. The UNet and the VAE are
either initialised here or copied from trained folders (``config.json`` + weights, as ``export.py`` writes them).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ip2p_jax.random_models import random_text_encoder, random_unet, random_vae, text_encoder_config

INITIAL_MODEL = "initial-model"  # where train.py keeps the new model a run started from, in its workdir
# Stable Diffusion's noise schedule, the one every model trained here uses.
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def write_new_model(
    folder: str | Path,
    *,
    unet: Mapping[str, Any] | str,
    vae: Mapping[str, Any] | str,
    text_encoder: Mapping[str, Any] | str,
    words: Sequence[str] = (),
    seed: int,
) -> Path:
    """Writes a new InstructPix2Pix (8 input channels) or Stable Diffusion (4) folder (``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``): random weights from ``seed``, except
    a ``unet``, ``vae`` or ``text_encoder`` given as a folder.

    Args:
      unet: a diffusers UNet config dict, or the path of a trained UNet folder (copied): a lineage stage regrown
        over a new text encoder keeps the image prior it has learnt (its cross-attention relearns the words).
      vae: a diffusers ``AutoencoderKL`` config dict, or the path of a trained VAE folder (copied).
      text_encoder: a transformers CLIP text config dict (a random tower over ``words``' vocabulary), or the path
        of a trained transformers ``CLIPModel`` folder, whose text tower and tokenizer are taken.
      words: the words the tokenizer knows whole (any other text still encodes, byte by byte); unused when
        ``text_encoder`` is a folder.
    """
    import jax
    from transformers import CLIPTokenizer

    from ip2p_jax.tokenizer import write_clip_vocab
    from ip2p_jax.weights import export, load_clip

    folder = Path(folder)
    unet_key, vae_key, text_key = jax.random.split(jax.random.key(seed), 3)
    if isinstance(text_encoder, str):
        (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copy(Path(text_encoder) / name, folder / "tokenizer" / name)
        clip, clip_params = load_clip(text_encoder)
        text_params, text_config = {"text_model": clip_params["text_model"]}, clip_text_config(text_encoder)
    else:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_vocab(folder / "tokenizer", words)))
        _, text_params = random_text_encoder(text_encoder, tokenizer, text_key)
        text_config = text_encoder_config(text_encoder, tokenizer)
    export.save_text_encoder(folder / "text_encoder", text_params, text_config)
    if isinstance(unet, str):
        shutil.copytree(unet, folder / "unet")
        in_channels = json.loads((folder / "unet" / "config.json").read_text()).get("in_channels", 4)
    else:
        _, unet_params = random_unet(unet, unet_key)
        export.save_unet(folder / "unet", unet_params, dict(unet))
        in_channels = unet.get("in_channels", 4)
    if isinstance(vae, str):
        shutil.copytree(vae, folder / "vae")
    else:
        _, vae_params = random_vae(vae, vae_key)
        export.save_vae(folder / "vae", vae_params, dict(vae))
    export.write_scheduler(folder / "scheduler", export.ip2p_scheduler_config(**SD_BETAS))
    export.write_model_index(folder, "ip2p" if in_channels == 8 else "sd")
    return folder


def clip_text_config(clip_folder: str | Path) -> dict[str, Any]:
    """The ``text_config`` of a transformers ``CLIPModel`` folder as a ``CLIPTextModel`` config."""
    config = json.loads((Path(clip_folder) / "config.json").read_text())
    return dict(config["text_config"])


def clip_config(
    *, text: Mapping[str, Any], vision: Mapping[str, Any], projection_dim: int, tokenizer
) -> dict[str, Any]:
    """A transformers ``CLIPModel`` config dict: the towers' sizes, the tokenizer's vocabulary and ids."""
    return {
        "projection_dim": projection_dim,
        "logit_scale_init_value": 2.6592,  # CLIP's log(1 / 0.07)
        "text_config": text_encoder_config(text, tokenizer),
        "vision_config": {"hidden_act": "quick_gelu", "num_channels": 3, **dict(vision)},
    }


def write_new_clip(
    folder: str | Path,
    *,
    text: Mapping[str, Any],
    vision: Mapping[str, Any],
    projection_dim: int,
    words: Sequence[str],
    seed: int,
) -> Path:
    """Writes a new, randomly initialised transformers ``CLIPModel`` folder (weights, config, CLIP's image
    processing at the vision tower's size, and a tokenizer over ``words``): what CLIP training from scratch starts
    from."""
    import jax
    from transformers import CLIPTokenizer

    from ip2p_jax.models.clip import CLIPConfig, CLIPModel
    from ip2p_jax.tokenizer import write_clip_vocab
    from ip2p_jax.weights import export

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_vocab(folder, words)))
    config = clip_config(text=text, vision=vision, projection_dim=projection_dim, tokenizer=tokenizer)
    module = CLIPModel(CLIPConfig.from_transformers(config))
    size = module.config.vision.image_size
    init = jax.jit(module.init)
    params = init(jax.random.key(seed), jax.numpy.zeros((1, size, size, 3)), jax.numpy.zeros((1, 77), "int32"))
    export.save_clip(folder, params["params"], config)
    (folder / "preprocessor_config.json").write_text(json.dumps(export.clip_preprocessor_config(size), indent=2))
    return folder
