"""The sampler core every sampler here is built from: the UNet on named guidance branches, the randomness of
each image, one denoising step, and the steps run as a ``lax.scan`` of ``shard_map`` calls over the mesh.

A sampler is a *step function* ``step(unet_params, batched, carry, index) -> (carry, out)``: ``batched`` holds the
per-image inputs that stay fixed (sharded over ``data``), ``carry`` what the steps update (the sample and the
previous step's clean prediction, and whatever else the sampler carries), ``index`` the step's index in the full
schedule, ``out`` a per-step output or ``None``. ``run_steps`` runs it over the mesh: every device runs the UNet
on its own images, params replicated, no communication.

Randomness is per image and names its purpose: image ``i``'s key gives its start noise from
``fold_in(key, START_NOISE)``, step ``n``'s ancestral noise from ``fold_in(fold_in(key, STEP_NOISE), n)`` and FoI's
threshold from ``fold_in(key, FOI_TAU)``, so an image's result depends on its key alone, not on the batch it was
run in or on the mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ip2p_jax.parallel import DATA
from ip2p_jax.schedulers import Schedule, Scheduler

# What an image's key is folded with for each use (never two uses with one number).
START_NOISE = 0
STEP_NOISE = 1
FOI_TAU = 2


def purpose_keys(keys: jax.Array, purpose: int) -> jax.Array:
    """``(B,)`` keys folded with a purpose (``START_NOISE``, ``STEP_NOISE``, ``FOI_TAU``)."""
    return jax.vmap(lambda key: jax.random.fold_in(key, purpose))(keys)


def normal_per_image(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``N(0, 1)`` float32 ``(B, *shape)``, image ``i``'s from ``keys[i]``."""
    return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys)


def start_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Each image's start noise: ``(B,)`` keys -> ``(B, *shape)`` float32 from ``fold_in(key, START_NOISE)``."""
    return normal_per_image(purpose_keys(keys, START_NOISE), shape)


def step_noise(keys: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Ancestral noise of step ``index`` for each image: ``N(0, 1)`` from
    ``fold_in(fold_in(key, STEP_NOISE), index)``."""
    step_keys = jax.vmap(lambda key: jax.random.fold_in(key, index))(purpose_keys(keys, STEP_NOISE))
    return normal_per_image(step_keys, shape)


def unet_on_branches(
    unet_apply: Callable,
    unet_params: Any,
    model_input: jax.Array,
    timestep: jax.Array,
    contexts: Sequence[jax.Array],
    images: Sequence[jax.Array] | None = None,
    control: Any = None,
) -> tuple[jax.Array, Any]:
    """One UNet call over a guidance batch of ``n`` branches, laid out ``[branch, image]`` as attention controls
    expect. Every branch denoises the same sample; they differ in their conditioning.

    Args:
      unet_apply: ``(params, sample_bhwc, timestep, context, control) -> (output, aux)``.
      model_input: ``(B, h, w, c)`` scheduler-scaled sample.
      contexts: ``n`` text conditionings ``(B, 77, D)``, one per branch (IP2P's in the order of ``ip2p_jax.guidance``).
      images: ``None``, or ``n`` image conditionings ``(B, h, w, c')`` concatenated to the sample's channels (IP2P's
        image latent, zeros where a branch drops it).
      control: an attention control, or ``None``.

    Returns:
      ``(outputs, aux)``: the UNet's outputs ``(n, B, h, w, c)`` (epsilon or v, as it predicts) and the control's
      auxiliary output.
    """
    x = jnp.concatenate([model_input] * len(contexts))
    if images is not None:
        x = jnp.concatenate([x, jnp.concatenate(images)], axis=-1)
    outputs, aux = unet_apply(unet_params, x, timestep, jnp.concatenate(contexts), control)
    return outputs.reshape(len(contexts), -1, *outputs.shape[1:]), aux


def denoise(
    scheduler: Scheduler,
    schedule: Schedule,
    index: jax.Array,
    sample: jax.Array,
    model_output: jax.Array,
    keys: jax.Array,
    previous_x0: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The scheduler's step ``index`` with each image's own ancestral noise: ``(next sample, clean prediction)``,
    both ``(B, h, w, c)``."""
    noise = step_noise(keys, index, sample.shape[1:])
    return scheduler.step(schedule, index, sample, model_output, noise, previous_x0)


def shard_over_images(step: Callable, mesh: Mesh) -> Callable:
    """``step(unet_params, batched, carry, index)`` as a ``shard_map`` over ``mesh``'s ``data`` axis: params and
    index replicated, ``batched``, ``carry`` and the outputs split over images (leading axis)."""
    images, replicated = PartitionSpec(DATA), PartitionSpec()
    in_specs = (replicated, images, images, replicated)
    return jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=images)


def run_steps(
    step: Callable,
    mesh: Mesh,
    unet_params: Any,
    batched: Any,
    carry: Any,
    indices: jax.Array,
    progress: Callable[[jax.Array], None] | None = None,
    first: int = 0,
) -> tuple[Any, Any]:
    """Runs ``step`` for each index of ``indices`` (a ``lax.scan``), each a ``shard_map`` over the mesh.

    Args:
      progress: optional host callback given the number of steps done (``index - first + 1``) after each step;
        it runs asynchronously with the loop.
      first: the index of the first step the sampler runs (for ``progress``).

    Returns:
      ``(carry, outs)``: the last carry and the steps' outputs stacked on a leading axis.
    """
    sharded = shard_over_images(step, mesh)

    def body(carry, index):
        carry, out = sharded(unet_params, batched, carry, index)
        report_progress(progress, index - first + 1)
        return carry, out

    return jax.lax.scan(body, carry, indices)


def report_progress(progress: Callable[[jax.Array], None] | None, done: jax.Array) -> None:
    """Hands ``done`` to the host callback ``progress`` (if any) from inside the jitted loop."""
    if progress is not None:
        jax.debug.callback(progress, done)
