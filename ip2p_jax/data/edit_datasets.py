"""TFDS builders for instruction-editing pairs: ``input_image``, ``edited_image``, ``instruction``.

* ``ip2p_original``: the InstructPix2Pix data set as released (``clip-filtered-dataset`` / ``random-sample-dataset``),
  given as the manual dir: ``seeds.json`` lists ``[name, [seed, ...]]`` per prompt, and each ``name/`` folder holds
  ``prompt.json`` (the instruction is its ``"edit"``) and ``{seed}_0.jpg`` / ``{seed}_1.jpg``. The splits are the
  reference's: contiguous ranges of ``seeds.json`` at fractions 0.9 / 0.05 / 0.05 (``floor(f * len)`` boundaries);
  a split those boundaries leave empty (a data set of fewer than 20 prompts) is left out, as TFDS cannot write one.
  Every seed of a prompt becomes one example; the reference instead draws one of a prompt's seeds each time it
  visits the prompt, so prompts with many seeds weigh more here than there.
* ``ip2p_manifest``: every ``*.jsonl`` and ``*.parquet`` file of the manual dir, rows with ``input_image``,
  ``edit_prompt``, ``edited_image`` (the columns of the Hugging Face exports of the data set). An image is a path
  (relative to its manifest's folder, or absolute), raw bytes, or a ``{"bytes": ..., "path": ...}`` record as
  Hugging Face ``datasets`` writes images to parquet. One ``train`` split.

An example whose files are missing, unreadable or not images is skipped, never fatal: the count and the first
few reasons are logged and stored in the data set's metadata (``skipped``, ``skipped_examples``).

    builder = tfds.builder("ip2p_original", data_dir=DATA)     # after importing this module
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=FOLDER))
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

SPLIT_FRACTIONS = {"train": (0.0, 0.9), "validation": (0.9, 0.95), "test": (0.95, 1.0)}
_KEEP_REASONS = 20  # skipped examples named in the metadata; the count covers all of them


class UnreadableExample(ValueError):
    """An example that cannot be used: a missing or corrupt file, a malformed record."""


def image_bytes(source: Any, root: Path) -> bytes | np.ndarray:
    """The encoded bytes of a JPEG / PNG RGB image, passed on untouched (no re-encoding), or the decoded RGB image
    as a ``(H, W, 3)`` uint8 array for anything else (TFDS then stores it as PNG). Raises ``UnreadableExample``."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    where = "inline image bytes"
    if isinstance(source, str):
        path = Path(source) if Path(source).is_absolute() else root / source
        where = str(path)
        try:
            source = path.read_bytes()
        except OSError as error:
            raise UnreadableExample(f"{path}: {error.strerror or error}") from error
    if not isinstance(source, bytes | bytearray):
        raise UnreadableExample(f"not an image path or bytes: {type(source).__name__}")
    try:
        image = Image.open(io.BytesIO(source))
        image_format, mode = image.format, image.mode
        image.load()  # decodes every pixel: truncated and corrupt files fail here
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableExample(f"{where}: not a readable image ({type(error).__name__})") from error
    if image_format in ("JPEG", "PNG") and mode == "RGB":
        return bytes(source)
    return np.asarray(image.convert("RGB"))


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "input_image": tfds.features.Image(shape=(None, None, 3)),
            "edited_image": tfds.features.Image(shape=(None, None, 3)),
            "instruction": tfds.features.Text(),
        }
    )


class _EditPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What both builders share: the features and skipping (and counting) unreadable examples."""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=_features(), metadata=tfds.core.MetadataDict())

    def _skipping(self, candidates: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, dict]]:
        """Runs each candidate (a key and a function building the example); unreadable ones are counted."""
        skipped: list[str] = []
        for key, build in candidates:
            try:
                yield key, build()
            except UnreadableExample as error:
                skipped.append(f"{key}: {error}")
        metadata = self.info.metadata
        metadata["skipped"] = metadata.get("skipped", 0) + len(skipped)
        kept = metadata.get("skipped_examples", [])
        metadata["skipped_examples"] = (kept + skipped)[:_KEEP_REASONS]
        if skipped:
            logging.warning("%s: skipped %d unreadable examples, first: %s", self.name, len(skipped), skipped[:3])


class Ip2pOriginal(_EditPairs):
    """The InstructPix2Pix data set in its released folder layout (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Give the folder of the released data set (the one holding seeds.json) as the manual dir."
    )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        seeds_file = root / "seeds.json"
        if not seeds_file.is_file():
            raise FileNotFoundError(f"{root} has no seeds.json: not the InstructPix2Pix data set layout")
        prompts = json.loads(seeds_file.read_text())
        splits = {}
        for split, (start, stop) in SPLIT_FRACTIONS.items():
            first, last = math.floor(start * len(prompts)), math.floor(stop * len(prompts))
            if last > first:
                splits[split] = self._generate_examples(root, prompts[first:last])
        return splits

    def _generate_examples(self, root: Path, prompts: list):
        def candidates():
            for name, seeds in prompts:
                folder = root / name
                for seed in seeds:
                    yield f"{name}/{seed}", lambda folder=folder, seed=seed: _original_example(folder, seed)

        yield from self._skipping(candidates())


def _original_example(folder: Path, seed: int) -> dict:
    try:
        instruction = json.loads((folder / "prompt.json").read_text())["edit"]
    except (OSError, ValueError, KeyError) as error:
        raise UnreadableExample(f"{folder / 'prompt.json'}: no readable 'edit' ({error})") from error
    return {
        "input_image": image_bytes(f"{seed}_0.jpg", folder),
        "edited_image": image_bytes(f"{seed}_1.jpg", folder),
        "instruction": instruction,
    }


class Ip2pManifest(_EditPairs):
    """Editing pairs listed in JSONL or parquet files (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Give a folder of *.jsonl / *.parquet files with input_image, edit_prompt, edited_image as the manual dir."
    )
    COLUMNS = ("input_image", "edit_prompt", "edited_image")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        files = sorted([*root.glob("*.jsonl"), *root.glob("*.parquet")])
        if not files:
            raise FileNotFoundError(f"{root} holds no *.jsonl or *.parquet manifest")
        return {"train": self._generate_examples(files)}

    def _generate_examples(self, files: list[Path]):
        def candidates():
            for file in files:
                for index, row in enumerate(_manifest_rows(file)):
                    yield f"{file.name}/{index}", lambda row=row, root=file.parent: _manifest_example(row, root)

        yield from self._skipping(candidates())


def _manifest_rows(file: Path) -> Iterator[Any]:
    """The rows of a JSONL file (a line that is not JSON becomes an error record) or a parquet file."""
    if file.suffix == ".jsonl":
        with file.open() as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        yield UnreadableExample(f"line {number} is not JSON ({error})")
        return
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(file).iter_batches(batch_size=64):
        yield from batch.to_pylist()


def _manifest_example(row: Any, root: Path) -> dict:
    if isinstance(row, UnreadableExample):
        raise row
    missing = [c for c in Ip2pManifest.COLUMNS if not isinstance(row, dict) or row.get(c) is None]
    if missing:
        raise UnreadableExample(f"missing {missing}")
    if not isinstance(row["edit_prompt"], str):
        raise UnreadableExample("edit_prompt is not text")
    return {
        "input_image": image_bytes(row["input_image"], root),
        "edited_image": image_bytes(row["edited_image"], root),
        "instruction": row["edit_prompt"],
    }
