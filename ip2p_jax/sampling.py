"""The InstructPix2Pix sampler: the whole denoising loop as one jitted function, sharded over a device mesh.

``make_ip2p_sampler`` returns ``sample(unet_params, inputs) -> latents``. Inside: the start latents, then a
``lax.scan`` over the steps; each step is a ``shard_map`` over the mesh's ``data`` axis, so every device runs the
UNet on its own images (params replicated, no communication), with the guidance batch laid out
``[branch, image]`` as attention controls expect.

Randomness is per image: image ``i``'s key gives its start noise and, folded with the step index, each
ancestral step's noise, so an image's result does not depend on the batch it was run in or on the mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from ip2p_jax.guidance import dual_guidance
from ip2p_jax.parallel import DATA
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
    """

    image_latents: jax.Array
    context: jax.Array
    null_context: jax.Array
    keys: jax.Array
    guidance_scale: jax.Array
    image_guidance_scale: jax.Array
    latents: jax.Array | None = None


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


def _normal_per_image(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys)


def start_latents(settings: SamplerSettings, schedule, inputs: SamplerInputs) -> jax.Array:
    """The sample at the first step run: noise times ``init_noise_sigma`` at full strength (``latents`` given or
    drawn from each image's key), else the scaled image latent noised to the entry step."""
    shape = inputs.image_latents.shape[1:]
    noise = inputs.latents
    if noise is None:
        noise = _normal_per_image(jax.vmap(lambda key: jax.random.fold_in(key, 0))(inputs.keys), shape)
    scheduler = settings.scheduler
    if settings.first_step == 0:
        return noise.astype(jnp.float32) * scheduler.init_noise_sigma(schedule)
    clean = settings.scaling_factor * inputs.image_latents.astype(jnp.float32)
    return scheduler.add_noise(schedule, settings.first_step, clean, noise.astype(jnp.float32))


def step_noise(keys: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Ancestral noise of step ``index`` for each image: ``N(0, 1)`` from ``fold_in(fold_in(key, 1), index)``."""
    return _normal_per_image(jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, 1), index))(keys), shape)


def guided_eps(
    unet_apply: Callable,
    unet_params: Any,
    model_input: jax.Array,
    timestep: jax.Array,
    inputs: SamplerInputs,
    dual: bool,
    control: Any = None,
) -> tuple[jax.Array, Any]:
    """One UNet call over the guidance batch and the guided epsilon.

    Args:
      model_input: ``(B, h, w, 4)`` scheduler-scaled sample.
      dual: three branches ``[text+image, image, none]`` (batch ``3B``) or the text+image branch alone.

    Returns:
      ``(eps, aux)``: guided ``(B, h, w, 4)`` float32 and the control's auxiliary output.
    """
    image_latents = inputs.image_latents.astype(model_input.dtype)
    if dual:
        x = jnp.concatenate([model_input] * 3)
        image = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)])
        context = jnp.concatenate([inputs.context, inputs.null_context, inputs.null_context])
    else:
        x, image, context = model_input, image_latents, inputs.context
    eps, aux = unet_apply(unet_params, jnp.concatenate([x, image], axis=-1), timestep, context, control)
    if not dual:
        return eps.astype(jnp.float32), aux
    eps_3b = eps.reshape(3, -1, *eps.shape[1:])
    return dual_guidance(eps_3b, inputs.guidance_scale, inputs.image_guidance_scale), aux


def make_ip2p_sampler(
    unet_apply: Callable,
    settings: SamplerSettings,
    mesh: Mesh,
    progress: Callable[[jax.Array], None] | None = None,
) -> Callable[[Any, SamplerInputs], jax.Array]:
    """Builds the jitted sampler.

    Args:
      unet_apply: ``(params, sample_bhwc, timestep, context, control) -> (eps, aux)``, e.g.
        ``lambda p, *a: unet.apply({"params": p}, *a)``.
      settings: static sampler settings.
      mesh: a mesh with a ``data`` axis; the batch must divide by its size (``parallel.pad_batch``).
      progress: optional host callback given the number of steps done after each step (a progress bar);
        it runs asynchronously with the loop.

    Returns:
      ``sample(unet_params, inputs) -> (B, h, w, 4)`` float32 latents (scaled, for ``decode / scaling_factor``).
    """
    scheduler = settings.scheduler
    schedule = scheduler.schedule(settings.num_inference_steps)
    first = settings.first_step

    def local_step(unet_params, inputs, sample, previous_x0, index):
        model_input = scheduler.scale_model_input(schedule, index, sample)
        eps, _ = guided_eps(
            unet_apply, unet_params, model_input, schedule.timesteps[index], inputs, settings.dual_guidance
        )
        noise = step_noise(inputs.keys, index, sample.shape[1:])
        return scheduler.step(schedule, index, sample, eps, noise, previous_x0)

    batch = PartitionSpec(DATA)
    sharded_step = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(PartitionSpec(), batch, batch, batch, PartitionSpec()),
        out_specs=(batch, batch),
    )

    def sample(unet_params, inputs: SamplerInputs) -> jax.Array:
        latents = start_latents(settings, schedule, inputs)

        def body(carry, index):
            latents, previous_x0 = carry
            latents, x0 = sharded_step(unet_params, inputs, latents, previous_x0, index)
            if progress is not None:
                jax.debug.callback(progress, index - first + 1)
            return (latents, x0), None

        steps = jnp.arange(first, settings.num_inference_steps)
        (latents, _), _ = jax.lax.scan(body, (latents, jnp.zeros_like(latents)), steps)
        return latents

    return jax.jit(sample)
