"""Prompts -> CLIP token ids, padded and truncated as Stable Diffusion pipelines do."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from transformers import CLIPTokenizer


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> np.ndarray:
    """``B`` prompts -> ``(B, model_max_length)`` int32 ids (77 for CLIP), padded to full length.

    CLIP's positions end at ``model_max_length``: a longer prompt is truncated, as diffusers does, with a
    warning that names it and says how many tokens it had.
    """
    if isinstance(prompts, str):
        raise TypeError("tokenize takes a sequence of prompts, not one string")
    max_length = tokenizer.model_max_length
    for prompt, ids in zip(prompts, tokenizer(list(prompts)).input_ids, strict=True):
        if len(ids) > max_length:
            warnings.warn(
                f"prompt {prompt!r} has {len(ids)} tokens; CLIP reads {max_length}: truncated",
                stacklevel=2,
            )
    encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True)
    return np.asarray(encoded.input_ids, dtype=np.int32)
