"""Guidance rules: the guidance rescale (Lin et al. 2024, 3.4) against diffusers' ``rescale_noise_cfg``, and how
IP2P's dual guidance applies it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ip2p_jax.guidance import classifier_free_guidance, dual_guidance, rescale_guidance

SHAPE = (3, 8, 6, 4)  # (B, H, W, C)


def branches(count: int, seed: int = 0) -> np.ndarray:
    """``(count, B, H, W, C)`` branch outputs of different scales per image."""
    rng = np.random.RandomState(seed)
    return (rng.randn(count, *SHAPE) * rng.uniform(0.5, 2.0, (count, SHAPE[0], 1, 1, 1))).astype(np.float32)


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_classifier_free_guidance_rescale_equals_diffusers(phi):
    """``StableDiffusionPipeline``'s guidance with ``guidance_rescale``: ``e_none + s (e_text - e_none)``, then
    ``rescale_noise_cfg`` toward ``e_text``."""
    e_text, e_none = branches(2)
    guided = e_none + 7.5 * (e_text - e_none)
    expected = rescale_noise_cfg(nchw(guided), nchw(e_text), guidance_rescale=phi).permute(0, 2, 3, 1).numpy()
    got = classifier_free_guidance(jnp.stack([e_text, e_none]), 7.5, guidance_rescale=phi)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    assert np.array_equal(classifier_free_guidance(jnp.stack([e_text, e_none]), 7.5), guided)


def test_phi_one_gives_the_conditioned_branch_its_spread_per_image():
    guided, conditioned = branches(2, seed=1)
    phi = jnp.asarray([1.0, 0.0, 0.5])
    out = np.asarray(rescale_guidance(jnp.asarray(guided), jnp.asarray(conditioned), phi))
    np.testing.assert_allclose(out[0].std(), conditioned[0].std(), rtol=1e-5)
    np.testing.assert_array_equal(out[1], guided[1])
    mixed = guided[2] * (0.5 * conditioned[2].std(ddof=1) / guided[2].std(ddof=1) + 0.5)
    np.testing.assert_allclose(out[2], mixed, rtol=1e-5, atol=1e-6)


def test_a_constant_guided_output_is_left_as_it_is():
    """Where the guided output has no spread (diffusers' division would give NaN) nothing is rescaled."""
    conditioned = branches(1)[0]
    constant = np.full(SHAPE, 0.25, np.float32)
    out = rescale_guidance(jnp.asarray(constant), jnp.asarray(conditioned), 0.7)
    np.testing.assert_array_equal(np.asarray(out), constant)


def test_dual_guidance_rescales_toward_the_text_and_image_branch_after_the_mask():
    """Ours (diffusers' IP2P pipeline has no rescale): the three-branch output, FoI's text mask included, is rescaled
    toward the text + image branch by the same rule; without ``guidance_rescale`` nothing changes."""
    eps = branches(3, seed=2)
    e_full, e_img, e_none = eps
    mask = (np.random.RandomState(3).rand(SHAPE[0], SHAPE[1], SHAPE[2], 1) > 0.5).astype(np.float32)
    plain = e_none + 1.5 * (e_img - e_none) + 7.5 * (e_full - e_img) * mask
    got = dual_guidance(jnp.asarray(eps), 7.5, 1.5, jnp.asarray(mask), guidance_rescale=0.6)
    expected = rescale_noise_cfg(nchw(plain), nchw(e_full), guidance_rescale=0.6).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    unscaled = np.asarray(dual_guidance(jnp.asarray(eps), 7.5, 1.5, jnp.asarray(mask)))
    np.testing.assert_allclose(unscaled, plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(dual_guidance(jnp.asarray(eps), 7.5, 1.5, jnp.asarray(mask), guidance_rescale=0.0)), unscaled
    )
