"""Prompts -> CLIP token ids, padded and truncated as Stable Diffusion pipelines do."""

from __future__ import annotations

import re
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


def span_token_weights(tokenizer: CLIPTokenizer, prompts: Sequence[str], spans_bg2: np.ndarray) -> np.ndarray:
    """Which tokens spell each character span: ``B`` prompts and ``(B, G, 2)`` spans ``[start, end)`` (``-1``
    pads) -> ``(B, G, model_max_length)`` float32 weights, each valid span's tokens averaged (summing to 1), zero
    rows for padding. A token belongs to a span when their characters overlap (the tokenizer's offsets)."""
    max_length = tokenizer.model_max_length
    spans = np.asarray(spans_bg2)
    weights = np.zeros((*spans.shape[:2], max_length), np.float32)
    for b, offsets in enumerate(tokenizer(list(prompts), return_offsets_mapping=True).offset_mapping):
        for g, (start, end) in enumerate(spans[b]):
            if start < 0:
                continue
            hits = [t for t, (s, e) in enumerate(offsets[:max_length]) if e > s and s < end and start < e]
            if not hits:
                raise ValueError(f"span {start}:{end} of {prompts[b]!r} has no token within the first {max_length}")
            weights[b, g, hits] = 1.0 / len(hits)
    return weights


def word_span(text: str, word: str) -> tuple[int, int] | None:
    """Character span ``[start, end)`` of ``word``'s first whole-word, case-insensitive occurrence in ``text`` (a
    ``word`` of several words matches across any whitespace), or ``None``."""
    parts = word.split()
    if not parts:
        return None
    pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, parts)) + r"(?!\w)"
    found = re.search(pattern, text, flags=re.IGNORECASE)
    return None if found is None else found.span()


def word_token_weights(tokenizer: CLIPTokenizer, prompt: str, words: Sequence[str]) -> np.ndarray:
    """Which tokens spell each word of ``prompt``: ``(W, model_max_length)`` float32, a word's tokens averaged
    (``word_span``, ``span_token_weights``). A word that is not in the prompt is a ``ValueError`` naming it."""
    spans = []
    for word in words:
        span = word_span(prompt, word)
        if span is None:
            raise ValueError(f"{word!r} is not a word of {prompt!r}")
        spans.append(span)
    return span_token_weights(tokenizer, [prompt], np.asarray([spans]).reshape(1, len(words), 2))[0]
