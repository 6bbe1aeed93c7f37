"""The FoI sampler: IP2P's step (``sampling.IP2PStep``) with FoI's pieces in the paper's order.

Plain IP2P steps before ``mask_step``; the mask step (4.1) records the text+image branch's cross-attention and
cuts the masks (or takes the masks given); every later step modulates cross-attention (4.2, ``FoIModulation``)
and restricts the text guidance to the masks (4.3). Each step is one ``shard_map`` over the mesh
(``sampling/core.py``); the masks are carried as arrays, so the whole edit is one jitted function.

In the per-instruction mode (``FoIConfig.text_branches``, ours) the guidance batch has one text+image branch per
sub-instruction slot, each encoded alone: each slot's mask comes from its own branch's maps, its branch is
modulated by its own mask, and its text term is guided inside it (``foi.guidance.per_instruction_guidance``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from ip2p_jax.foi.config import FoIConfig
from ip2p_jax.foi.guidance import (
    branch_text_masks,
    decoupled_text_mask,
    in_decoupled_window,
    per_instruction_guidance,
)
from ip2p_jax.foi.masks import (
    branch_keyword_maps,
    draw_tau,
    keyword_maps,
    mask_size,
    masks_from_keyword_maps,
    noise_difference_maps,
)
from ip2p_jax.foi.modulation import FoIModulation, xi
from ip2p_jax.models.attention import RecordCrossAttention, mean_of_layers
from ip2p_jax.sampling.core import FOI_TAU, purpose_keys, report_progress, run_steps, shard_over_images
from ip2p_jax.sampling.ip2p import IP2PStep, SamplerInputs, SamplerSettings, start_latents


class FoIInputs(struct.PyTreeNode):
    """Per-image FoI arrays (batched over ``B``, ``K`` sub-instruction slots, ``T`` tokens); see
    ``foi.InstructionTokens`` (the composite mode) and ``foi.BranchTokens`` (the per-instruction mode).

    Attributes:
      keyword_weights: ``(B, K, T)``: slot ``k``'s keyword tokens in the composite prompt, or in its own prompt.
      owner: composite: ``(B, T, K)`` one-hot token owners; per-instruction: ``(B, K, T)``, slot ``k``'s tokens in
        its own prompt.
      token_alpha: composite ``(B, T)``; per-instruction ``(B, K, T)``.
      valid: ``(B, K)`` bool.
      contexts: per-instruction mode: ``(B, K, 77, D)`` each slot's own encoding (padded slots: the null text's);
        ``None`` in the composite mode.
      masks: ``(B, K, mh, mw)`` masks at the mask resolution to use instead of extracted ones (0 / 1), or
        ``None``: FoI cuts its own.
    """

    keyword_weights: jax.Array
    owner: jax.Array
    token_alpha: jax.Array
    valid: jax.Array
    contexts: jax.Array | None = None
    masks: jax.Array | None = None


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
    per_instruction = cfg.text_branches == "per_instruction"

    def in_window(index):
        return in_decoupled_window(cfg.decoupled_guidance, cfg.decoupled_fraction, index - first, steps_run)

    def text_contexts(foi_inputs):
        """The text+image branches' contexts: ``None`` (the composite prompt's), or one per slot."""
        if not per_instruction:
            return None
        return [foi_inputs.contexts[:, k] for k in range(foi_inputs.contexts.shape[1])]

    def guide_and_denoise(inputs, foi_inputs, carry, index, outputs, masks):
        """4.3 with ``masks`` ``(B, K, mh, mw)`` (``None``: before the mask step, the plain guidance)."""
        if not per_instruction:
            text_mask = None if masks is None else decoupled_text_mask(masks, latent_size, in_window(index))
            return step.guide_and_denoise(inputs, carry, index, outputs, text_mask)
        valid = foi_inputs.valid.astype(jnp.float32)
        if masks is None:  # every branch's text term everywhere
            text_masks = jnp.moveaxis(valid, 1, 0)[:, :, None, None, None]
        else:
            text_masks = branch_text_masks(masks, valid, latent_size, in_window(index))
        guided = per_instruction_guidance(outputs, inputs.guidance_scale, inputs.image_guidance_scale, text_masks)
        return step.denoise(inputs, carry, index, guided)

    def plain_step(unet_params, batched, carry, index):
        inputs, foi_inputs = batched
        outputs, _ = step.branch_outputs(unet_params, inputs, carry[0], index, None, text_contexts(foi_inputs))
        return guide_and_denoise(inputs, foi_inputs, carry, index, outputs, None), None

    def mask_step(unet_params, batched, carry, index):
        """4.1: the masks from this step's maps (or the masks given); the step is guided by them already (4.3)."""
        inputs, foi_inputs = batched
        record = RecordCrossAttention(sizes=(masks_hw,))
        contexts = text_contexts(foi_inputs)
        outputs, aux = step.branch_outputs(unet_params, inputs, carry[0], index, record, contexts)
        if not aux:  # at trace time; the pipeline checks the UNet's config before it compiles anything
            _, every = step.branch_outputs(unet_params, inputs, carry[0], index, RecordCrossAttention(), contexts)
            sizes = sorted({tuple(maps.shape[1:3]) for maps in every.values()}, reverse=True)
            raise ValueError(
                f"mask_downsample {cfg.mask_downsample} asks for masks of {masks_hw[0]} x {masks_hw[1]} (a "
                f"{latent_size[0]} x {latent_size[1]} latent halved {cfg.mask_level} times, rounding up), but the "
                f"UNet has no cross-attention layer of that size; its layers have sizes {sizes}"
            )
        batch, slots = carry[0].shape[0], foi_inputs.valid.shape[1]
        maps = mean_of_layers(aux)
        if cfg.mask_source == "noise_difference":
            maps = noise_difference_maps(outputs, slots, per_instruction, masks_hw)
        elif per_instruction:  # slot k's keyword in its own branch's maps
            maps = branch_keyword_maps(
                maps[: slots * batch].reshape(slots, batch, *maps.shape[1:]), foi_inputs.keyword_weights
            )
        else:  # the text+image branch
            maps = keyword_maps(maps[:batch].astype(jnp.float32), foi_inputs.keyword_weights)
        if foi_inputs.masks is None:
            tau = jax.vmap(lambda key: draw_tau(key, cfg.tau))(purpose_keys(inputs.keys, FOI_TAU))
            masks = masks_from_keyword_maps(maps, foi_inputs.valid, tau, cfg.gamma, cfg.filter_size, cfg.filter_sigma)
        else:
            masks = foi_inputs.masks.astype(jnp.float32) * foi_inputs.valid[:, :, None, None]
        carry = guide_and_denoise(inputs, foi_inputs, carry, index, outputs, masks)
        return carry, (masks, maps)

    def modulation(foi_inputs, masks, index):
        """4.2's control of this step: over the text+image branch, or each slot's branch with its own mask."""
        settings = dict(
            xi_t=xi(schedule.timesteps[index], train_steps),
            active=cfg.modulation & (index - first < cfg.modulation_stop * steps_run),
            outside_values=cfg.outside_values,
        )
        if not per_instruction:
            return FoIModulation(masks=masks, owner=foi_inputs.owner, token_alpha=foi_inputs.token_alpha, **settings)
        slots, tokens = masks.shape[1], foi_inputs.owner.shape[-1]
        branch_major = lambda x: jnp.moveaxis(x, 1, 0).reshape(-1, *x.shape[2:])  # noqa: E731  (K B, ...)
        return FoIModulation(
            masks=branch_major(masks)[:, None],
            owner=branch_major(foi_inputs.owner).reshape(-1, tokens, 1),
            token_alpha=branch_major(foi_inputs.token_alpha),
            text_branches=slots,
            **settings,
        )

    def modulated_step(unet_params, batched, carry, index):
        """4.2 and 4.3: every cross-attention layer modulated by the masks, the text guidance restricted to them."""
        inputs, foi_inputs, masks = batched
        control = modulation(foi_inputs, masks, index)
        contexts = text_contexts(foi_inputs)
        outputs, _ = step.branch_outputs(unet_params, inputs, carry[0], index, control, contexts)
        return guide_and_denoise(inputs, foi_inputs, carry, index, outputs, masks), None

    def sample(unet_params, inputs: SamplerInputs, foi_inputs: FoIInputs):
        latents = start_latents(settings, schedule, inputs)
        carry = (latents, jnp.zeros_like(latents))
        mask_index = first + cfg.mask_step
        batched = (inputs, foi_inputs)
        if cfg.mask_step > 0:  # (an empty scan would still trace, and compile, a UNet)
            plain = jnp.arange(first, mask_index)
            carry, _ = run_steps(plain_step, mesh, unet_params, batched, carry, plain, progress, first)
        carry, (masks, maps) = shard_over_images(mask_step, mesh)(unet_params, batched, carry, mask_index)
        report_progress(progress, mask_index - first + 1)
        rest = jnp.arange(mask_index + 1, settings.num_inference_steps)
        batched = (inputs, foi_inputs, masks)
        (latents, _), _ = run_steps(modulated_step, mesh, unet_params, batched, carry, rest, progress, first)
        return latents, masks, maps

    return jax.jit(sample)
