"""The shipped ShapesEdit model (``models/shapes-ip2p``): it loads in diffusers and here, README's first command
runs on it, and ``evaluate.py`` runs end to end on a few ShapesEdit examples. The model trained on generated pairs
(``models/shapes-ip2p-generated``, docs/datagen.md) is small, complete and edits as diffusers does too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import bfloat16_against_float32
from PIL import Image

import evaluate
import sample

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shapes-ip2p"
SHIPPED = [MODEL, ROOT / "models" / "shapes-ip2p-generated"]


@pytest.mark.parametrize("model", SHIPPED, ids=lambda path: path.name)
def test_the_model_is_small_and_complete(model):
    size = sum(path.stat().st_size for path in model.rglob("*") if path.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MiB"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json", "foi_config.json"):
        assert (model / part).exists(), part


@pytest.mark.parametrize("model", SHIPPED, ids=lambda path: path.name)
def test_diffusers_and_we_make_the_same_edit(model):
    """diffusers' PyTorch pipeline loads a shipped folder and edits like ours (same latents, Euler, 5 steps)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from ip2p_jax.pipeline import InstructPix2PixPipeline

    image = Image.open(ROOT / "examples" / "shapes.png").convert("RGB")
    prompt = "make the circle blue"
    reference = StableDiffusionInstructPix2PixPipeline.from_pretrained(model, safety_checker=None)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    latents = np.random.RandomState(0).randn(1, 4, 16, 16).astype("f4")
    settings = dict(num_inference_steps=5, guidance_scale=7.5, image_guidance_scale=1.5, output_type="np")
    expected = reference(prompt, image=image, latents=torch.from_numpy(latents), **settings).images
    ours = InstructPix2PixPipeline.from_pretrained(model)
    got = ours(image, prompt, scheduler="euler", latents=latents.transpose(0, 2, 3, 1), **settings).images
    difference = np.abs(np.asarray(got) - expected).max()
    print(f"{model.name}, diffusers against ours, Euler, 5 steps: max abs pixel difference {difference:.2e}")
    assert difference <= 2e-3


def test_readme_edit_with_the_default_model(tmp_path):
    """README's first command (fewer steps): two instructions with FoI and the comparison grid."""
    out = tmp_path / "edited.png"
    argv = ["--image", str(ROOT / "examples" / "shapes.png"), "--out", str(out), "--compare"]
    argv += ["--config.sample.steps=10"]
    argv += ["--instruction", "make the circle blue", "--keyword", "circle"]
    argv += ["--instruction", "remove the square", "--keyword", "square"]
    assert sample.main(argv) == 0
    assert Image.open(out).size == (64, 64)
    assert Image.open(out.with_suffix(".compare.png")).size == (5 * 256, 256)  # input | 2 masks | IP2P | FoI


