"""CLIP text as tokens: prompts -> token ids, padded and truncated as Stable Diffusion pipelines do; words ->
their tokens; and a small CLIP BPE vocabulary over chosen words, for offline tests, benchmarks and models trained
here."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------- a small vocabulary


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (GPT-2's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def write_clip_vocab(folder: Path, words: Iterable[str]) -> Path:
    """Writes ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a small CLIP BPE tokenizer.

    Every byte is a token (so any text encodes), and each of ``words`` becomes one token through a chain of
    merges. Loadable with ``transformers.CLIPTokenizer.from_pretrained(folder)``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
