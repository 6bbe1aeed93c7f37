"""Text-to-image sampling with a 4-channel Stable Diffusion UNet: plain, and Prompt-to-Prompt pairs.

Both are step functions run by the sampler core (``sampling/core.py``), as the IP2P sampler is: the whole loop
one jitted function, a ``lax.scan`` over the steps, each step a ``shard_map`` over the mesh's ``data`` axis. The
guidance batch is ``[branch, image]`` with branches ``(text, none)`` (``guidance.classifier_free_guidance``).

Randomness is the core's: image ``i``'s key gives its start noise and each ancestral step's noise, so a result
depends on the key alone. A Prompt-to-Prompt pair has one key: both of its images start from the same noise and
get the same step noise, as in the IP2P reference's data generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from ip2p_jax.generation.prompt_to_prompt import PromptToPrompt, shares_attention
from ip2p_jax.guidance import classifier_free_guidance
from ip2p_jax.models.attention import Compose, RecordCrossAttention
from ip2p_jax.sampling.core import denoise, run_steps, start_noise, unet_on_branches
from ip2p_jax.schedulers import Scheduler


@dataclasses.dataclass(frozen=True)
class TextToImageSettings:
    """Static settings: a change compiles a new sampler.

    Attributes:
      scheduler: the step rule and its config.
      num_inference_steps: steps, all run (text-to-image starts from pure noise).
      latent_size: ``(h, w)`` of the latents (the image size divided by the VAE's factor, 8 for SD).
      latent_channels: the UNet's input (and output) channels, 4 for Stable Diffusion.
      guidance: the two branches ``(text, none)``; ``False`` runs the text branch alone (diffusers skips guidance
        at ``guidance_scale <= 1``).
    """

    scheduler: Scheduler
    num_inference_steps: int = 50
    latent_size: tuple[int, int] = (64, 64)
    latent_channels: int = 4
    guidance: bool = True

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (*self.latent_size, self.latent_channels)


class TextToImageInputs(struct.PyTreeNode):
    """One batch of prompts, every array batched over images ``B`` (sharded over ``data``).

    Attributes:
      context: ``(B, 77, D)`` prompt encodings.
      null_context: ``(B, 77, D)`` encodings of ``""``.
      keys: ``(B,)`` typed PRNG keys, one per image.
      guidance_scale: ``(B,)`` classifier-free guidance scale.
      latents: ``(B, h, w, c)`` start noise to use instead of the keys' (diffusers' ``latents=``: multiplied by the
        scheduler's ``init_noise_sigma``), or ``None``.
      guidance_rescale: ``(B,)`` diffusers' ``guidance_rescale`` (``guidance.rescale_guidance``), or ``None`` (none,
        and none compiled).
    """

    context: jax.Array
    null_context: jax.Array
    keys: jax.Array
    guidance_scale: jax.Array
    latents: jax.Array | None = None
    guidance_rescale: jax.Array | None = None


def guided_text_eps(
    unet_apply: Callable,
    unet_params: Any,
    model_input: jax.Array,
    timestep: jax.Array,
    context: jax.Array,
    null_context: jax.Array,
    guidance_scale: jax.Array,
    guidance: bool,
    control: Any = None,
    guidance_rescale: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """One UNet call over the guidance batch ``[text, none]`` (or ``text`` alone) and the guided model output
    (epsilon or v, as the UNet predicts).

    Args:
      model_input: ``(N, h, w, c)`` scheduler-scaled samples.
      context, null_context: ``(N, 77, D)``.
      guidance_scale: ``(N,)``.
      guidance_rescale: ``(N,)`` or ``None`` (``guidance.classifier_free_guidance``).

    Returns:
      ``(eps, aux)``: guided ``(N, h, w, c)`` float32 and the control's auxiliary output.
    """
    contexts = [context, null_context] if guidance else [context]
    outputs, aux = unet_on_branches(unet_apply, unet_params, model_input, timestep, contexts, control=control)
    if not guidance:
        return outputs[0].astype(jnp.float32), aux
    return classifier_free_guidance(outputs, guidance_scale, guidance_rescale), aux


def make_text_to_image_sampler(
    unet_apply: Callable,
    settings: TextToImageSettings,
    mesh: Mesh,
    progress: Callable[[jax.Array], None] | None = None,
) -> Callable[[Any, TextToImageInputs], jax.Array]:
    """Builds the jitted text-to-image sampler.

    Args:
      unet_apply: ``(params, sample_bhwc, timestep, context, control) -> (eps, aux)``.
      settings: static settings.
      mesh: a mesh with a ``data`` axis; the batch must divide by its size (``parallel.pad_batch``).
      progress: optional host callback given the number of steps done after each step.

    Returns:
      ``sample(unet_params, inputs) -> (B, h, w, c)`` float32 latents (scaled: decode ``latents / scaling_factor``).
    """
    scheduler = settings.scheduler
    schedule = scheduler.schedule(settings.num_inference_steps)

    def step(unet_params, inputs, carry, index):
        sample, previous_x0 = carry
        model_input = scheduler.scale_model_input(schedule, index, sample)
        eps, _ = guided_text_eps(
            unet_apply,
            unet_params,
            model_input,
            schedule.timesteps[index],
            inputs.context,
            inputs.null_context,
            inputs.guidance_scale,
            settings.guidance,
            guidance_rescale=inputs.guidance_rescale,
        )
        return denoise(scheduler, schedule, index, sample, eps, inputs.keys, previous_x0), None

    def sample(unet_params, inputs: TextToImageInputs) -> jax.Array:
        noise = inputs.latents if inputs.latents is not None else start_noise(inputs.keys, settings.latent_shape)
        latents = noise.astype(jnp.float32) * scheduler.init_noise_sigma(schedule)
        steps = jnp.arange(settings.num_inference_steps)
        carry = (latents, jnp.zeros_like(latents))
        (latents, _), _ = run_steps(step, mesh, unet_params, inputs, carry, steps, progress)
        return latents

    return jax.jit(sample)


# ---------------------------------------------------------------------------------------------- Prompt-to-Prompt


@dataclasses.dataclass(frozen=True)
class PromptToPromptSettings:
    """Which attention the edited prompt borrows (static; ``prompt_to_prompt.PromptToPrompt`` explains each).

    Attributes:
      cross_attention: replace its cross-attention maps through the token alignment (P2P).
      self_attention: inject the input image's self-attention (the IP2P reference's data generation).
      self_attention_max_size: inject self-attention only at layers of at most this many positions (P2P uses
        256 at 512 px); ``None``: every layer.
      record_sizes: return the text branch's cross-attention maps of both prompts at layers of these ``(h, w)``
        sizes at every step (``()``: every layer); ``None``: none (the default; recording costs memory).
    """

    cross_attention: bool = True
    self_attention: bool = True
    self_attention_max_size: int | None = None
    record_sizes: tuple[tuple[int, int], ...] | None = None


class PromptToPromptInputs(struct.PyTreeNode):
    """One batch of ``B`` pairs (every array batched over pairs, sharded over ``data``).

    Attributes:
      context: ``(B, 2, 77, D)`` encodings of each pair's input and edited prompts.
      null_context: ``(B, 77, D)`` encodings of ``""``.
      keys: ``(B,)`` typed PRNG keys, one per pair (both images share its noise).
      guidance_scale: ``(B,)`` classifier-free guidance scale.
      p: ``(B,)`` fraction of the steps that share attention (``prompt_to_prompt.shares_attention``).
      mapper: ``(B, 77, 77)`` float32 token alignments (``prompt_to_prompt.align_prompts``).
      alphas: ``(B, 77)`` float32.
      latents: ``(B, h, w, c)`` shared start noise instead of the keys' (times ``init_noise_sigma``), or ``None``.
    """

    context: jax.Array
    null_context: jax.Array
    keys: jax.Array
    guidance_scale: jax.Array
    p: jax.Array
    mapper: jax.Array
    alphas: jax.Array
    latents: jax.Array | None = None


def make_prompt_to_prompt_sampler(
    unet_apply: Callable,
    settings: TextToImageSettings,
    p2p: PromptToPromptSettings,
    mesh: Mesh,
    progress: Callable[[jax.Array], None] | None = None,
) -> Callable[[Any, PromptToPromptInputs], tuple[jax.Array, dict[str, jax.Array]]]:
    """Builds the jitted Prompt-to-Prompt sampler: each pair's two prompts generated together, the UNet batch
    laid out ``[branch, role, pair]`` for the ``PromptToPrompt`` control.

    Returns:
      ``sample(unet_params, inputs) -> (latents (B, 2, h, w, c), maps)``: the input and edited images' scaled
      latents, and, if ``p2p.record_sizes`` is set, ``{layer name: (steps, B, 2, h, w, 77)}`` head-averaged
      cross-attention maps of the text branch as used at each step (``{}`` otherwise).
    """
    scheduler = settings.scheduler
    schedule = scheduler.schedule(settings.num_inference_steps)
    num_steps = settings.num_inference_steps

    def by_role(x):  # (B, 2, ...) -> (2 B, ...), roles outermost
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

    def by_pair(x):  # (2 B, ...) -> (B, 2, ...)
        return jnp.swapaxes(x.reshape(2, -1, *x.shape[1:]), 0, 1)

    def step(unet_params, inputs, carry, index):
        sample, previous_x0 = carry
        control = PromptToPrompt(
            mapper=inputs.mapper,
            alphas=inputs.alphas,
            share=shares_attention(index, num_steps, inputs.p),
            branches=2 if settings.guidance else 1,
            cross_attention_sharing=p2p.cross_attention,
            self_attention_sharing=p2p.self_attention,
            self_attention_max_size=p2p.self_attention_max_size,
        )
        if p2p.record_sizes is not None:  # the maps as used: the recorder after the replacement
            control = Compose(control, RecordCrossAttention(sizes=p2p.record_sizes))
        flat = by_role(sample)
        model_input = scheduler.scale_model_input(schedule, index, flat)
        twice = lambda x: jnp.concatenate([x, x])  # noqa: E731  (same for both roles)
        eps, aux = guided_text_eps(
            unet_apply,
            unet_params,
            model_input,
            schedule.timesteps[index],
            by_role(inputs.context),
            twice(inputs.null_context),
            twice(inputs.guidance_scale),
            settings.guidance,
            control,
        )
        flat, x0 = denoise(scheduler, schedule, index, flat, eps, twice(inputs.keys), by_role(previous_x0))
        maps = {}
        if p2p.record_sizes is not None:  # the text branch's (2 B, h, w, T) maps of each layer, by pair
            maps = {name: by_pair(m[: flat.shape[0]]) for name, m in control.split(aux)[1].items()}
        return (by_pair(flat), by_pair(x0)), maps

    def sample(unet_params, inputs: PromptToPromptInputs):
        noise = inputs.latents if inputs.latents is not None else start_noise(inputs.keys, settings.latent_shape)
        start = noise.astype(jnp.float32) * scheduler.init_noise_sigma(schedule)
        latents = jnp.broadcast_to(start[:, None], (start.shape[0], 2, *start.shape[1:]))

        steps = jnp.arange(num_steps)
        carry = (latents, jnp.zeros_like(latents))
        (latents, _), maps = run_steps(step, mesh, unet_params, inputs, carry, steps, progress)
        return latents, maps

    return jax.jit(sample)
