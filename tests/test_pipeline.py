"""The whole IP2P pipeline against diffusers' StableDiffusionInstructPix2PixPipeline on a tiny random model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import max_relative_error
from PIL import Image

from ip2p_jax.image_processing import preprocess
from ip2p_jax.pipeline import InstructPix2PixPipeline

PROMPTS = ["make the sky blue", "turn the cat into a dog"]
SIZE = 32  # pixels; the tiny VAE downsamples by 2, so 16x16 latents


@pytest.fixture(scope="module")
def pipelines(pipeline_dir):
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    reference = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL.from_pretrained(pipeline_dir / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(pipeline_dir / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(pipeline_dir / "unet"),
        scheduler=EulerAncestralDiscreteScheduler.from_pretrained(pipeline_dir / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    return InstructPix2PixPipeline.from_pretrained(pipeline_dir), reference


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in PROMPTS]


def test_encode_prompt_matches(pipelines):
    ours, reference = pipelines
    with torch.no_grad():
        expected = reference.text_encoder(
            reference.tokenizer(
                PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
        )[0].numpy()
    assert max_relative_error(ours.encode_prompt(PROMPTS), expected) <= 1e-4


def test_encode_image_and_decode_match(pipelines, images):
    ours, reference = pipelines
    pixels = torch.from_numpy(np.stack([preprocess(im, 2) for im in images])).permute(0, 3, 1, 2)
    expected_pixels = reference.image_processor.preprocess(images)
    np.testing.assert_allclose(pixels.numpy(), expected_pixels.numpy(), atol=1e-6)
    with torch.no_grad():
        expected = reference.vae.encode(pixels).latent_dist.mode().permute(0, 2, 3, 1).numpy()
    latents = ours.encode_image(images)
    assert max_relative_error(latents, expected) <= 1e-4

    scaled = np.asarray(latents) * reference.vae.config.scaling_factor
    with torch.no_grad():
        decoded = reference.vae.decode(torch.from_numpy(scaled).permute(0, 3, 1, 2) / 0.18215).sample
    expected_images = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours.decode_latents(scaled), expected_images, atol=2e-3, rtol=0)


V_ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
KARRAS = {"use_karras_sigmas": True}


@pytest.mark.parametrize(
    "scheduler,changes",
    [
        pytest.param("euler", {}, id="euler"),
        pytest.param("ddim", {}, id="ddim"),
        # A v-prediction model with zero terminal SNR (Stable Diffusion 2.x 768-v style, Lin et al.'s recipe) ...
        pytest.param("euler", V_ZERO_SNR, id="euler-v-zero-snr"),
        pytest.param("ddim", V_ZERO_SNR, id="ddim-v-zero-snr", marks=pytest.mark.slow),
        # ... and DPM++ 2M Karras.
        pytest.param("dpmpp_2m", KARRAS, id="dpmpp-2m-karras"),
        pytest.param("dpmpp_2m", {**KARRAS, **V_ZERO_SNR}, id="dpmpp-2m-karras-v-zero-snr", marks=pytest.mark.slow),
    ],
)
def test_edit_matches_diffusers(pipelines, images, pipeline_dir, scheduler, changes, request):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    ours, reference = pipelines
    classes = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
    checkpoint = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    reference.scheduler = classes[scheduler].from_config({**checkpoint, **changes})
    latents = torch.from_numpy(np.random.RandomState(1).randn(len(PROMPTS), 4, SIZE // 2, SIZE // 2).astype("f4"))
    settings = dict(num_inference_steps=5, guidance_scale=7.5, image_guidance_scale=1.5, output_type="np")
    expected = reference(PROMPTS, image=images, latents=latents, **settings).images
    ours_scheduler = ours.scheduler.replace(scheduler, **changes)
    got = ours(images, PROMPTS, scheduler=ours_scheduler, latents=latents.permute(0, 2, 3, 1).numpy(), **settings)
    assert got.images.shape == expected.shape
    difference = np.abs(got.images - expected).max()
    print(f"pipeline parity, {request.node.callspec.id}, 5 steps: max abs pixel difference {difference:.2e}")
    assert difference <= 2e-3


def test_exported_folder_edits_as_diffusers_does(pipelines, images, pipeline_dir, tmp_path):
    """A trained UNet (here: the tiny one, perturbed) exported to a diffusers folder: diffusers' pipeline on the
    folder and ours give the same edit, and our loaders read back exactly what was written."""
    import jax
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from ip2p_jax.weights import load_noise_schedule, load_unet
    from ip2p_jax.weights.export import export_ip2p, ip2p_scheduler_config

    ours, _ = pipelines
    _, params = load_unet(pipeline_dir)
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda p: np.asarray(p) + 0.02 * rng.standard_normal(p.shape).astype("f4"), params)
    out = export_ip2p(
        tmp_path / "export", trained, pipeline_dir, ip2p_scheduler_config(**load_noise_schedule(pipeline_dir))
    )
    with pytest.raises(FileExistsError, match="not empty"):
        export_ip2p(out, trained, pipeline_dir, {})
    # A source folder's FoI settings travel with the fine-tuned model.
    assert not (out / "foi_config.json").exists()
    shutil.copytree(pipeline_dir, tmp_path / "with-foi")
    (tmp_path / "with-foi" / "foi_config.json").write_text('{"gamma": 1}')
    carried = export_ip2p(tmp_path / "export-foi", trained, tmp_path / "with-foi", {})
    assert (carried / "foi_config.json").read_text() == '{"gamma": 1}'

    loaded = InstructPix2PixPipeline.from_pretrained(out)
    for got, want in zip(jax.tree.leaves(loaded.params["unet"]), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    reference = StableDiffusionInstructPix2PixPipeline.from_pretrained(out, safety_checker=None)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.random.RandomState(2).randn(len(PROMPTS), 4, SIZE // 2, SIZE // 2).astype("f4"))
    settings = dict(num_inference_steps=5, guidance_scale=7.5, image_guidance_scale=1.5, output_type="np")
    expected = reference(PROMPTS, image=images, latents=latents, **settings).images
    # The already compiled pipeline with the exported UNet (the other components are the same files).
    original_unet = ours.params["unet"]
    ours.params = {**ours.params, "unet": loaded.params["unet"]}
    try:
        got = ours(images, PROMPTS, scheduler="euler", latents=latents.permute(0, 2, 3, 1).numpy(), **settings)
    finally:
        ours.params = {**ours.params, "unet": original_unet}
    difference = np.abs(got.images - expected).max()
    print(f"export round trip, Euler, 5 steps: max abs pixel difference {difference:.2e}")
    assert difference <= 2e-3
