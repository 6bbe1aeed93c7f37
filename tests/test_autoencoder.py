"""Training the autoencoder from scratch, and new random models written as diffusers folders."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.data.synthetic import synthetic_batch
from ip2p_jax.random_models import random_vae
from ip2p_jax.tiny_configs import SMOKE_TEXT, SMOKE_UNET, SMOKE_VAE, SMOKE_WORDS
from ip2p_jax.training.autoencoder import AutoencoderSettings, autoencoder_step, kl_divergence
from ip2p_jax.training.new_model import write_new_model
from ip2p_jax.training.state import create_train_state, make_optimizer


def test_kl_divergence_by_hand():
    assert float(kl_divergence(jnp.float32(0.0), jnp.float32(0.0))) == 0.0
    # KL(N(1, e) || N(0, 1)) = 0.5 * (1 + e - 1 - 1)
    assert float(kl_divergence(jnp.float32(1.0), jnp.float32(1.0))) == pytest.approx(0.5 * (np.e - 1.0))


def test_autoencoder_loss_falls():
    vae, params = random_vae(SMOKE_VAE, jax.random.key(0))
    tx = make_optimizer(5e-3)
    step = jax.jit(functools.partial(autoencoder_step, settings=AutoencoderSettings(vae, tx, learning_rate=5e-3)))
    state = create_train_state(params, tx)
    losses, baseline = [], []
    for position in range(80):
        pictures = synthetic_batch(0, position, 8, 32)
        batch = {"images": jnp.concatenate([pictures["input_image"], pictures["edited_image"]])}
        state, metrics = step(state, batch, jax.random.key(1), {})
        losses.append(float(metrics["loss"]))
        # What a model that knows nothing of each picture scores: every pixel at the batch's mean colour.
        baseline.append(float(jnp.mean(jnp.abs(batch["images"] - batch["images"].mean(axis=(0, 1, 2))))))
    assert {"loss", "l1", "kl", "grad_norm", "param_norm", "update_norm", "learning_rate"} == set(metrics)
    first, last, known = np.mean(losses[:5]), np.mean(losses[-5:]), np.mean(baseline)
    print(f"tiny autoencoder: loss of steps 1-5 {first:.3f}, of steps 76-80 {last:.3f}, mean-colour L1 {known:.3f}")
    assert last < 0.7 * known  # it reconstructs each picture, not just the mean colour
    assert int(state.ema_updates) == 80


def test_new_model_folder_loads_in_diffusers_and_here(tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from ip2p_jax.pipeline import InstructPix2PixPipeline

    folder = write_new_model(
        tmp_path / "new", unet=SMOKE_UNET, vae=SMOKE_VAE, text_encoder=SMOKE_TEXT, words=SMOKE_WORDS, seed=0
    )
    # A second model reusing the first one's VAE folder: the VAE is copied, the rest drawn anew.
    other = write_new_model(
        tmp_path / "other", unet=SMOKE_UNET, vae=str(folder / "vae"), text_encoder=SMOKE_TEXT, words=SMOKE_WORDS, seed=1
    )
    assert (other / "vae" / "config.json").read_text() == (folder / "vae" / "config.json").read_text()
    reference = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None)
    assert reference.unet.config.in_channels == 8
    ours = InstructPix2PixPipeline.from_pretrained(other)
    assert ours.tokenizer("make it red").input_ids == reference.tokenizer("make it red").input_ids
    np.testing.assert_array_equal(
        np.asarray(ours.params["vae"]["decoder"]["conv_out"]["kernel"]),
        reference.vae.decoder.conv_out.weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    # A third reusing the first one's UNet folder (a lineage stage regrown over another text encoder).
    third = write_new_model(
        tmp_path / "third", unet=str(folder / "unet"), vae=SMOKE_VAE, text_encoder=SMOKE_TEXT, words=SMOKE_WORDS, seed=2
    )
    again = InstructPix2PixPipeline.from_pretrained(third)
    assert (
        again.unet.config.in_channels == 8
        and (third / "model_index.json").read_text() == (folder / "model_index.json").read_text()
    )
    np.testing.assert_array_equal(
        np.asarray(again.params["unet"]["conv_in"]["kernel"]),
        reference.unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0),
    )
