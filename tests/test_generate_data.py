"""IP2P's data generation: triples, seeds, the CLIP filter, and generate_data end to end on tiny random models
(the released layout, read back by the TFDS builder; resuming; bad triples)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import IP2P_SCHEDULER_CONFIG, make_text_encoder, make_unet, make_vae
from PIL import Image
from test_clip import make_clip

from ip2p_jax.evaluation.clip_metrics import SCORE_NAMES
from ip2p_jax.generation.candidates import (
    Candidate,
    FilterThresholds,
    candidate_seeds,
    make_candidate,
    select,
)
from ip2p_jax.generation.pairs import generate_dataset
from ip2p_jax.generation.triples import read_triples

ROOT = Path(__file__).parents[1]


def load_config(variant: str = ""):
    spec = importlib.util.spec_from_file_location("generate_data_config", ROOT / "configs" / "generate_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


# ---------------------------------------------------------------------------------------------- the filter


def candidate(seed, sim_0=0.3, sim_1=0.3, directional=0.3, image=0.8) -> Candidate:
    scores = dict(zip(SCORE_NAMES, (sim_0, sim_1, directional, image), strict=True))
    return Candidate(seed=seed, p2p_threshold=0.5, cfg_scale=7.5, scores=scores)


def test_filter_keeps_exactly_the_pairs_above_the_thresholds():
    below = np.nextafter(np.float32(0.2), np.float32(0)).item()
    candidates = [
        candidate(1),  # passes, directional 0.3
        candidate(2, sim_0=0.2, sim_1=0.2, directional=0.2, image=0.7),  # exactly at every threshold: passes
        candidate(3, sim_0=below),
        candidate(4, sim_1=below),
        candidate(5, directional=below),
        candidate(6, image=np.nextafter(np.float32(0.7), np.float32(0)).item()),
        candidate(7, directional=0.9, image=0.69),  # the best change, but not the same picture
        candidate(8, directional=0.5),
        candidate(9, directional=0.3),  # ties with seed 1 on directional: the larger seed ranks first
    ]
    thresholds = FilterThresholds()
    assert [c.seed for c in candidates if thresholds.passes(c.scores)] == [1, 2, 8, 9]
    assert [c.seed for c in select(candidates, thresholds)] == [8, 9, 1, 2]
    assert [c.seed for c in select(candidates, FilterThresholds(max_kept=2))] == [8, 9]
    assert select(candidates[2:7], thresholds) == []


def test_candidates_are_reproducible_from_their_seed():
    seeds = candidate_seeds(0, 5, 50)
    assert seeds == candidate_seeds(0, 5, 50) and len(set(seeds)) == 50
    assert set(seeds).isdisjoint(candidate_seeds(0, 6, 50)) and set(seeds).isdisjoint(candidate_seeds(1, 5, 50))
    assert all(0 <= s < 2**32 for s in seeds)
    drawn = [make_candidate(s, (0.1, 0.9), (7.5, 15.0)) for s in seeds]
    assert all(0.1 <= c.p2p_threshold <= 0.9 and 7.5 <= c.cfg_scale <= 15.0 for c in drawn)
    assert make_candidate(seeds[0], (0.1, 0.9), (7.5, 15.0)) == drawn[0]
    assert np.std([c.p2p_threshold for c in drawn]) > 0.1


def test_read_triples_reports_bad_lines(tmp_path):
    lines = [
        json.dumps({"input": "a cat", "edit": "make it a dog", "output": "a dog"}),
        "",
        "{not json",
        json.dumps({"input": "a cat", "output": "a dog"}),
        json.dumps({"input": "a cat", "edit": " ", "output": "a dog"}),
        json.dumps(["a cat", "a dog"]),
        json.dumps({"input": "a red car", "edit": "make it blue", "output": "a blue car", "extra": 1}),
    ]
    path = tmp_path / "triples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    triples, errors = read_triples(path)
    assert [(t.index, t.name, t.output) for t in triples] == [(0, "0000000", "a dog"), (6, "0000006", "a blue car")]
    assert [line for line, _ in errors] == [3, 4, 5, 6]
    assert "not JSON" in errors[0][1] and "missing ['edit']" in errors[1][1]
    assert "'edit' is not a non-empty string" in errors[2][1] and "not a JSON object" in errors[3][1]


def test_configs_are_valid():
    default, tiny = load_config(), load_config("tiny")
    assert (default.clip_threshold, default.clip_dir_threshold, default.clip_img_threshold) == (0.2, 0.2, 0.7)
    assert (default.p2p_min, default.p2p_max, default.samples_per_triple, default.max_kept) == (0.1, 0.9, 100, 4)
    assert tiny.model == "tiny" and (ROOT / tiny.triples).is_file()
    with pytest.raises(ValueError, match="unknown variant"):
        load_config("huge")


# ---------------------------------------------------------------------------------------------- end to end

CAPTIONS = ["a photo of a cat", "a red circle", "a green square", "the dog", "a blue sky"]
EDITS = ["turn it into a dog", "add a hat", "make it red", "make it blue"]


def good_triples(count: int) -> list[dict]:
    triples = []
    for i in range(count):
        source = CAPTIONS[i % len(CAPTIONS)]
        target = source + " with a hat" if i % 2 else source.replace("a", "the", 1)
        triples.append({"input": source, "edit": EDITS[i % len(EDITS)], "output": target})
    return triples


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir, vocab_size):
    """A tiny Stable Diffusion folder (4-channel UNet, 2x VAE) and a tiny CLIP folder, both with the tokenizer."""
    from diffusers import EulerAncestralDiscreteScheduler

    root = tmp_path_factory.mktemp("generate-models")
    sd = root / "sd"
    make_unet("sd_4ch").save_pretrained(sd / "unet")
    make_vae().save_pretrained(sd / "vae")
    make_text_encoder("sd1", vocab_size).save_pretrained(sd / "text_encoder")
    shutil.copytree(tokenizer_dir, sd / "tokenizer")
    EulerAncestralDiscreteScheduler.from_config(IP2P_SCHEDULER_CONFIG).save_pretrained(sd / "scheduler")
    clip = root / "clip"
    make_clip("vit-l", vocab_size).save_pretrained(clip)  # 32 px images
    shutil.copytree(tokenizer_dir, clip, dirs_exist_ok=True)
    return sd, clip


def tiny_config(models, triples: Path):
    sd, clip = models
    config = load_config("tiny")
    config.update(
        dict(
            model=str(sd),
            clip=str(clip),
            triples=str(triples),
            resolution=16,
            steps=2,
            samples_per_triple=2,
            max_kept=1,
            batch_size=8,
            # A random CLIP's scores mean nothing: thresholds that every pair passes, so that every triple
            # keeps max_kept pairs and the TFDS splits are all populated.
            clip_threshold=-1.0,
            clip_dir_threshold=-1.0,
            clip_img_threshold=-1.0,
            save_candidates=True,
        )
    )
    return config


@pytest.fixture(scope="module")
def generated(models, tmp_path_factory):
    """20 good triples, a line that is not JSON (line 4) and one with a caption over 77 tokens (line 8)."""
    root = tmp_path_factory.mktemp("generated")
    lines = [json.dumps(t) for t in good_triples(20)]
    lines.insert(3, "{oops")
    lines.insert(7, json.dumps({"input": "a cat", "edit": "longer", "output": "a " + "xyzzy " * 20}))
    triples = root / "triples.jsonl"
    triples.write_text("\n".join(lines) + "\n")
    config = tiny_config(models, triples)
    out = root / "data"
    reports: list[str] = []
    summary = generate_dataset(config, out, progress=False, report=reports.append)
    return config, out, summary, reports


def test_generated_folder_has_the_released_layout(generated):
    config, out, summary, reports = generated
    assert summary.finished == 20 and summary.kept == 20 and summary.listed == 20
    assert [line for line, _ in summary.bad] == [4, 8]
    assert reports[0].endswith(
        ":4: skipped: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    )
    assert reports[1].endswith(
        ":8: skipped: prompt 'a xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy "
        "xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy xyzzy ' has 103 tokens; CLIP "
        "reads 77"
    )
    seeds = json.loads((out / "seeds.json").read_text())
    names = [name for name, _ in seeds]
    assert names == sorted(names) and "0000003" not in names and "0000007" not in names and len(names) == 20
    lines = Path(config.triples).read_text().splitlines()
    for name, kept in seeds:
        folder = out / name
        assert json.loads((folder / "prompt.json").read_text()) == json.loads(lines[int(name)])
        scores = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
        assert len(scores) == config.samples_per_triple
        assert [int(s) for s in kept] == [s["seed"] for s in scores if s["kept"]]
        # What was kept is exactly the filter's choice over every candidate's scores.
        candidates = [
            Candidate(s["seed"], s["p2p_threshold"], s["cfg_scale"], {k: s[k] for k in SCORE_NAMES}) for s in scores
        ]
        thresholds = FilterThresholds(
            config.clip_threshold, config.clip_dir_threshold, config.clip_img_threshold, config.max_kept
        )
        assert [str(c.seed) for c in select(candidates, thresholds)] == kept
        metadata = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        assert [str(m["seed"]) for m in metadata] == kept
        for seed in kept:
            for role in (0, 1):
                with Image.open(folder / f"{seed}_{role}.jpg") as image:
                    assert image.format == "JPEG" and image.size == (16, 16) and image.mode == "RGB"
                # save_candidates: every candidate's pictures, losslessly; a kept one is exactly its JPEG's source.
                encoded = io.BytesIO()
                Image.open(folder / "candidates" / f"{seed}_{role}.png").save(encoded, "JPEG", quality=100)
                assert encoded.getvalue() == (folder / f"{seed}_{role}.jpg").read_bytes()
        assert sorted(p.name for p in (folder / "candidates").iterdir()) == sorted(
            f"{s['seed']}_{role}.png" for s in scores for role in (0, 1)
        )
        for s in scores:
            assert 0.1 <= s["p2p_threshold"] <= 0.9 and 7.5 <= s["cfg_scale"] <= 15
            assert all(abs(s[k]) <= 1.0 + 1e-6 for k in SCORE_NAMES)  # cosines, in float32


def test_tfds_builder_reads_the_generated_folder(generated, tmp_path):
    import tensorflow_datasets as tfds

    from ip2p_jax.data import edit_datasets  # noqa: F401  (registers the builders)

    config, out, _, _ = generated
    builder = tfds.builder("ip2p_original", data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(out)))
    splits = builder.info.splits
    assert (splits["train"].num_examples, splits["validation"].num_examples, splits["test"].num_examples) == (18, 1, 1)
    assert builder.info.metadata["skipped"] == 0
    raw = {"input_image": tfds.decode.SkipDecoding(), "edited_image": tfds.decode.SkipDecoding()}
    (example,) = tfds.as_numpy(builder.as_dataset(split="test", decoders=raw))
    name, (seed,) = json.loads((out / "seeds.json").read_text())[-1]
    assert example["instruction"].decode() == json.loads((out / name / "prompt.json").read_text())["edit"]
    assert example["input_image"] == (out / name / f"{seed}_0.jpg").read_bytes()
    assert example["edited_image"] == (out / name / f"{seed}_1.jpg").read_bytes()


def test_rerun_skips_finished_triples_and_redoes_unfinished_ones(generated):
    config, out, _, _ = generated
    seeds_before = (out / "seeds.json").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metadata.jsonl")}
    unfinished = out / "0000005"
    kept = json.loads((unfinished / "metadata.jsonl").read_text())["seed"]
    images = [np.asarray(Image.open(unfinished / f"{kept}_{role}.jpg")) for role in (0, 1)]
    # An interrupted run: the folder's images are there, its metadata.jsonl (written last) is not.
    (unfinished / "metadata.jsonl").unlink()
    (out / "seeds.json").unlink()
    summary = generate_dataset(config, out, progress=False, report=lambda _: None)
    assert (summary.finished, summary.skipped_finished, len(summary.bad)) == (1, 19, 2)
    assert (out / "seeds.json").read_text() == seeds_before
    for path, stamp in stamps.items():
        if path.parent != unfinished:
            assert path.stat().st_mtime_ns == stamp, path  # untouched
    assert json.loads((unfinished / "metadata.jsonl").read_text())["seed"] == kept
    for role in (0, 1):  # the same pair again: its seed decides everything
        again = np.asarray(Image.open(unfinished / f"{kept}_{role}.jpg"))
        assert np.abs(again.astype(int) - images[role]).max() <= 1


def test_rerun_with_other_settings_is_refused(generated):
    config, out, _, _ = generated
    changed = config.copy_and_resolve_references()
    changed.clip_img_threshold = 0.7
    with pytest.raises(ValueError, match=r"other settings \(clip_img_threshold: -1.0 -> 0.7\)"):
        generate_dataset(changed, out, progress=False)


@pytest.mark.slow
def test_cli_tiny_config(tmp_path):
    """generate_data.py on the tiny config (random models built in code), then a rerun that skips everything."""
    command = [
        sys.executable,
        str(ROOT / "generate_data.py"),
        "--config",
        str(ROOT / "configs/generate_data.py:tiny"),
        "--out",
        str(tmp_path / "data"),
        "--noprogress",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "5 triples generated (10 pairs kept), 0 already finished, 0 skipped as bad" in first.stdout
    assert len(json.loads((tmp_path / "data" / "seeds.json").read_text())) == 5
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 triples generated (0 pairs kept), 5 already finished" in second.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a cat", "edit": "x"}\n')
    third = subprocess.run(
        command + [f"--config.triples={bad}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    # Another triples file into the same folder changes nothing that decides the pictures: it runs, skipping
    # the bad line, and exits 1.
    assert third.returncode == 1 and "bad.jsonl:1: skipped: missing ['output']" in third.stderr


EIGHT_DEVICES = """
import importlib.util, json, sys
from pathlib import Path
import jax
from ip2p_jax.generation.pairs import generate_dataset
from ip2p_jax.parallel import data_mesh

