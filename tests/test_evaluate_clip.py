"""The CLIP trade-off curve (IP2P's figure 8): reading the held-out edits, the sweep's averages, the table and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.evaluation.clip_tradeoff import (
    clip_scores,
    load_edit_examples,
    markdown_table,
    sweep,
    write_results,
)
from ip2p_jax.random_models import tiny_clip

ROOT = Path(__file__).parents[1]
CAPTIONS = [("a photo of a cat", "a photo of a dog"), ("a red car", "a blue car"), ("a house", "a house in snow")]


def released_layout(root: Path, count: int) -> Path:
    """``count`` prompts in the released layout, two seeds each, 24 px pictures."""
    seeds = []
    rng = np.random.default_rng(0)
    for index in range(count):
        name = f"{index:07d}"
        (root / name).mkdir(parents=True)
        source, target = CAPTIONS[index % len(CAPTIONS)]
        prompt = {"edit": f"edit {index}", "input": source, "output": target}
        (root / name / "prompt.json").write_text(json.dumps(prompt))
        for seed in (100 + index, 200 + index):
            for role in (0, 1):
                pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / name / f"{seed}_{role}.jpg", quality=100)
        seeds.append([name, [str(100 + index), str(200 + index)]])
    (root / "seeds.json").write_text(json.dumps(seeds))
    return root


def test_examples_are_the_split_of_seeds_json(tmp_path):
    folder = released_layout(tmp_path / "data", 20)
    test = load_edit_examples(folder, "test")  # the builder's slice [19, 20)
    assert [(e.name, e.seed, e.instruction) for e in test] == [("0000019", "119", "edit 19")]
    assert (test[0].input_caption, test[0].output_caption) == CAPTIONS[19 % 3]
    np.testing.assert_array_equal(test[0].image, np.asarray(Image.open(folder / "0000019" / "119_0.jpg")))
    train = load_edit_examples(folder, "train", limit=5, resolution=16)
    assert [e.name for e in train] == [f"{i:07d}" for i in range(5)] and train[0].image.shape == (16, 16, 3)
    with pytest.raises(ValueError, match="split must be one of"):
        load_edit_examples(folder, "val")
    with pytest.raises(FileNotFoundError, match="has no seeds.json"):
        load_edit_examples(tmp_path)
    (folder / "0000019" / "prompt.json").write_text(json.dumps({"edit": "x"}))
    with pytest.raises(ValueError, match=r"lacks \['input', 'output'\]"):
        load_edit_examples(folder, "test")
    small = released_layout(tmp_path / "small", 2)
    with pytest.raises(ValueError, match="the validation split of .* holds no edits"):
        load_edit_examples(small, "validation")


class BlendingEditor:
    """A stand-in pipeline: the edit blends the input's negative towards the input, ``w = (s_I - 1) / 1.2``, so at
    ``s_I = 2.2`` it returns the input itself. Records the scale, seed and size of every call."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def edit(images_01: np.ndarray, scale: float) -> np.ndarray:
        weight = (scale - 1.0) / 1.2
        return images_01 if weight == 1.0 else (1.0 - weight) * (1.0 - images_01) + weight * images_01

    def __call__(self, images, prompts, *, image_guidance_scale, seed, output_type, **kwargs):
        assert output_type == "np" and len(images) == len(prompts)
        self.calls.append((image_guidance_scale, seed, len(images)))
        edited = self.edit(np.stack(images).astype(np.float32) / 255.0, image_guidance_scale)
        return type("Output", (), {"images": edited})


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip-vocab"), seed=0)


def test_sweep_averages_the_clip_scores_of_each_scale(clip, tmp_path):
    examples = load_edit_examples(released_layout(tmp_path / "data", 20), "train", limit=5, resolution=32)
    editor = BlendingEditor()
    scales = (1.0, 1.6, 2.2)
    rows = sweep(editor, *clip, examples, scales, guidance_scale=7.5, batch_size=2, progress=False)
    # Every scale edits the same batches with the same seeds.
    assert editor.calls == [(s, seed, n) for s in scales for seed, n in ((0, 2), (2, 2), (4, 1))]
    assert [r["image_guidance_scale"] for r in rows] == list(scales) and all(r["num_samples"] == 5 for r in rows)
    inputs = np.stack([e.image for e in examples]).astype(np.float32) / 255.0
    for row, scale in zip(rows, scales, strict=True):
        edited = BlendingEditor.edit(inputs, scale)
        captions = [e.input_caption for e in examples], [e.output_caption for e in examples]
        expected = clip_scores(*clip, inputs, edited, *captions)
        for name, values in expected.items():
            assert row[name] == pytest.approx(float(np.mean(values)), rel=1e-5, abs=1e-6), (scale, name)
    # Known answers at s_I = 2.2, where the "edit" is the input itself: the same image, and no change at all.
    assert rows[-1]["clip_sim_image"] == pytest.approx(1.0, abs=1e-6)
    assert rows[-1]["clip_sim_dir"] == 0.0
    assert rows[0]["clip_sim_image"] < 1.0 - 1e-3
    assert len({round(r["clip_sim_0"], 6) for r in rows}) == 1  # the input against its caption: fixed


