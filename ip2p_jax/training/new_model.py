"""A new, randomly initialised model written as a diffusers InstructPix2Pix folder: what training from scratch
starts from (``config.model = "new"`` in ``train.py``).

The architectures are diffusers / transformers config dicts, so the folder loads with our loaders and with
diffusers'. The tokenizer is a small CLIP BPE vocabulary over the given words (``vocabulary.py``); the text
encoder stays as initialised (training keeps it frozen). The VAE is either initialised here or copied from a
trained VAE folder (``vae/config.json`` + weights, as ``export.py`` writes an autoencoder run).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ip2p_jax.random_models import random_text_encoder, random_unet, random_vae, text_encoder_config

INITIAL_MODEL = "initial-model"  # where train.py keeps the new model a run started from, in its workdir
# Stable Diffusion's noise schedule, the one every model trained here uses.
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def write_new_model(
    folder: str | Path,
    *,
    unet: Mapping[str, Any],
    vae: Mapping[str, Any] | str,
    text_encoder: Mapping[str, Any],
    words: Sequence[str],
    seed: int,
) -> Path:
    """Writes a new InstructPix2Pix folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
    ``model_index.json``): random weights from ``seed``, except a ``vae`` given as a folder, which is copied.

    Args:
      unet, text_encoder: diffusers / transformers config dicts (the text encoder's vocabulary comes from
        ``words``).
      vae: a diffusers ``AutoencoderKL`` config dict, or the path of a trained VAE folder.
      words: the words the tokenizer knows whole (any other text still encodes, byte by byte).
    """
    import jax
    from transformers import CLIPTokenizer

    from ip2p_jax.vocabulary import write_clip_vocab
    from ip2p_jax.weights import export

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_vocab(folder / "tokenizer", words)))
    unet_key, vae_key, text_key = jax.random.split(jax.random.key(seed), 3)
    _, unet_params = random_unet(unet, unet_key)
    export.save_unet(folder / "unet", unet_params, dict(unet))
    if isinstance(vae, str):
        shutil.copytree(vae, folder / "vae")
    else:
        _, vae_params = random_vae(vae, vae_key)
        export.save_vae(folder / "vae", vae_params, dict(vae))
    _, text_params = random_text_encoder(text_encoder, tokenizer, text_key)
    export.save_text_encoder(folder / "text_encoder", text_params, text_encoder_config(text_encoder, tokenizer))
    export.write_scheduler(folder / "scheduler", export.ip2p_scheduler_config(**SD_BETAS))
    export.write_model_index(folder)
    return folder
