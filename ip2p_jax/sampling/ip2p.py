"""The InstructPix2Pix sampler: the whole denoising loop as one jitted function, sharded over a device mesh.

``make_ip2p_sampler`` returns ``sample(unet_params, inputs) -> latents``: the start latents, then the IP2P step
(``IP2PStep``: the UNet on IP2P's guidance branches, their guidance, the scheduler's step) run by the sampler
core's ``run_steps`` (``sampling/core.py``: a ``lax.scan`` of ``shard_map`` calls over the mesh's ``data`` axis).
FoI's sampler (``ip2p_jax.foi.sampler``) runs the same step with its control and mask.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from ip2p_jax.guidance import dual_guidance
from ip2p_jax.models.attention import RecordCrossAttention, mean_of_layers
from ip2p_jax.models.unet import level_size
from ip2p_jax.sampling.core import denoise, run_steps, start_noise, unet_on_branches
from ip2p_jax.schedulers import Scheduler


class SamplerInputs(struct.PyTreeNode):
    """What one batch of edits needs, every array batched over images ``B`` (sharded over ``data``).

    Attributes:
      image_latents: ``(B, h, w, 4)`` unscaled ``E(image).mode()``, the UNet's conditioning channels.
      context: ``(B, 77, D)`` instruction encodings.
      null_context: ``(B, 77, D)`` encodings of ``""`` (used by the image-only and unconditional branches).
      keys: ``(B,)`` typed PRNG keys, one per image.
      guidance_scale: ``(B,)`` text guidance ``s_T``.
      image_guidance_scale: ``(B,)`` image guidance ``s_I``.
      latents: ``(B, h, w, 4)`` start noise to use instead of the keys' (diffusers' ``latents=``), or ``None``.
      guidance_rescale: ``(B,)`` ``phi`` of ``guidance.rescale_guidance`` applied to the dual guidance, or ``None``
        (no rescale, and none compiled).
    """

    image_latents: jax.Array
    context: jax.Array
    null_context: jax.Array
    keys: jax.Array
    guidance_scale: jax.Array
    image_guidance_scale: jax.Array
    latents: jax.Array | None = None
    guidance_rescale: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Static settings: a change compiles a new sampler.

    Attributes:
      scheduler: the step rule and its config.
      num_inference_steps: length of the full schedule.
      strength: fraction of the schedule run, from the noised image latent when below 1 (diffusers' img2img);
        1 starts from pure noise as InstructPix2Pix does.
      dual_guidance: three guidance branches; ``False`` runs the text+image branch alone (scales <= 1).
      scaling_factor: the VAE's latent scale, for the ``strength < 1`` start.
    """

    scheduler: Scheduler
    num_inference_steps: int = 100
    strength: float = 1.0
    dual_guidance: bool = True
    scaling_factor: float = 0.18215

    @property
    def num_steps_run(self) -> int:
        return self.scheduler.steps_for_strength(self.num_inference_steps, self.strength)

    @property
    def first_step(self) -> int:
        return self.num_inference_steps - self.num_steps_run


@dataclasses.dataclass(frozen=True)
class AttentionRecording:
    """Which cross-attention an IP2P edit averages into token maps (``pipeline(..., attention=)``;
    docs/attention.md): the text+image branch's head-averaged probabilities, over the layers of one resolution
    level and a range of the steps run.

    Attributes:
      level: resolution level of the layers averaged, 0 at the latent's size, +1 per downsampling (Stable
        Diffusion at 512 px: 64, 32, 16 and 8 px layers at levels 0-3; level 2, 16 x 16, is where Prompt-to-Prompt
        and FoI read words).
      steps: ``(start, stop)`` fractions of the steps run whose maps are averaged (``steps_recorded``).
    """

    level: int = 2
    steps: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        start, stop = self.steps
        if not (isinstance(self.level, int) and self.level >= 0):
            raise ValueError(f"attention level must be an integer >= 0, got {self.level!r}")
        if not 0.0 <= start < stop <= 1.0:
            raise ValueError(f"attention steps must be fractions 0 <= start < stop <= 1, got {self.steps!r}")

    def steps_recorded(self, steps_run: int) -> tuple[int, int]:
        """The ``[first, stop)`` indices (among the steps run) averaged; at least one step."""
        first = min(int(self.steps[0] * steps_run), steps_run - 1)
        return first, max(first + 1, math.ceil(self.steps[1] * steps_run))


def start_latents(settings: SamplerSettings, schedule, inputs: SamplerInputs) -> jax.Array:
    """The sample at the first step run: noise times ``init_noise_sigma`` at full strength (``latents`` given or
    drawn from each image's key), else the scaled image latent noised to the entry step."""
    noise = inputs.latents
    if noise is None:
        noise = start_noise(inputs.keys, inputs.image_latents.shape[1:])
    scheduler = settings.scheduler
    if settings.first_step == 0:
        return noise.astype(jnp.float32) * scheduler.init_noise_sigma(schedule)
    clean = settings.scaling_factor * inputs.image_latents.astype(jnp.float32)
    return scheduler.add_noise(schedule, settings.first_step, clean, noise.astype(jnp.float32))


def ip2p_branches(
    inputs: SamplerInputs, dual: bool, dtype, text_contexts: list[jax.Array] | None = None
) -> tuple[list[jax.Array], list[jax.Array]]:
    """The text and image conditionings of IP2P's guidance branches (``ip2p_jax.guidance``'s order):
    ``[text+image, image only, none]``, or the text+image branch alone when ``dual`` is ``False``. With
    ``text_contexts`` (``(B, 77, D)`` each; FoI's per-instruction mode), one text+image branch for each, in place of
    ``inputs.context``'s."""
    image = inputs.image_latents.astype(dtype)
    texts = [inputs.context] if text_contexts is None else list(text_contexts)
    if not dual:
        return texts, [image] * len(texts)
    null = inputs.null_context
    return [*texts, null, null], [image] * (len(texts) + 1) + [jnp.zeros_like(image)]