NAMES = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
assert len(jax.devices()) == 8, jax.devices()
root, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("config", root / "configs" / "generate_data.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config("tiny")
config.triples = str(root / config.triples)
config.steps = 4
one = generate_dataset(config, out / "one", mesh=data_mesh(jax.devices()[:1]), progress=False)
eight = generate_dataset(config, out / "eight", progress=False)  # every local device
assert one.finished == eight.finished == 5, (one, eight)
worst, same_kept = 0.0, 0
for folder in sorted((out / "one").glob("0*")):
    a = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (out / "eight" / folder.name / "scores.jsonl").read_text().splitlines()]
    assert [x["seed"] for x in a] == [x["seed"] for x in b]
    for x, y in zip(a, b):
        worst = max([worst] + [abs(x[k] - y[k]) for k in NAMES])
    same_kept += [x["kept"] for x in a] == [x["kept"] for x in b]
print(f"8 devices vs 1: max CLIP score difference {worst:.1e}; same pairs kept for {same_kept} of 5 triples")
assert worst <= 1e-4 and same_kept == 5
"""


@pytest.mark.slow
def test_eight_devices_generate_what_one_does(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, str(ROOT), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout.strip())


def test_shapes_triples_are_the_training_examples_captions(tmp_path):
    """tools/shapes_triples.py: ShapesEdit training examples as triples generate_data.py reads, each naming the
    example it came from (for judging the generated pairs)."""
    from ip2p_jax.data.shapes_edit import ShapesEdit, draw, draw_captions

    spec = importlib.util.spec_from_file_location("shapes_triples", ROOT / "tools" / "shapes_triples.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--count", "3", "--start", "5", "--out", str(tmp_path / "t.jsonl")]) == 0
    triples, errors = read_triples(tmp_path / "t.jsonl")
    assert len(triples) == 3 and not errors
    config = ShapesEdit.BUILDER_CONFIGS[0]
    for triple, line in zip(triples, (tmp_path / "t.jsonl").read_text().splitlines(), strict=True):
        record = json.loads(line)
        assert (record["split"], record["index"]) == ("train", 5 + triple.index)
        example = draw(config, "train", record["index"])
        assert (triple.input, triple.output) == draw_captions(config, "train", record["index"], example)
        assert triple.edit == example.instruction
    with pytest.raises(SystemExit):
        tool.main(["--count", "2", "--start", str(config.num_train - 1), "--out", str(tmp_path / "x.jsonl")])


def test_offline_filter_and_export_reproduce_the_generated_data_set(generated, tmp_path):
    """tools/judge_generated_pairs.py re-applies the filter to the saved scores and writes the kept pairs from the
    saved candidate pictures: with the generation's own thresholds it rebuilds the same data set, byte for byte."""
    from ip2p_jax.generation.candidates import FilterThresholds

    config, out, _, _ = generated
    spec = importlib.util.spec_from_file_location("judge_generated_pairs", ROOT / "tools" / "judge_generated_pairs.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    lines = Path(config.triples).read_text().splitlines()
    triples, records = {}, []
    for folder in sorted(out.glob("0*")):
        triples[int(folder.name)] = json.loads(lines[int(folder.name)])
        for line in (folder / "scores.jsonl").read_text().splitlines():
            records.append({**json.loads(line), "triple": int(folder.name)})
    settings = (config.clip_threshold, config.clip_dir_threshold, config.clip_img_threshold, config.max_kept)
    thresholds = FilterThresholds(*settings)
    refiltered = tool.refilter([{**r, "kept": False} for r in records], thresholds)
    assert sorted((r["seed"], r["kept"]) for r in refiltered) == sorted((r["seed"], r["kept"]) for r in records)
    assert tool.export(out, refiltered, triples, tmp_path / "again") == len(triples)
    assert (tmp_path / "again" / "seeds.json").read_text() == (out / "seeds.json").read_text()
    for name, kept in json.loads((out / "seeds.json").read_text()):
        for seed in kept:
            for role in (0, 1):
                assert (tmp_path / "again" / name / f"{seed}_{role}.jpg").read_bytes() == (
                    out / name / f"{seed}_{role}.jpg"
                ).read_bytes()
    # A stricter filter keeps fewer.
    strict = tool.refilter(records, FilterThresholds(-1.0, -1.0, -1.0, max_kept=0))
    assert not any(r["kept"] for r in strict)


@pytest.mark.slow
def test_the_loop_on_tiny_models_triples_to_pairs_to_training(tmp_path):
    """Issue 20's loop end to end on random tiny models, as a user runs it: ShapesEdit caption triples, pairs
    generated with every candidate saved, the judge over them, the TFDS builder, and two InstructPix2Pix
    training steps on the generated pairs alone."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(*command):
        argv = [sys.executable, *map(str, command)]
        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result

    triples, data = tmp_path / "triples.jsonl", tmp_path / "pairs"
    run("tools/shapes_triples.py", "--count", "8", "--out", triples)
    generation = ["--config", "configs/generate_data.py:tiny", f"--config.triples={triples}", "--config.steps=2"]
    generation += ["--config.samples_per_triple=2", "--config.save_candidates=True", "--out", data, "--noprogress"]
    run("generate_data.py", *generation)
    judged = run("tools/judge_generated_pairs.py", "judge", "--data", data, "--triples", triples)
    assert "all: 16 pairs (8 triples)" in judged.stdout and "kept: 16 pairs (8 triples)" in judged.stdout
    training = ["--config", "configs/tiny.py", "--config.data.name=ip2p_original", f"--config.data.manual_dir={data}"]
    training += [f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.steps=2", "--config.data.global_batch_size=2"]
    trained = run("train.py", *training, "--config.log_every=1", "--workdir", tmp_path / "run")
    assert "done: step 2, last loss" in trained.stderr
