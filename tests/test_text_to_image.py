"""Text-to-image sampling with a 4-channel SD UNet against diffusers' ``StableDiffusionPipeline``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import IP2P_SCHEDULER_CONFIG, make_text_encoder, make_unet, make_vae

from ip2p_jax.generation.text_to_image import TextToImageInputs, TextToImageSettings, make_text_to_image_sampler
from ip2p_jax.image_processing import postprocess
from ip2p_jax.parallel import data_mesh
from ip2p_jax.schedulers import Scheduler
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.weights import load_text_encoder, load_tokenizer, load_unet, load_vae

PROMPTS = ["a photo of a cat", "a green square with a hat"]
STEPS = 5
LATENT = (8, 8)  # 16 px images through the tiny VAE (a factor of 2)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, tokenizer_dir, vocab_size):
    """A tiny random Stable Diffusion folder: 4-channel UNet, VAE, text encoder, tokenizer, Euler scheduler."""
    import shutil

    from diffusers import EulerDiscreteScheduler

    root = tmp_path_factory.mktemp("tiny-sd-pipeline")
    make_unet("sd_4ch").save_pretrained(root / "unet")
    make_vae().save_pretrained(root / "vae")
    make_text_encoder("sd1", vocab_size).save_pretrained(root / "text_encoder")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    EulerDiscreteScheduler.from_config(IP2P_SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    return root


def diffusers_images(
    folder, latents_nchw: np.ndarray, guidance_scale: float, changes: dict, guidance_rescale: float
) -> np.ndarray:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=EulerDiscreteScheduler.from_pretrained(folder / "scheduler", **changes),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPTS,
        height=2 * LATENT[0],
        width=2 * LATENT[1],
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        latents=torch.tensor(latents_nchw),
        output_type="np",
    )
    return out.images


V_ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@pytest.mark.parametrize(
    "guidance_scale,changes,guidance_rescale",
    [
        pytest.param(7.5, {}, 0.0, id="guidance"),
        # diffusers runs the text branch alone at guidance_scale <= 1
        pytest.param(1.0, {}, 0.0, marks=pytest.mark.slow, id="no-guidance"),
        # Lin et al.'s recipe: v-prediction, zero terminal SNR, trailing timesteps, guidance rescale 0.7
        pytest.param(7.5, V_ZERO_SNR, 0.7, id="v-zero-snr-rescale"),
    ],
)
def test_text_to_image_equals_diffusers(sd_folder, guidance_scale, changes, guidance_rescale, request):
    unet, unet_params = load_unet(sd_folder)
    vae, vae_params = load_vae(sd_folder)
    text_encoder, text_params = load_text_encoder(sd_folder)
    tokenizer = load_tokenizer(sd_folder)
    scheduler = Scheduler.from_folder(sd_folder / "scheduler").replace(**changes)
    assert scheduler.kind == "euler"

    latents = np.random.RandomState(0).randn(len(PROMPTS), 4, *LATENT).astype(np.float32)
    expected = diffusers_images(sd_folder, latents, guidance_scale, changes, guidance_rescale)

    def apply(params, *args):
        return unet.apply({"params": params}, *args)

    settings = TextToImageSettings(scheduler, STEPS, LATENT, guidance=guidance_scale > 1.0)
    sample = make_text_to_image_sampler(apply, settings, data_mesh(jax.devices()[:1]))
    context = text_encoder.apply({"params": text_params}, tokenize(tokenizer, PROMPTS))
    null = text_encoder.apply({"params": text_params}, tokenize(tokenizer, [""]))
    inputs = TextToImageInputs(
        context=context,
        null_context=jnp.broadcast_to(null, context.shape),
        keys=jax.random.split(jax.random.key(0), len(PROMPTS)),
        guidance_scale=jnp.full((len(PROMPTS),), guidance_scale),
        latents=jnp.asarray(latents.transpose(0, 2, 3, 1)),
        guidance_rescale=jnp.full((len(PROMPTS),), guidance_rescale) if guidance_rescale else None,
    )
    out = sample(unet_params, inputs)
    images = postprocess(vae.apply({"params": vae_params}, out / vae.config.scaling_factor, method="decode"))
    difference = float(np.max(np.abs(images - expected)))
    print(
        f"text-to-image, {STEPS} Euler steps, {request.node.callspec.id}, against diffusers: "
        f"max abs pixel difference {difference:.1e}"
    )
    assert images.shape == expected.shape == (len(PROMPTS), 16, 16, 3)
    assert difference <= 2e-3
    assert float(np.max(np.abs(images[0] - images[1]))) > 0.05  # the prompts matter