@pytest.mark.slow
def test_bfloat16_edits_stay_near_float32_on_the_shipped_model():
    """bfloat16 compute (UNet and text encoder; parameters, autoencoder and scheduler arithmetic float32) against
    float32 on README's edit, 20 steps. Measured: 0.84 levels (IP2P at FoI's strength) and 1.5 (FoI) mean change,
    masks IoU 1.0 and 0.97 (one cell of 256). bfloat16 rounds every layer's activations to 8 significant bits
    (2^-9, 0.2 %), and 20 ancestral steps carry the differences forward, so the bound is a few levels of 255 on
    average (single pixels at object edges move more), and a mask may lose a cell at its threshold."""
    image = Image.open(ROOT / "examples" / "shapes.png").convert("RGB")
    instructions = [("make the circle blue", "circle"), ("remove the square", "square")]
    ip2p, foi_edit, ious = bfloat16_against_float32(MODEL, image, instructions, steps=20)
    print(f"shipped model, bfloat16 against float32, 20 steps: IP2P {ip2p:.2f}, FoI {foi_edit:.2f} levels; IoU {ious}")
    assert ip2p <= 3 and foi_edit <= 3
    assert min(ious) >= 0.9


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """A TFDS data_dir for ShapesEdit's small config (built on first use, shared by the module)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, small_data):
    out = tmp_path_factory.mktemp("evaluation")
    argv = ["--config.data.dataset=shapes_edit/small", f"--config.data.data_dir={small_data}"]
    argv += ["--config.data.limit=2", "--config.sample.steps=4", "--out", str(out), "--config.foi.gamma=2"]
    argv += ["--config.methods=ip2p,foi"]  # every method's wiring: tests/test_evaluate_wiring.py
    assert evaluate.main(argv) == 0
    return out


def test_evaluate_writes_a_table_json_and_a_grid(evaluation):
    record = json.loads((evaluation / "results.json").read_text())
    assert record["settings"]["config"]["foi"]["gamma"] == 2 and record["settings"]["foi"]["gamma"] == 2
    assert set(record["results"]) == set(evaluate.DEFAULT_SPLITS)
    for split, methods in record["results"].items():
        assert set(methods) == {"ip2p", "foi"}
        for method, summary in methods.items():
            assert summary["examples"] == 2
            assert 0.0 <= summary["edit_success"] <= 1.0 and summary["outside_change"] >= 0.0
            assert ("mask_iou" in summary) == method.startswith("foi"), (split, method)
        per_example = record["per_example"][split]["foi"]
        assert all(len(e["success"]) == len(e["mask_iou"]) for e in per_example)
    table = (evaluation / "results.md").read_text()
    assert table.count("\n") == 2 + len(evaluate.DEFAULT_SPLITS) * 2
    grid = np.asarray(Image.open(evaluation / "examples.png"))
    # Two splits of 2 examples: input | truth | 3 mask tiles | IP2P | FoI, 64 px enlarged 3x.
    assert grid.shape == (2 * 2 * 64 * 3, 7 * 64 * 3, 3)


def test_evaluate_refuses_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--config.methods=ip2p,magic"])
    assert "unknown method 'magic'" in capsys.readouterr().err


def _tool(name: str):
    """``tools/NAME.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_text_to_image_fidelity_tool(tmp_path):
    """docs/shapes.md's figures of the lineage's text-to-image model: the judge is perfect on real scenes' colours
    and the shape variants swap exactly one word."""
    tool = _tool("text_to_image_fidelity")
    from ip2p_jax.data import captioned_scenes

    scene, order = captioned_scenes.draw_scene(0, "eval", 0)
    for truth, texts in tool.shape_variants(scene, order):
        assert len(set(texts)) == 4 and texts[truth] == captioned_scenes.captioned_scene(scene, order).caption
    argv = ["--count", "2", "--batch", "2", "--steps", "2", "--grid", str(tmp_path / "grid.png")]
    results = tool.main(argv)
    assert results["real"]["objects_found"] == 1.0 and results["real"]["background"] == 1.0
    assert results["real"]["extra_colours"] == 0.0
    assert all(0.0 <= value <= 1.0 for key, value in results["generated"].items() if key != "extra_colours")
    assert Image.open(tmp_path / "grid.png").size == (2 * 2 * 128, 2 * 64)


def test_attention_localisation_tool(small_data, tmp_path):
    """docs/shapes.md's localisation figures come from this tool: it runs on the shipped model and gives IoUs."""
    tool = _tool("attention_localisation")
    argv = ["--dataset", "shapes_edit/small", "--data-dir", small_data, "--limit", "4", "--timesteps", "500"]
    results = tool.main([*argv, "--sweep", "--json", str(tmp_path / "figures.json")])
    assert set(results[500]) <= {"recolour", "reshape", "remove", "background"} and results[500]
    for iou, ratio in results[500].values():
        assert 0.0 <= iou <= 1.0 and ratio > 0.0
    sweeps = json.loads((tmp_path / "figures.json").read_text())["sweeps"]["500"]
    assert len(sweeps) == len(tool.SWEEP_GAMMAS) * len(tool.SWEEP_TAUS)
    assert all(set(cell) == {*results[500], "all"} for cell in sweeps.values())
    # The text-to-image folder reads the same keywords (what the InstructPix2Pix stage starts from); an
    # InstructPix2Pix folder has no captioned-scene context.
    t2i_folder = str(ROOT / "models" / "shapes-t2i")
    t2i = tool.main(
        [*argv[:4], "--limit", "2", "--timesteps", "500", "--model", t2i_folder, "--context", "instruction"]
    )
    assert set(t2i[500]) <= {"recolour", "reshape", "remove", "background"} and t2i[500]
    assert all(0.0 <= iou <= 1.0 for iou, _ in t2i[500].values())
    with pytest.raises(SystemExit):
        tool.main([*argv, "--context", "scene"])