def test_table_and_plot_are_written(tmp_path):
    common = dict(guidance_scale=7.5, clip_sim_0=0.24, num_samples=2000)
    rows = [
        dict(image_guidance_scale=1.0, clip_sim_image=0.75, clip_sim_dir=0.21, clip_sim_1=0.25, **common),
        dict(image_guidance_scale=1.2, clip_sim_image=0.8125, clip_sim_dir=0.18, clip_sim_1=0.245, **common),
    ]
    assert markdown_table(rows).splitlines() == [
        "| s_I | s_T | CLIP image similarity | directional similarity | CLIP(x1, c1) | CLIP(x0, c0) | edits |",
        "|---|---|---|---|---|---|---|",
        "| 1.00 | 7.50 | 0.7500 | 0.2100 | 0.2500 | 0.2400 | 2000 |",
        "| 1.20 | 7.50 | 0.8125 | 0.1800 | 0.2450 | 0.2400 | 2000 |",
    ]
    paths = write_results(rows, tmp_path / "out", title="test curve")
    assert paths["md"].read_text().startswith("# test curve\n\n| s_I |")
    assert [json.loads(line) for line in paths["jsonl"].read_text().splitlines()] == rows
    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300


@pytest.mark.slow
def test_cli_tiny_config(tmp_path):
    """evaluate_clip.py on the tiny config: a random IP2P model built in code, edits of a small folder."""
    folder = released_layout(tmp_path / "data", 20)
    command = [
        sys.executable,
        str(ROOT / "evaluate_clip.py"),
        "--config",
        str(ROOT / "configs/evaluate_clip.py:tiny"),
        f"--config.data={folder}",
        "--config.split=train",
        "--out",
        str(tmp_path / "out"),
        "--noprogress",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "clip_tradeoff.jsonl").read_text().splitlines()]
    assert [r["image_guidance_scale"] for r in rows] == [1.0, 1.6, 2.2] and rows[0]["num_samples"] == 4
    assert "| 2.20 | 7.50 |" in result.stdout and (tmp_path / "out" / "clip_tradeoff.png").is_file()
    command[4] = "--config.data=/nonexistent"
    missing = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "has no seeds.json" in missing.stderr


def test_shapes_edit_examples_carry_the_caption_triples(tmp_path):
    from ip2p_jax.data.shapes_edit import ShapesEditConfig, draw, draw_captions
    from ip2p_jax.evaluation.clip_tradeoff import load_shapes_edit_examples

    examples = load_shapes_edit_examples("shapes_edit/small", "test_single", 3, str(tmp_path / "tfds"))
    config = ShapesEditConfig(name="small", num_train=64, num_test=8)
    assert len(examples) == 3
    for example in examples:  # the builder keeps its own order: find each by its picture
        index = next(i for i in range(8) if np.array_equal(draw(config, "test_single", i).input_image, example.image))
        drawn = draw(config, "test_single", index)
        assert (example.input_caption, example.output_caption) == draw_captions(config, "test_single", index, drawn)
        assert example.instruction == drawn.instruction
    with pytest.raises(ValueError, match="split must be one of"):
        load_shapes_edit_examples("shapes_edit/small", "test", 1, str(tmp_path / "tfds"))


@pytest.mark.slow
def test_cli_shapes_config_scores_the_shipped_model_with_the_lineage_clip(tmp_path):
    settings = [
        f"--config.data_dir={tmp_path / 'tfds'}",
        "--config.num_samples=2",
        "--config.steps=2",
        "--config.image_guidance_scales=(1.0, 2.0)",
        "--config.data=shapes_edit/small",
    ]
    config = str(ROOT / "configs/evaluate_clip.py:shapes")
    command = [sys.executable, str(ROOT / "evaluate_clip.py"), "--config", config, *settings]
    command += ["--out", str(tmp_path / "out"), "--noprogress"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "clip_tradeoff.jsonl").read_text().splitlines()]
    assert [r["image_guidance_scale"] for r in rows] == [1.0, 2.0] and rows[0]["num_samples"] == 2
    assert all(-1.0 <= r["clip_sim_dir"] <= 1.0 and 0.0 < r["clip_sim_image"] <= 1.0 for r in rows)
