"""The functional core (``ip2p_jax/editing.py``) under a user's own ``jit``: the pictures the pipeline class makes,
with its params or any others."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.editing import EditInputs, EditModels, edit
from ip2p_jax.image_processing import preprocess
from ip2p_jax.pipeline import InstructPix2PixPipeline
from ip2p_jax.sampling import SamplerSettings
from ip2p_jax.tokenizer import tokenize

PROMPTS = ["make the sky blue", "turn it into a dog"]
STEPS, SEED = 3, 7


@pytest.fixture(scope="module")
def setup(pipeline_dir):
    pipe = InstructPix2PixPipeline.from_pretrained(pipeline_dir)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in PROMPTS]
    settings = SamplerSettings(pipe.scheduler, STEPS, scaling_factor=pipe.vae.config.scaling_factor)
    run = jax.jit(
        functools.partial(edit, EditModels(pipe.unet, pipe.vae, pipe.text_encoder), settings=settings, mesh=pipe.mesh)
    )
    count = len(PROMPTS)
    inputs = EditInputs(
        pixels=jnp.asarray(np.stack([preprocess(image, pipe.vae_scale_factor) for image in images])),
        input_ids=jnp.asarray(tokenize(pipe.tokenizer, PROMPTS)),
        null_ids=jnp.asarray(tokenize(pipe.tokenizer, [""])),
        keys=jax.vmap(lambda i: jax.random.fold_in(jax.random.key(SEED), i))(jnp.arange(count)),
        guidance_scale=jnp.full((count,), 7.5, jnp.float32),
        image_guidance_scale=jnp.full((count,), 1.5, jnp.float32),
    )
    return pipe, images, run, inputs


def _class_pictures(pipe, images, params) -> np.ndarray:
    pipe.params = params
    return pipe(images, PROMPTS, num_inference_steps=STEPS, seed=SEED, output_type="np", progress=False).images


def test_the_functional_core_makes_the_class_pictures_under_a_users_jit(setup):
    pipe, images, run, inputs = setup
    expected = _class_pictures(pipe, images, pipe.params)
    got = np.asarray(run(pipe.params, inputs))
    assert got.shape == expected.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.abs(np.diff(got, axis=0)).max() > 0.01, "two images, two different edits"


def test_any_params_go_in(setup):
    """Other UNet params (here: every weight scaled by 0.9) give other pictures, and the class's with them."""
    pipe, images, run, inputs = setup
    original = pipe.params
    other = {**original, "unet": jax.tree.map(lambda x: 0.9 * x, original["unet"])}
    try:
        expected = _class_pictures(pipe, images, other)
    finally:
        pipe.params = original
    got = np.asarray(run(other, inputs))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.abs(got - np.asarray(run(original, inputs))).max() > 1e-3


def test_one_seed_per_image_edits_each_as_it_would_be_alone(setup):
    """``seed=[...]``: image ``i`` draws from ``fold_in(key(seed[i]), 0)``, as alone in a call with that seed; a
    list of the wrong length is an error."""
    pipe, images, _, _ = setup
    options = dict(num_inference_steps=STEPS, output_type="np", progress=False)
    both = pipe(images, PROMPTS, seed=[SEED, 11], **options).images
    alone = pipe(images[1], PROMPTS[1], seed=11, **options).images  # the same compiled sampler (one of the pair)
    # A batch of two and a batch of one are two programs: equal to float rounding (another key would differ by
    # tenths).
    np.testing.assert_allclose(both[1], alone[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(both[0], pipe(images[0], PROMPTS[0], seed=SEED, **options).images[0], rtol=0, atol=1e-5)
    assert np.abs(both[1] - pipe(images[1], PROMPTS[1], seed=12, **options).images[0]).max() > 0.05
    with pytest.raises(ValueError, match="a list of one integer per image"):
        pipe(images, PROMPTS, seed=[1], **options)
