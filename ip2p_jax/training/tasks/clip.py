"""A CLIP trained contrastively on captioned scenes (``training/clip.py``), from ``config.new_model.clip``
(``model = "new"``, written to ``WORKDIR/initial-model``) or a transformers ``CLIPModel`` folder."""

from __future__ import annotations

import functools
from pathlib import Path

from ip2p_jax.training.tasks import Task
from ip2p_jax.training.tasks.common import optimizer


def clip_source(config, workdir: Path, main_process: bool) -> str:
    """The CLIP folder training starts from; ``new``: a random CLIP that process 0 writes to
    ``WORKDIR/initial-model``."""
    if config.model != "new":
        return config.model
    from jax.experimental import multihost_utils

    from ip2p_jax.training.new_model import INITIAL_MODEL, write_new_clip

    source = workdir / INITIAL_MODEL
    if main_process and not (source / "config.json").is_file():
        write_new_clip(str(source), **config.new_model.clip.to_dict(), seed=config.seed)
    multihost_utils.sync_global_devices("initial model written")
    return str(source)


def build(config, workdir: Path, main_process: bool) -> Task:
    """The CLIP task of ``config`` (``configs/shapes_clip.py``)."""
    import numpy as np

    from ip2p_jax.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from ip2p_jax.data.shapes import SHAPES
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training import evaluators
    from ip2p_jax.training.clip import CLIPSettings, clip_step, trim_padding
    from ip2p_jax.weights import load_clip, load_tokenizer

    source = clip_source(config, workdir, main_process)
    clip, params = load_clip(source)
    tokenizer = load_tokenizer(source, subfolder="")
    tx = optimizer(config)
    presence_weight = config.get("objective", {}).get("presence_weight", 0.0)
    settings = CLIPSettings(
        clip, tx, config.ema.decay, config.optim.accumulation, config.optim.learning_rate, presence_weight
    )
    frozen = {}
    if presence_weight:  # the shape words, each a caption of its own (training/clip.py:word_presence_loss)
        frozen["presence_input_ids"] = trim_padding(tokenize(tokenizer, list(SHAPES)), clip.config.text.eos_token_id)
    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)

    def batch(rows):
        # CLIP's processing of a picture already at the tower's size: [0, 1], CLIP's mean and std.
        captions = list(rows["caption"])
        negatives = rows.get("hard_negatives", np.zeros((len(captions), 0), str))
        ids = tokenize(tokenizer, captions + [str(text) for text in negatives.reshape(-1)])
        ids = trim_padding(ids, clip.config.text.eos_token_id)
        arrays = {"pixel_values": ((rows["image"] + 1) / 2 - mean) / std, "input_ids": ids[: len(captions)]}
        if negatives.size:
            arrays["negative_input_ids"] = ids[len(captions) :].reshape(*negatives.shape, -1)
            arrays["negative_valid"] = rows["hard_negative_valid"]
        if presence_weight:
            arrays["shapes_present"] = rows["shapes_present"]
        return arrays

    evaluate = evaluators.from_config(config, evaluators.Parts(batch, tokenizer, clip=clip))
    step = functools.partial(clip_step, settings=settings)
    return Task(params, tx, step, frozen, batch, samples=None, evaluate=evaluate)
