"""sample.py end to end on the tiny model, and its error paths (and evaluate.py's for FoI settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from ip2p_jax import compilation_cache

ROOT = Path(__file__).resolve().parent.parent

LONG = " ".join(["make the sky blue and"] * 20) + " red"  # about 100 tokens


def write_image(path, size):
    Image.fromarray(np.random.RandomState(size).randint(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


FAST = ["--config.sample.steps=2", "--config.sample.scheduler=euler"]


def test_manifest_skips_bad_items_and_runs_the_rest(pipeline_dir, tmp_path, capsys):
    write_image(tmp_path / "good.png", 64)
    write_image(tmp_path / "wide.png", 72)
    write_image(tmp_path / "small.png", 48)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [
        {"image": "good.png", "instruction": "make the sky blue", "out": "a.png"},
        {"image": "wide.png", "instruction": LONG, "out": "b.png"},
        {"image": "missing.png", "instruction": "make it red", "out": "c.png"},
        {"image": "small.png", "instruction": "make it red", "out": "d.png"},
        {"image": "good.png", "instruction": "  ", "out": "e.png"},
        {"image": "broken.png", "instruction": "make it red", "out": "f.png"},
        {"image": "good.png", "out": "g.png"},
    ]
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    with pytest.warns(UserWarning, match="CLIP reads 77: truncated"):
        code = sample.main(["--model", str(pipeline_dir), "--manifest", str(manifest), "--grid"] + FAST)
    err = capsys.readouterr().err
    assert code == 1
    assert Image.open(tmp_path / "a.png").size == (64, 64) and Image.open(tmp_path / "b.png").size == (72, 72)
    assert Image.open(tmp_path / "a.grid.png").size == (128, 64)  # input | output
    assert not any((tmp_path / name).exists() for name in ("c.png", "d.png", "e.png", "f.png", "g.png"))
    for message in (
        "edits.jsonl:3: image " + str(tmp_path / "missing.png") + " does not exist",
        "edits.jsonl:4: image " + str(tmp_path / "small.png") + " is 48x48 px, under 64 px",
        "edits.jsonl:5: the instruction is empty",
        "edits.jsonl:6: cannot read image",
        "edits.jsonl:7: needs string fields image, instruction, out",
        "edits.jsonl:8: not JSON",
    ):
        assert message in err, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--config.sample.scheduler=heun", "--manifest", "x.jsonl"], "scheduler must be one of"),
        (["--image", "a.png"], "give --image, --instruction and --out, or --manifest"),
        (["--manifest", "x.jsonl", "--config.sample.strength=0"], "--config.sample.strength must be in (0, 1]"),
        (["--manifest", "x.jsonl", "--config.foi.tau=2"], "tau must be in [0, 1], or a (low, high) range"),
        (
            ["--manifest", "x.jsonl", "--config.foi.tau=0.7,0.4"],
            "tau must be a (low, high) range with 0 <= low <= high",
        ),
        (["--manifest", "x.jsonl", "--config.foi.tau=half"], "--config.foi: tau must be in [0, 1], or a (low, high)"),
        (["--manifest", "x.jsonl", "--config.foi.gamma=-1"], "gamma must be an integer >= 0, got -1"),
        (["--manifest", "x.jsonl", "--config.foi.mask_downsample=3"], "mask_downsample must be a power of two >= 1"),
        (["--manifest", "x.jsonl", "--config.foi.mask_step=-2"], "mask_step must be an integer >= 0, got -2"),
        (["--manifest", "x.jsonl", "--config.foi.modulation_stop=2"], "modulation_stop must be in [0, 1], got 2.0"),
        (["--manifest", "x.jsonl", "--config.foi.decoupled_fraction=-1"], "decoupled_fraction must be in [0, 1]"),
        (["--manifest", "x.jsonl", "--config.sample.guidance_rescale=1.5"], "guidance_rescale must be in [0, 1]"),
        (["--manifest", "x.jsonl", "--config.foi.gama=1"], "has no setting 'gama'"),
        (["--manifest", "x.jsonl", "--config.sample.steps=many"], "--config.sample.steps=many: invalid literal"),
        (["--manifest", "x.jsonl", "--steps", "2"], "unexpected argument '--steps'"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_attention_backend_is_a_clear_error(tmp_path, capsys):
    image = write_image(tmp_path / "in.png", 64)
    argv = ["--config.sample.attention_backend=flash", "--image", str(image), "--instruction", "x"]
    assert sample.main(argv + ["--out", str(tmp_path / "o")]) == 1
    assert "error: --config.sample.attention_backend: attention backend must be one of" in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    image = write_image(tmp_path / "in.png", 64)
    argv = ["--model", str(tmp_path / "nope"), "--image", str(image), "--instruction", "x"]
    with pytest.raises(SystemExit) as exit_info:  # a usage error, before anything is loaded
        sample.main(argv + ["--out", str(tmp_path / "o.png")])
    assert exit_info.value.code == 2
    assert f"error: --model: no such folder: {tmp_path / 'nope'}" in capsys.readouterr().err


@pytest.mark.slow
def test_foi_edit_from_the_command_line_with_a_comparison_grid(pipeline_dir, tmp_path):
    image = write_image(tmp_path / "in.png", 64)
    out = tmp_path / "out" / "edited.png"
    argv = ["--model", str(pipeline_dir), "--image", str(image), "--out", str(out), "--config.foi.mask_downsample=2"]
    argv += ["--instruction", "make the sky blue", "--keyword", "sky"]
    argv += ["--instruction", "turn the cat red", "--keyword", "cat", "--alpha", "1", "--alpha", "1.5"]
    assert sample.main(argv + FAST + ["--compare", "--attention", "cat,sky"]) == 0
    assert Image.open(out).size == (64, 64)
    # One row per keyword, as asked: its map over the input and the edit, and its mask (each 64 px tile at 256 px).
    attention = Image.open(out.with_suffix(".attention.png"))
    assert attention.size == (96 + 3 * 256, 2 * 256)
    # input | two masks | IP2P | FoI, each 64 px picture enlarged 4x (nearest neighbour)
    comparison = Image.open(out.with_suffix(".compare.png"))
    assert comparison.size == (5 * 256, 256)
    np.testing.assert_array_equal(np.asarray(comparison)[::4, 4 * 256 :: 4], np.asarray(Image.open(out)))  # FoI


def test_foi_keyword_errors_are_reported_per_item(pipeline_dir, tmp_path, capsys):
    write_image(tmp_path / "in.png", 64)
    line = {"image": "in.png", "out": "bad.png", "instructions": [{"text": "make the sky blue", "keyword": "dog"}]}
    manifest = tmp_path / "foi.jsonl"
    manifest.write_text(json.dumps(line) + "\n")
    code = sample.main(["--model", str(pipeline_dir), "--manifest", str(manifest)] + FAST)
    assert code == 1 and "foi.jsonl:1: keyword 'dog' does not occur in sub-instruction 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.slow
def test_a_manifest_edits_each_item_in_its_own_mode_as_it_would_alone(pipeline_dir, tmp_path, capsys):
    write_image(tmp_path / "in.png", 64)
    foi_item = {"image": "in.png", "out": "foi.png", "instructions": [{"text": "turn the cat red", "keyword": "cat"}]}
    plain_item = {"image": "in.png", "instruction": "make the sky blue", "out": "plain.png"}
    missing = {"image": "missing.png", "instruction": "make it red", "out": "x.png"}
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in (foi_item, plain_item, missing)) + "\n")
    common = ["--model", str(pipeline_dir), "--config.foi.mask_downsample=2", "--no-progress"]
    common += ["--compilation-cache", str(tmp_path / "cache")] + FAST  # the runs alone read the batch's programs
    assert sample.main(["--manifest", str(manifest)] + common) == 1
    err = capsys.readouterr().err
    assert "editing 2 image(s) (1 with FoI, 1 with IP2P)" in err
    # The failures again at the end, after the edits.
    assert err.rstrip().endswith(
        f"1 of 3 item(s) failed:\n  {manifest}:3: image {tmp_path / 'missing.png'} does not exist"
    )
    alone = ["--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "alone.png")]
    for item, subs in (
        (plain_item, ["--instruction", "make the sky blue"]),
        (foi_item, ["--instruction", "turn the cat red", "--keyword", "cat"]),
    ):
        assert sample.main(alone + subs + common) == 0
        batch, single = Image.open(tmp_path / item["out"]), Image.open(tmp_path / "alone.png")
        np.testing.assert_array_equal(np.asarray(batch), np.asarray(single))


def test_attention_words_are_checked_before_any_edit(pipeline_dir, tmp_path, capsys):
    image = write_image(tmp_path / "in.png", 64)
    out = tmp_path / "o.png"
    argv = ["--model", str(pipeline_dir), "--image", str(image), "--out", str(out)] + FAST
    assert sample.main(argv + ["--instruction", "make the sky blue", "--keyword", "sky", "--attention", "blue"]) == 1
    err = capsys.readouterr().err
    assert "error: --image: --attention blue: FoI shows keywords, and these are ['sky']" in err
    assert "editing" not in err and not out.exists()
    assert sample.main(argv + ["--instruction", "make the sky blue", "--attention", "cat"]) == 1  # IP2P
    err = capsys.readouterr().err
    assert "error: --image:" in err and "cat" in err and "editing" not in err and not out.exists()


def test_keyword_count_must_match(capsys):
    with pytest.raises(SystemExit):
        sample.main(
            ["--image", "a.png", "--out", "o.png", "--instruction", "a", "--instruction", "b", "--keyword", "a"]
        )
    assert "give one --keyword per --instruction (1 for 2)" in capsys.readouterr().err


def test_a_mask_resolution_the_model_lacks_is_a_clean_error(pipeline_dir, tmp_path, capsys):
    image = write_image(tmp_path / "in.png", 64)  # a 32 x 32 latent: the tiny UNet has layers at 1, 2 and 4
    argv = ["--model", str(pipeline_dir), "--image", str(image), "--out", str(tmp_path / "o.png")]
    argv += ["--instruction", "make the sky blue", "--keyword", "sky", "--config.foi.mask_downsample=8"]
    assert sample.main(argv + FAST) == 1
    err = capsys.readouterr().err
    assert "error: mask_downsample 8: the UNet has no cross-attention layer 3 levels below" in err
    assert "1 of 1 item(s) failed:\n  --image: mask_downsample 8" in err
    assert not (tmp_path / "o.png").exists()


def test_evaluate_refuses_a_model_with_invalid_foi_settings(tmp_path, capsys):
    import evaluate

    (tmp_path / "foi_config.json").write_text('{"tau": [0.4, 1.5]}')
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "foi_config.json: tau must be a (low, high) range" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.foi.outside_values", "unexpected argument '--config.foi.outside_values'"),
        ("--config.foi.colour=red", "has no setting 'colour'"),
        ("--config.foi.tau=2", "tau must"),
        ("--config.foi.outside_values=both", "outside_values must be"),
    ],
)
def test_evaluate_foi_overrides_are_checked(tmp_path, capsys, override, message):
    import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tmp_path), override])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_evaluate_foi_overrides_reach_the_config(tmp_path):
    import evaluate

    args = evaluate.parse_args(
        ["--model", str(tmp_path), "--config.foi.outside_values=image_only", "--config.foi.tau=[0.4, 0.7]"]
    )
    assert args.foi_config.outside_values == "image_only" and args.foi_config.tau == (0.4, 0.7)


def test_karras_sigmas_for_a_scheduler_without_them_is_a_clean_error(pipeline_dir, tmp_path, capsys):
    image = write_image(tmp_path / "in.png", 64)
    argv = ["--model", str(pipeline_dir), "--image", str(image), "--out", str(tmp_path / "o.png")]
    argv += ["--instruction", "make the sky blue", "--config.sample.steps=2", "--config.sample.scheduler=ddim"]
    argv += ["--config.sample.karras=true"]
    assert sample.main(argv) == 1
    assert "error: scheduler setting use_karras_sigmas=True is not implemented for ddim" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_a_second_run_reads_the_compilation_cache(pipeline_dir, tmp_path):
    """sample.py twice with the same shapes and no progress bar: the first fills the cache folder, the sampler
    included, and the second adds no entry (every program it needs was read from disk); ``off`` writes none. (A
    progress bar's per-step host callback keeps the sampler out of the cache: JAX never writes such programs.)"""
    image = write_image(tmp_path / "in.png", 64)
    cache = tmp_path / "cache"

    def edit(folder) -> None:
        argv = ["--model", pipeline_dir, "--image", image, "--instruction", "make the sky blue", "--out"]
        argv += [tmp_path / "out.png", *FAST, "--no-progress", "--compilation-cache", folder]
        run = subprocess.run([sys.executable, ROOT / "sample.py", *map(str, argv)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]

    edit(cache)
    first = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_sample-") for name in first), first
    edit(cache)
    assert sorted(p.name for p in cache.iterdir()) == first
    edit(compilation_cache.OFF)
    assert not (tmp_path / compilation_cache.OFF).exists() and sorted(p.name for p in cache.iterdir()) == first


def test_word_heatmaps_from_the_command_line(pipeline_dir, tmp_path, capsys):
    """``--attention`` on an IP2P edit writes one row per word; a word the instruction lacks fails that item."""
    image = write_image(tmp_path / "in.png", 64)
    out = tmp_path / "edited.png"
    argv = ["--model", str(pipeline_dir), "--image", str(image), "--instruction", "make the sky blue"]
    argv += ["--attention", "sky, blue", "--attention-level", "1", "--attention-steps", "0.5,1"]
    assert sample.main(argv + ["--out", str(out)] + FAST) == 0
    assert Image.open(out.with_suffix(".attention.png")).size == (96 + 2 * 256, 2 * 256)
    argv[argv.index("sky, blue")] = "cat"
    assert sample.main(argv + ["--out", str(tmp_path / "other.png")] + FAST) == 1
    assert "'cat' is not a word of 'make the sky blue'" in capsys.readouterr().err


def test_the_foi_group_declares_every_foi_setting_and_reaches_foi_config(tmp_path):
    """configs/sample.py's ``foi`` group is FoIConfig's fields, all unset; overrides of several types (a range, a
    bool, an int) arrive in the FoIConfig, and the unset ones keep the model's (here: the paper's) values."""
    import dataclasses

    from ip2p_jax.foi import FoIConfig, foi_config
    from ip2p_jax.script_config import load_config

    config = load_config(sample.CONFIG)
    assert sorted(config.foi) == sorted(field.name for field in dataclasses.fields(FoIConfig))
    assert all(value is None for value in config.foi.values())
    overrides = ["--config.foi.tau=0.3,0.6", "--config.foi.modulation=false", "--config.foi.gamma=2"]
    got = foi_config(tmp_path, load_config(sample.CONFIG, overrides).foi)
    assert got == FoIConfig(tau=(0.3, 0.6), modulation=False, gamma=2)


def test_masks_from_files_replace_foi_own(pipeline_dir, tmp_path, capsys):
    """``--mask`` per instruction (white inside), in the per-instruction mode: the comparison grid's mask tiles show
    the masks given; a mask of the wrong size, or one per two instructions, is a clear error."""
    from ip2p_jax.visualisation import mask_overlay

    image = write_image(tmp_path / "in.png", 64)
    left, bottom = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    left[:, :32], bottom[48:, :] = 255, 255
    Image.fromarray(left).save(tmp_path / "left.png")
    Image.fromarray(bottom).save(tmp_path / "bottom.png")
    out = tmp_path / "edited.png"
    argv = ["--model", str(pipeline_dir), "--image", str(image), "--out", str(out), "--config.foi.mask_downsample=2"]
    argv += ["--instruction", "make the sky blue", "--keyword", "sky", "--mask", str(tmp_path / "left.png")]
    argv += ["--instruction", "turn the cat red", "--keyword", "cat", "--mask", str(tmp_path / "bottom.png")]
    assert sample.main(argv + FAST + ["--compare", "--config.foi.text_branches=per_instruction"]) == 0
    tiles = np.asarray(Image.open(out.with_suffix(".compare.png")))[::4, ::4]
    for k, mask in enumerate((left, bottom)):  # whole cells of the 16 x 16 masks: shown exactly as given
        expected = np.asarray(mask_overlay(Image.open(image), mask > 0))
        np.testing.assert_array_equal(tiles[:, 64 * (k + 1) : 64 * (k + 2)], expected)
    Image.fromarray(left[:32]).save(tmp_path / "short.png")
    wrong = [str(tmp_path / "short.png") if a == str(tmp_path / "bottom.png") else a for a in argv]
    capsys.readouterr()
    assert sample.main(wrong + FAST) == 1
    assert (
        f"error: --image: --mask: {tmp_path / 'short.png'} is 64 x 32 px, the image 64 x 64 px"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        sample.main(argv[:-2] + FAST)
    assert "give one --mask per --instruction (1 for 2)" in capsys.readouterr().err


def test_help_names_every_kind_of_bad_item_and_the_defaults(capsys):
    import app

    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    assert "a keyword not in its\ninstruction" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "port to serve on (default: 7860)" in shown and "(default: 32)" in shown


# Run with the test extra's packages hidden, as after the plain ``pip install -e .`` of README's first command.
# A module set to None in sys.modules cannot be imported, and importlib.util.find_spec reports it missing.
WITHOUT_TEST_EXTRA = """
import sys
sys.modules.update(dict.fromkeys(["torch", "diffusers", "gradio", "gradio_client", "playwright", "pytest"]))
sys.path.insert(0, sys.argv.pop(1))
import sample
sys.exit(sample.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_library_edits_without_the_test_extra(pipeline_dir, tmp_path):
    image = write_image(tmp_path / "in.png", 64)
    argv = ["--model", pipeline_dir, "--image", image, "--out", tmp_path / "o.png", "--no-progress"] + FAST
    argv += ["--instruction", "make the sky blue", "--keyword", "sky", "--config.foi.mask_downsample=2"]
    command = [sys.executable, "-c", WITHOUT_TEST_EXTRA, ROOT, *argv, "--compilation-cache", "off"]
    run = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "PyTorch was not found" not in run.stderr and Image.open(tmp_path / "o.png").size == (64, 64)
