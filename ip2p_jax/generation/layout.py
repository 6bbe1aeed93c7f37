"""The released data set's layout, written pair by pair (``pairs``' module docstring shows it); a finished triple's
folder has ``metadata.jsonl``, written last, so a rerun skips it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ip2p_jax.generation.candidates import Candidate
from ip2p_jax.generation.triples import Triple

FINISHED = "metadata.jsonl"
SETTINGS_FILE = "generation.json"
# Config keys that change the pictures or the selection; a rerun into the same folder must not change them.
RESULT_SETTINGS = (
    "model",
    "clip",
    "resolution",
    "steps",
    "scheduler",
    "samples_per_triple",
    "max_kept",
    "p2p_min",
    "p2p_max",
    "cfg_min",
    "cfg_max",
    "clip_threshold",
    "clip_dir_threshold",
    "clip_img_threshold",
    "alignment",
    "cross_attention",
    "self_attention",
    "self_attention_max_size",
    "seed",
    "dtype",
)


def is_finished(out: Path, triple: Triple) -> bool:
    return (out / triple.name / FINISHED).is_file()


def _atomic_write(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def write_triple(out: Path, triple: Triple, candidates: Sequence[Candidate], kept: Sequence[Candidate], quality: int):
    """Writes a finished triple's folder: prompt, kept images, every candidate's scores, then ``metadata.jsonl``."""
    folder = out / triple.name
    folder.mkdir(parents=True, exist_ok=True)
    prompt = {"edit": triple.edit, "input": triple.input, "output": triple.output}
    (folder / "prompt.json").write_text(json.dumps(prompt))
    for candidate in kept:
        for role in (0, 1):
            Image.fromarray(candidate.images[role]).save(folder / f"{candidate.seed}_{role}.jpg", quality=quality)
    kept_seeds = {c.seed for c in kept}
    scores = "".join(json.dumps(c.record(kept=c.seed in kept_seeds)) + "\n" for c in candidates)
    (folder / "scores.jsonl").write_text(scores)
    _atomic_write(folder / FINISHED, "".join(json.dumps(c.record()) + "\n" for c in kept))


def write_candidate(out: Path, triple: Triple, candidate: Candidate, images: np.ndarray) -> None:
    """Writes one candidate's two pictures ``(2, H, W, 3)`` losslessly to ``NAME/candidates/`` (to judge what
    the filter keeps and drops)."""
    folder = out / triple.name / "candidates"
    folder.mkdir(parents=True, exist_ok=True)
    for role in (0, 1):
        Image.fromarray(images[role]).save(folder / f"{candidate.seed}_{role}.png")


def kept_seeds(out: Path, name: str) -> list[str]:
    """The kept seeds of a finished triple's folder, as strings (as the released ``seeds.json``)."""
    lines = (out / name / FINISHED).read_text().splitlines()
    return [str(json.loads(line)["seed"]) for line in lines if line.strip()]


def write_seeds_json(out: Path) -> int:
    """``seeds.json`` from every finished folder that kept a pair, sorted by name (the reference's
    ``prepare_dataset.py``). Returns the number of triples listed."""
    entries = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and (p / FINISHED).is_file()):
        seeds = kept_seeds(out, folder.name)
        if seeds:
            entries.append([folder.name, seeds])
    _atomic_write(out / "seeds.json", json.dumps(entries))
    return len(entries)


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Records the result-deciding settings in ``OUT/generation.json``, or checks that a rerun uses the same."""
    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(f"{out} was generated with other settings ({details}); write to a new folder")
        return
    _atomic_write(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
