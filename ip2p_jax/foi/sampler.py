"""The FoI sampler: IP2P's step (``sampling.IP2PStep``) with FoI's pieces in the paper's order.

Plain IP2P steps before ``mask_step``; the mask step (4.1) records the text+image branch's cross-attention and
cuts the masks; every later step modulates cross-attention (4.2, ``FoIModulation``) and restricts the text
guidance to the masks' union (4.3). Each step is one ``shard_map`` over the mesh (``sampling/core.py``); the masks
are carried as arrays, so the whole edit is one jitted function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from ip2p_jax.foi.config import FoIConfig
from ip2p_jax.foi.guidance import decoupled_text_mask, in_decoupled_window
from ip2p_jax.foi.masks import draw_tau, extract_masks, keyword_maps, mask_size
from ip2p_jax.foi.modulation import FoIModulation, xi
from ip2p_jax.models.attention import RecordCrossAttention, mean_of_layers
from ip2p_jax.sampling.core import FOI_TAU, purpose_keys, report_progress, run_steps, shard_over_images
from ip2p_jax.sampling.ip2p import IP2PStep, SamplerInputs, SamplerSettings, start_latents


class FoIInputs(struct.PyTreeNode):
    """Per-image FoI arrays (batched over ``B``, ``K`` sub-instruction slots, ``T`` tokens); see
    ``foi.InstructionTokens``."""

    keyword_weights: jax.Array  # (B, K, T)
    owner: jax.Array  # (B, T, K)
    token_alpha: jax.Array  # (B, T)
    valid: jax.Array  # (B, K) bool


def make_foi_sampler(
    unet_apply: Callable,
    settings: SamplerSettings,
    foi_config: FoIConfig,
    mesh: Mesh,
    latent_size: tuple[int, int],
    progress: Callable[[jax.Array], None] | None = None,
) -> Callable[[Any, SamplerInputs, FoIInputs], tuple[jax.Array, jax.Array, jax.Array]]:
    """Builds the jitted FoI sampler: plain IP2P steps before ``mask_step``, the mask step peeled off (maps
    recorded, masks built), then a ``lax.scan`` of modulated steps; each step a ``shard_map`` over ``data``.

    Args:
      latent_size: ``(h, w)`` of the latents; the masks are ``mask_size(latent_size, foi_config.mask_downsample)``,
        the size of the UNet's layers at level ``log2(mask_downsample)``.

    Returns:
      ``sample(unet_params, inputs, foi_inputs) -> (latents (B, h, w, 4), masks (B, K, mh, mw), keyword maps
      (B, K, mh, mw))``: the keyword maps are the text+image branch's cross-attention of each keyword at the mask
      step, before the filter and sharpening (``foi.keyword_maps``), for pictures of what the masks came from.
    """
    if not settings.dual_guidance:
        raise ValueError("FoI needs the three guidance branches (guidance_scale > 1, image_guidance_scale >= 1)")
    cfg = foi_config
    schedule = settings.scheduler.schedule(settings.num_inference_steps)
    first, steps_run = settings.first_step, settings.num_steps_run
    if cfg.mask_step >= steps_run:
        raise ValueError(f"mask_step {cfg.mask_step} is not among the {steps_run} steps run")
    masks_hw = mask_size(latent_size, cfg.mask_downsample)
    train_steps = settings.scheduler.config.num_train_timesteps
    step = IP2PStep(unet_apply, settings, schedule)

    def text_mask(masks, index):
        window = in_decoupled_window(cfg.decoupled_guidance, cfg.decoupled_fraction, index - first, steps_run)
        return decoupled_text_mask(masks, latent_size, window)

    def plain_step(unet_params, inputs, carry, index):
        return step(unet_params, inputs, carry, index)[0], None

    def mask_step(unet_params, batched, carry, index):
        """4.1: the masks from this step's maps; the step is guided by them already (4.3)."""
        inputs, foi_inputs = batched
        record = RecordCrossAttention(sizes=(masks_hw,))
        outputs, aux = step.branch_outputs(unet_params, inputs, carry[0], index, record)
        if not aux:  # at trace time; the pipeline checks the UNet's config before it compiles anything
            _, every = step.branch_outputs(unet_params, inputs, carry[0], index, RecordCrossAttention())
            sizes = sorted({tuple(maps.shape[1:3]) for maps in every.values()}, reverse=True)
            raise ValueError(
                f"mask_downsample {cfg.mask_downsample} asks for masks of {masks_hw[0]} x {masks_hw[1]} (a "
                f"{latent_size[0]} x {latent_size[1]} latent halved {cfg.mask_level} times, rounding up), but the "
                f"UNet has no cross-attention layer of that size; its layers have sizes {sizes}"
            )
        maps = mean_of_layers(aux)[: carry[0].shape[0]]  # the text+image branch
        tau = jax.vmap(lambda key: draw_tau(key, cfg.tau))(purpose_keys(inputs.keys, FOI_TAU))
        masks = extract_masks(
            maps, foi_inputs.keyword_weights, foi_inputs.valid, tau, cfg.gamma, cfg.filter_size, cfg.filter_sigma
        )
        carry = step.guide_and_denoise(inputs, carry, index, outputs, text_mask(masks, index))
        return carry, (masks, keyword_maps(maps, foi_inputs.keyword_weights))

    def modulated_step(unet_params, batched, carry, index):
        """4.2 and 4.3: every cross-attention layer modulated by the masks, the text guidance restricted to them."""
        inputs, foi_inputs, masks = batched
        control = FoIModulation(
            masks=masks,
            owner=foi_inputs.owner,
            token_alpha=foi_inputs.token_alpha,
            xi_t=xi(schedule.timesteps[index], train_steps),
            active=cfg.modulation & (index - first < cfg.modulation_stop * steps_run),
            outside_values=cfg.outside_values,
        )
        return step(unet_params, inputs, carry, index, control, text_mask(masks, index))[0], None

    def sample(unet_params, inputs: SamplerInputs, foi_inputs: FoIInputs):
        latents = start_latents(settings, schedule, inputs)
        carry = (latents, jnp.zeros_like(latents))
        mask_index = first + cfg.mask_step
        if cfg.mask_step > 0:  # (an empty scan would still trace, and compile, a UNet)
            plain = jnp.arange(first, mask_index)
            carry, _ = run_steps(plain_step, mesh, unet_params, inputs, carry, plain, progress, first)
        carry, (masks, maps) = shard_over_images(mask_step, mesh)(unet_params, (inputs, foi_inputs), carry, mask_index)
        report_progress(progress, mask_index - first + 1)
        rest = jnp.arange(mask_index + 1, settings.num_inference_steps)
        batched = (inputs, foi_inputs, masks)
        (latents, _), _ = run_steps(modulated_step, mesh, unet_params, batched, carry, rest, progress, first)
        return latents, masks, maps

    return jax.jit(sample)
