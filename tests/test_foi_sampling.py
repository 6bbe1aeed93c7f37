"""FoI end to end on the tiny model: properties that pin the reading down where no reference exists."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ip2p_jax import foi
from ip2p_jax.pipeline import InstructPix2PixPipeline
from ip2p_jax.sampling import FoIConfig

SIZE = 32  # pixels -> 16 x 16 latents; the tiny UNet's cross-attention runs at 16 and 8
FOI = FoIConfig(mask_downsample=2)  # masks at 8 x 8
STEPS = dict(num_inference_steps=5, output_type="np", progress=False)


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return InstructPix2PixPipeline.from_pretrained(pipeline_dir)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.RandomState(3).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def test_full_masks_and_zero_alpha_equal_ip2p(pipe, image):
    # tau 0 makes every mask all ones; alpha 0 removes the boost: FoI is then IP2P from the same start.
    subs = [("make the sky blue", "sky", 0.0), ("turn the cat red", "cat", 0.0)]
    edited = pipe(image, instructions=subs, foi=FoIConfig(mask_downsample=2, tau=0.0), **STEPS)
    plain = pipe(image, prompt=foi.composite_prompt([foi.SubInstruction(*s) for s in subs])[0], strength=0.8, **STEPS)
    assert all(m["latent"].min() == 1.0 for m in edited.masks)
    difference = np.abs(edited.images - plain.images).max()
    print(f"FoI with full masks and alpha 0 vs IP2P: max abs pixel difference {difference:.1e}")
    assert difference <= 1e-5


def test_masks_shapes_and_a_real_edit_differs(pipe, image):
    subs = [("make the sky blue", "sky"), ("turn the cat red", "cat")]
    edited = pipe(image, instructions=subs, foi=FOI, **STEPS)
    masks = edited.masks[0]
    assert masks["latent"].shape == (2, 8, 8) and masks["image"].shape == (2, SIZE, SIZE)
    assert set(np.unique(masks["latent"])) <= {0.0, 1.0}
    assert 0 < masks["latent"].sum() < masks["latent"].size
    plain = pipe(image, prompt="make the sky blue, turn the cat red", strength=0.8, **STEPS)
    assert np.abs(edited.images - plain.images).max() > 1e-3


def test_no_layer_at_the_mask_resolution_is_a_clear_error(pipe, image):
    with pytest.raises(ValueError, match=r"no cross-attention layer of size \(2, 2\)"):
        pipe(image, instructions=["make it red"], foi=FoIConfig(mask_downsample=8), **STEPS)


@pytest.mark.parametrize("outside_values", ["own", "image_only"])
def test_zero_masks_give_the_text_branch_the_image_only_attention(pipe, outside_values):
    """All masks zero: the text+image branch's attention is the image-only branch's; with the image-only branch's
    values outside the mask its whole noise prediction equals that branch's."""
    rng = np.random.RandomState(0)
    batch, tokens = 2, 77
    x = jnp.asarray(rng.randn(batch, 16, 16, 4), jnp.float32)
    image_latents = jnp.asarray(rng.randn(batch, 16, 16, 4), jnp.float32)
    context = jnp.asarray(rng.randn(batch, tokens, 24), jnp.float32)
    null = jnp.asarray(rng.randn(1, tokens, 24), jnp.float32).repeat(batch, 0)
    control = foi.FoIModulation(
        masks=jnp.zeros((batch, 2, 8, 8)),
        owner=jnp.zeros((batch, tokens, 2)).at[:, 1:4, 0].set(1.0),
        token_alpha=jnp.ones((batch, tokens)),
        xi_t=jnp.float32(0.05),
        active=jnp.bool_(True),
        outside_values=outside_values,
    )
    unet_in = jnp.concatenate([jnp.concatenate([x] * 3), jnp.concatenate([image_latents] * 3)], -1)
    contexts = jnp.concatenate([context, null, null])
    eps, _ = pipe.unet.apply({"params": pipe.params["unet"]}, unet_in, 500.0, contexts, control)
    plain, _ = pipe.unet.apply({"params": pipe.params["unet"]}, unet_in, 500.0, contexts)
    np.testing.assert_allclose(np.asarray(eps[batch:]), np.asarray(plain[batch:]), rtol=1e-5, atol=1e-5)
    text_branch, image_branch = np.asarray(eps[:batch]), np.asarray(eps[batch : 2 * batch])
    if outside_values == "image_only":
        np.testing.assert_allclose(text_branch, image_branch, rtol=1e-5, atol=1e-5 * np.abs(image_branch).max())
    else:  # the text branch keeps its own values, so it still differs from the image-only branch
        assert np.abs(text_branch - image_branch).max() > 1e-3 * np.abs(image_branch).max()


def test_inactive_modulation_is_the_plain_model(pipe):
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(3, 16, 16, 8), jnp.float32)
    context = jnp.asarray(rng.randn(3, 77, 24), jnp.float32)
    control = foi.FoIModulation(
        masks=jnp.ones((1, 1, 8, 8)),
        owner=jnp.zeros((1, 77, 1)),
        token_alpha=jnp.ones((1, 77)),
        xi_t=jnp.float32(0.05),
        active=jnp.bool_(False),
    )
    eps, _ = pipe.unet.apply({"params": pipe.params["unet"]}, x, 500.0, context, control)
    plain, _ = pipe.unet.apply({"params": pipe.params["unet"]}, x, 500.0, context)
    np.testing.assert_allclose(np.asarray(eps), np.asarray(plain), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_batch_mixes_one_and_three_sub_instructions(pipe, image):
    other = Image.fromarray(np.random.RandomState(4).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    one = [("make the sky blue", "sky")]
    three = [("make the sky blue", "sky"), ("turn the cat red", "cat"), ("add a hat", "hat")]
    both = pipe([image, other], instructions=[one, three], foi=FOI, **STEPS)
    assert [m["latent"].shape[0] for m in both.masks] == [1, 3]
    # Image 0 draws from fold_in(key, 0) in both calls: padded to three slots it edits as it does alone.
    alone = pipe(image, instructions=one, foi=FOI, **STEPS)
    np.testing.assert_array_equal(both.masks[0]["latent"], alone.masks[0]["latent"])
    assert np.abs(both.images[0] - alone.images[0]).max() <= 1e-5
