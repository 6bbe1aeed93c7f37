"""TFDS builders for editing pairs (released layout, JSONL / parquet manifests) and the training input pipeline."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ip2p_jax.data import edit_datasets  # noqa: F401  (registers the builders)
from ip2p_jax.data.input_pipeline import Augmentation, prepared_builder, tfds_batches

SIZE = 24  # pixels of the fixture images


def picture(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth random picture (JPEG keeps it recognisable) ``(size, size, 3)`` uint8."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def original_layout(tmp_path_factory):
    """20 prompts (the first two with two seeds), one corrupt image, one prompt without prompt.json."""
    root = tmp_path_factory.mktemp("original")
    seeds = []
    for index in range(20):
        name, prompt_seeds = f"prompt{index:02d}", [10 * index + 1] + ([10 * index + 2] if index < 2 else [])
        folder = root / name
        folder.mkdir()
        seeds.append([name, prompt_seeds])
        if index != 5:
            (folder / "prompt.json").write_text(json.dumps({"input": "x", "edit": f"edit {name}", "output": "y"}))
        for seed in prompt_seeds:
            Image.fromarray(picture(seed)).save(folder / f"{seed}_0.jpg")
            Image.fromarray(255 - picture(seed)).save(folder / f"{seed}_1.jpg")
    (root / "prompt01" / "12_1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "seeds.json").write_text(json.dumps(seeds))
    return root


@pytest.fixture(scope="module")
def original_builder(original_layout, tmp_path_factory):
    return prepared_builder("ip2p_original", str(tmp_path_factory.mktemp("tfds")), str(original_layout), prepare=True)


def test_original_layout_splits_and_skips(original_builder, original_layout):
    splits = original_builder.info.splits
    # The reference's contiguous splits of the 20 prompts: [0, 18), [18, 19), [19, 20); prompt00 has 2 seeds,
    # prompt01's second pair is corrupt and prompt05 has no prompt.json.
    assert math.floor(0.9 * 20) == 18 and math.floor(0.95 * 20) == 19
    assert (splits["train"].num_examples, splits["validation"].num_examples, splits["test"].num_examples) == (18, 1, 1)
    metadata = original_builder.info.metadata
    assert metadata["skipped"] == 2
    reasons = " ".join(metadata["skipped_examples"])
    assert "prompt01/12" in reasons and "12_1.jpg: not a readable image" in reasons
    assert "prompt05/51" in reasons and "prompt.json" in reasons
    raw = {"input_image": tfds.decode.SkipDecoding(), "edited_image": tfds.decode.SkipDecoding()}
    (example,) = tfds.as_numpy(original_builder.as_dataset(split="test", decoders=raw))
    assert example["instruction"].decode() == "edit prompt19"
    # The JPEG files are stored as they were, not decoded and encoded again.
    assert example["input_image"] == (original_layout / "prompt19" / "191_0.jpg").read_bytes()
    assert example["edited_image"] == (original_layout / "prompt19" / "191_1.jpg").read_bytes()


def test_original_layout_of_few_prompts_leaves_out_its_empty_splits(original_layout, tmp_path):
    """8 prompts: the reference's boundaries give [0, 7), [7, 7) and [7, 8); the empty validation split is left out
    (TFDS cannot write one) and the others are built."""
    small = tmp_path / "small"
    small.mkdir()
    seeds = json.loads((original_layout / "seeds.json").read_text())[10:18]
    for name, _ in seeds:
        (small / name).symlink_to(original_layout / name)
    (small / "seeds.json").write_text(json.dumps(seeds))
    builder = prepared_builder("ip2p_original", str(tmp_path / "tfds"), str(small), prepare=True)
    splits = builder.info.splits
    assert sorted(splits) == ["test", "train"]
    assert (splits["train"].num_examples, splits["test"].num_examples) == (7, 1)


def test_original_layout_without_seeds_json_is_an_error(tmp_path):
    with pytest.raises(Exception, match="no seeds.json"):
        prepared_builder("ip2p_original", str(tmp_path / "tfds"), str(tmp_path), prepare=True)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def manifest_builder(tmp_path_factory):
    """A JSONL manifest with relative paths (one line not JSON, one row without edit_prompt, one missing file) and
    a parquet export with images as Hugging Face ``datasets`` writes them (an RGBA PNG among them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("manifest")
    (root / "images").mkdir()
    lines = []
    for index in range(6):
        Image.fromarray(picture(100 + index)).save(root / "images" / f"{index}_in.png")
        Image.fromarray(255 - picture(100 + index)).save(root / "images" / f"{index}_out.png")
        lines.append(
            json.dumps(
                {
                    "input_image": f"images/{index}_in.png",
                    "edit_prompt": f"jsonl {index}",
                    "edited_image": f"images/{index}_out.png",
                }
            )
        )
    lines[2] = json.dumps({"input_image": "images/2_in.png", "edited_image": "images/2_out.png"})
    lines[4] = lines[4].replace("4_out.png", "missing.png")
    lines.insert(3, "{not json")
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    rgba = np.concatenate([picture(200), np.full((SIZE, SIZE, 1), 255, np.uint8)], axis=-1)
    rows = [
        {
            "input_image": {"bytes": _png_bytes(rgba if index == 0 else picture(200 + index)), "path": None},
            "edit_prompt": f"parquet {index}",
            "edited_image": {"bytes": _png_bytes(255 - picture(200 + index)), "path": None},
        }
        for index in range(4)
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "pairs.parquet")
    return prepared_builder("ip2p_manifest", str(tmp_path_factory.mktemp("tfds")), str(root), prepare=True)


def test_manifest_rows_are_read_and_bad_rows_skipped(manifest_builder):
    examples = list(tfds.as_numpy(manifest_builder.as_dataset(split="train")))
    instructions = sorted(e["instruction"].decode() for e in examples)
    assert instructions == ["jsonl 0", "jsonl 1", "jsonl 3", "jsonl 5"] + [f"parquet {i}" for i in range(4)]
    assert manifest_builder.info.metadata["skipped"] == 3
    reasons = " ".join(manifest_builder.info.metadata["skipped_examples"])
    assert "is not JSON" in reasons and "missing ['edit_prompt']" in reasons and "missing.png" in reasons
    by_name = {e["instruction"].decode(): e for e in examples}
    np.testing.assert_array_equal(by_name["parquet 0"]["input_image"], picture(200))  # RGBA -> RGB
    np.testing.assert_array_equal(by_name["jsonl 5"]["edited_image"], 255 - picture(105))


AUGMENTATION = Augmentation(resize_min=SIZE, resize_max=SIZE + 8, crop=16, flip_prob=0.5)


def _take(builder, count, **kwargs):
    settings = dict(split="train", batch_size=4, seed=3, augmentation=AUGMENTATION) | kwargs
    stream = tfds_batches(builder, **settings)
    return [next(stream) for _ in range(count)]


@pytest.mark.parametrize("name", ["original", "manifest"])
def test_batches_are_augmented_pairs(name, original_builder, manifest_builder):
    builder = {"original": original_builder, "manifest": manifest_builder}[name]
    for batch in _take(builder, 3):
        assert batch["input_image"].shape == (4, 16, 16, 3) and batch["input_image"].dtype == np.float32
        assert batch["edited_image"].shape == (4, 16, 16, 3) and batch["instruction"].shape == (4,)
        assert batch["input_image"].min() >= -1.0 and batch["input_image"].max() <= 1.0
        if name == "manifest":
            # Lossless PNGs with edited = 255 - input: the same resize, crop and flip give edited = -input.
            np.testing.assert_allclose(batch["edited_image"], -batch["input_image"], atol=1e-5)


def test_stream_is_reproducible_resumable_and_split_over_hosts(manifest_builder):
    first, again = _take(manifest_builder, 4), _take(manifest_builder, 4)
    resumed = _take(manifest_builder, 2, position=2)
    for a, b in zip(first, again, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(first[2:], resumed, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(first[0]["input_image"], _take(manifest_builder, 1, seed=4)[0]["input_image"])
    # Two hosts read disjoint halves of the split (4 examples each); together they cover it.
    seen = [
        {
            text
            for batch in _take(manifest_builder, 4, process_index=i, process_count=2)
            for text in batch["instruction"]
        }
        for i in range(2)
    ]
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]


def test_identity_augmentation_and_flip(manifest_builder):
    """No resize and no crop leave the picture as it was; flip_prob 1 mirrors what flip_prob 0 gives."""
    plain = Augmentation(SIZE, SIZE, SIZE, 0.0)
    batch = _take(manifest_builder, 1, augmentation=plain, batch_size=8)[0]
    examples = {e["instruction"].decode(): e for e in tfds.as_numpy(manifest_builder.as_dataset(split="train"))}
    for name, image in zip(batch["instruction"], batch["input_image"], strict=True):
        np.testing.assert_allclose(image, examples[name]["input_image"] / 127.5 - 1.0, atol=1e-5)
    flipped = _take(manifest_builder, 1, augmentation=Augmentation(SIZE, SIZE + 8, 16, 1.0))[0]
    unflipped = _take(manifest_builder, 1, augmentation=Augmentation(SIZE, SIZE + 8, 16, 0.0))[0]
    np.testing.assert_array_equal(flipped["input_image"], unflipped["input_image"][:, :, ::-1])


def test_bad_settings_are_errors(tmp_path):
    with pytest.raises(ValueError, match="crop <= resize_min"):
        Augmentation(resize_min=200, resize_max=300, crop=256)
    with pytest.raises(ValueError, match="unknown data set"):
        prepared_builder("laion", None, None, prepare=False)
    with pytest.raises(FileNotFoundError, match="give manual_dir"):
        prepared_builder("ip2p_manifest", str(tmp_path), None, prepare=False)