@dataclasses.dataclass(frozen=True)
class IP2PStep:
    """IP2P's step function (``sampling/core.py``), in two halves that FoI's mask step calls apart.

    ``step(unet_params, inputs, (sample, previous_x0), index, control=None, text_mask=None) -> ((sample, x0),
    aux)``: the UNet on the guidance branches (one call, ``3B`` images, or ``B`` without dual guidance), the dual
    guidance (its text term times ``text_mask`` ``(B, h, w, 1)`` when given: FoI's decoupled guidance), then the
    scheduler's step; ``aux`` is the attention control's auxiliary output.
    """

    unet_apply: Callable
    settings: SamplerSettings
    schedule: Any

    def branch_outputs(self, unet_params, inputs: SamplerInputs, sample, index, control=None, text_contexts=None):
        """The UNet's ``(n, B, h, w, c)`` outputs on the guidance branches (``ip2p_branches``), and the control's
        aux."""
        model_input = self.settings.scheduler.scale_model_input(self.schedule, index, sample)
        contexts, images = ip2p_branches(inputs, self.settings.dual_guidance, model_input.dtype, text_contexts)
        timestep = self.schedule.timesteps[index]
        return unet_on_branches(self.unet_apply, unet_params, model_input, timestep, contexts, images, control)

    def guide_and_denoise(self, inputs: SamplerInputs, carry, index, outputs, text_mask=None):
        """The guided output of the branches' ``outputs`` and the scheduler's step: ``(sample, x0)``."""
        if self.settings.dual_guidance:
            guided = dual_guidance(
                outputs, inputs.guidance_scale, inputs.image_guidance_scale, text_mask, inputs.guidance_rescale
            )
        else:
            guided = outputs[0].astype(jnp.float32)
        return self.denoise(inputs, carry, index, guided)

    def denoise(self, inputs: SamplerInputs, carry, index, guided):
        """The scheduler's step from the guided output ``(B, h, w, c)``: ``(sample, x0)``."""
        sample, previous_x0 = carry
        return denoise(self.settings.scheduler, self.schedule, index, sample, guided, inputs.keys, previous_x0)

    def __call__(self, unet_params, inputs: SamplerInputs, carry, index, control=None, text_mask=None):
        outputs, aux = self.branch_outputs(unet_params, inputs, carry[0], index, control)
        return self.guide_and_denoise(inputs, carry, index, outputs, text_mask), aux


def make_ip2p_sampler(
    unet_apply: Callable,
    settings: SamplerSettings,
    mesh: Mesh,
    progress: Callable[[jax.Array], None] | None = None,
    attention: AttentionRecording | None = None,
) -> Callable[[Any, SamplerInputs], jax.Array]:
    """Builds the jitted sampler.

    Args:
      unet_apply: ``(params, sample_bhwc, timestep, context, control) -> (eps, aux)``, e.g.
        ``lambda p, *a: unet.apply({"params": p}, *a)``.
      settings: static sampler settings.
      mesh: a mesh with a ``data`` axis; the batch must divide by its size (``parallel.pad_batch``).
      progress: optional host callback given the number of steps done after each step (a progress bar);
        it runs asynchronously with the loop.
      attention: also average the text+image branch's cross-attention as ``attention`` says.

    Returns:
      ``sample(unet_params, inputs) -> (B, h, w, 4)`` float32 latents (scaled, for ``decode / scaling_factor``);
      with ``attention``, ``(latents, maps)``: ``(B, mh, mw, T)`` float32 token maps of the layers at
      ``attention.level``, averaged over them and over ``attention.steps_recorded``.
    """
    schedule = settings.scheduler.schedule(settings.num_inference_steps)
    first = settings.first_step
    step = IP2PStep(unet_apply, settings, schedule)
    steps = jnp.arange(first, settings.num_inference_steps)

    if attention is None:

        def plain(unet_params, inputs, carry, index):
            return step(unet_params, inputs, carry, index)[0], None

        def sample(unet_params, inputs: SamplerInputs):
            latents = start_latents(settings, schedule, inputs)
            carry = (latents, jnp.zeros_like(latents))
            (latents, _), _ = run_steps(plain, mesh, unet_params, inputs, carry, steps, progress, first)
            return latents

        return jax.jit(sample)

    recorded_first, recorded_stop = attention.steps_recorded(settings.num_steps_run)

    def recording(unet_params, inputs, carry, index):
        *carry, maps_sum = carry
        control = RecordCrossAttention(sizes=(level_size(carry[0].shape[1:3], attention.level),))
        carry, aux = step(unet_params, inputs, tuple(carry), index, control)
        maps = mean_of_layers(aux)[: carry[0].shape[0]]  # the text+image branch
        recorded = (index - first >= recorded_first) & (index - first < recorded_stop)
        return (*carry, maps_sum + jnp.where(recorded, maps, 0.0)), None

    def sample_recording(unet_params, inputs: SamplerInputs):
        latents = start_latents(settings, schedule, inputs)
        height, width = level_size(latents.shape[1:3], attention.level)
        maps_sum = jnp.zeros((latents.shape[0], height, width, inputs.context.shape[1]), jnp.float32)
        carry = (latents, jnp.zeros_like(latents), maps_sum)
        (latents, _, maps_sum), _ = run_steps(recording, mesh, unet_params, inputs, carry, steps, progress, first)
        return latents, maps_sum / (recorded_stop - recorded_first)

    return jax.jit(sample_recording)