def test_attention_localisation_reads_the_keyword_in_either_context(small_data):
    """``--context caption`` weighs the keyword's own tokens in the input caption, as FoI does in the instruction."""
    from types import SimpleNamespace

    from ip2p_jax.weights import load_tokenizer

    tool = _tool("attention_localisation")
    tokenizer = load_tokenizer(ROOT / "models" / "shapes-ip2p")
    pipe = SimpleNamespace(tokenizer=tokenizer)
    for context in ("instruction", "caption"):
        _, prompts, weights, regions, _, kinds = tool.instruction_prompts(
            pipe, 4, "shapes_edit/small", small_data, context
        )
        assert weights.shape[:2] == (4, 1) and regions.shape[:2] == (4, 1)
        for prompt, weight, kind in zip(prompts, weights[:, 0], kinds, strict=True):
            ids = tokenizer(prompt, padding="max_length", max_length=weight.shape[-1])["input_ids"]
            picked = tokenizer.decode([i for i, w in zip(ids, weight, strict=True) if w > 0]).strip()
            assert picked in prompt.replace(",", " ").split() and (picked == "background") == (kind == "background"), (
                prompt,
                picked,
            )
            assert ("make" in prompt or "turn" in prompt or "remove" in prompt) == (context == "instruction")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoising_error_turns_an_exact_prediction_into_the_clean_latents(prediction_type):
    """A UNet that outputs the exact noise (or velocity) gives back the clean latents, also at a zero-terminal-SNR
    schedule's last step (v only: epsilon carries no picture there); a wrong output does not."""
    import jax
    import jax.numpy as jnp

    tool = _tool("denoising_error")
    latents, noise = jax.random.normal(jax.random.key(0), (2, 2, 4, 4, 4))
    image_latents = jnp.zeros_like(latents)
    for alpha_cumprod in (0.9, 0.01) + ((0.0,) if prediction_type == "v_prediction" else ()):
        alpha_t, sigma_t = jnp.sqrt(alpha_cumprod), jnp.sqrt(1.0 - alpha_cumprod)
        exact = noise if prediction_type == "epsilon" else alpha_t * noise - sigma_t * latents

        def unet(params, sample, timesteps, context, control, output=exact):
            assert sample.shape == (2, 4, 4, 8) and control is None
            return output + params, {}

        args = (latents, noise, jnp.int32(999), jnp.float32(alpha_cumprod), None, image_latents, prediction_type)
        np.testing.assert_allclose(tool.one_step_x0(unet, 0.0, *args), latents, atol=1e-5)
        assert np.abs(tool.one_step_x0(unet, 0.1, *args) - latents).max() > 1e-2


def test_denoising_error_tool(small_data, tmp_path):
    """docs/shapes.md's one-step denoising figures: the tool runs on the shipped model; the unedited input has no
    error outside the edit's region and the autoencoder's floor is below every timestep's error."""
    tool = _tool("denoising_error")
    argv = ["--dataset", "shapes_edit/small", "--data-dir", small_data, "--limit", "3", "--timesteps", "100,999"]
    results = tool.main([*argv, "--json", str(tmp_path / "figures.json")])
    assert results["input"]["outside"] == 0.0 and results["input"]["inside"] > 20.0
    assert all(results["autoencoder"]["all"] < results[t]["all"] for t in (100, 999))
    assert set(json.loads((tmp_path / "figures.json").read_text())) == {"autoencoder", "input", "100", "999"}
    with pytest.raises(SystemExit):
        tool.main([*argv, "--model", str(ROOT / "models" / "shapes-t2i")])
