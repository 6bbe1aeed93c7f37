"""A small CLIP BPE vocabulary over chosen words: for offline tests, benchmarks and models trained here."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


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
