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
import json
import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path
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
    """One UNet call over the guidance batch and the guided model output (epsilon or v, as the UNet predicts).

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
    guided = dual_guidance(
        eps_3b, inputs.guidance_scale, inputs.image_guidance_scale, guidance_rescale=inputs.guidance_rescale
    )
    return guided, aux


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
    from ip2p_jax.models.attention import RecordCrossAttention, mean_of_layers

    scheduler = settings.scheduler
    schedule = scheduler.schedule(settings.num_inference_steps)
    first = settings.first_step
    if attention is not None:
        recorded_first, recorded_stop = attention.steps_recorded(settings.num_steps_run)

    def local_step(unet_params, inputs, sample, previous_x0, index):
        model_input = scheduler.scale_model_input(schedule, index, sample)
        control = None
        if attention is not None:
            control = RecordCrossAttention(sizes=(level_size(sample.shape[1:3], attention.level),))
        eps, aux = guided_eps(
            unet_apply, unet_params, model_input, schedule.timesteps[index], inputs, settings.dual_guidance, control
        )
        noise = step_noise(inputs.keys, index, sample.shape[1:])
        latents, x0 = scheduler.step(schedule, index, sample, eps, noise, previous_x0)
        if attention is None:
            return latents, x0
        return latents, x0, mean_of_layers(aux)[: sample.shape[0]]  # the text+image branch

    batch = PartitionSpec(DATA)
    sharded_step = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(PartitionSpec(), batch, batch, batch, PartitionSpec()),
        out_specs=(batch, batch) if attention is None else (batch, batch, batch),
    )

    def sample(unet_params, inputs: SamplerInputs):
        latents = start_latents(settings, schedule, inputs)

        def body(carry, index):
            latents, previous_x0, maps_sum = carry
            latents, x0, *maps = sharded_step(unet_params, inputs, latents, previous_x0, index)
            if attention is not None:
                recorded = (index - first >= recorded_first) & (index - first < recorded_stop)
                maps_sum = maps_sum + jnp.where(recorded, maps[0], 0.0)
            if progress is not None:
                jax.debug.callback(progress, index - first + 1)
            return (latents, x0, maps_sum), None

        maps_sum = jnp.zeros(())
        if attention is not None:
            height, width = level_size(latents.shape[1:3], attention.level)
            maps_sum = jnp.zeros((latents.shape[0], height, width, inputs.context.shape[1]), jnp.float32)
        steps = jnp.arange(first, settings.num_inference_steps)
        (latents, _, maps_sum), _ = jax.lax.scan(body, (latents, jnp.zeros_like(latents), maps_sum), steps)
        if attention is None:
            return latents
        return latents, maps_sum / (recorded_stop - recorded_first)

    return jax.jit(sample)


# ---------------------------------------------------------------------------------------------- FoI


FOI_CONFIG = "foi_config.json"  # a model folder's recommended FoI settings (``FoIConfig.for_model``)


@dataclasses.dataclass(frozen=True)
class FoIConfig:
    """Every setting of Focus on Your Instruction (``docs/foi.md`` explains each). Defaults: paper 5.1.

    Attributes:
      strength: the edit enters the schedule at ``strength`` (0.8: 80 of 100 steps run).
      gamma: rounds of square + min-max in mask extraction (4.1).
      tau: mask threshold, a value or a ``(low, high)`` range drawn per image from its key (paper: [0.4, 0.7]).
      filter_size, filter_sigma: the Gaussian filter of the keyword maps (4.1).
      mask_downsample: a power of two ``d``; the masks have the size of the UNet's layers ``log2(d)`` levels
        below the latent (16 x 16 for a 64 x 64 latent and ``d = 4``; 19 x 13 for a 75 x 50 one: each level rounds
        up, as the stride-2 convolutions do; ``mask_size``); maps are averaged over every cross-attention layer of
        that size.
      mask_step: which step run records the maps and builds the masks (0 = the first); earlier steps are plain
        IP2P.
      modulation: cross-condition attention modulation on or off (4.2).
      modulation_stop: fraction of the steps run after which modulation stops (1 = never).
      outside_values: outside the mask, the text+image branch combines the image-only probabilities with its own
        values (``"own"``) or with the image-only branch's values (``"image_only"``).
      decoupled_guidance: the masked text term of 4.3 on or off.
      decoupled_fraction: fraction of the steps run that use decoupled guidance (0.75).
    """

    strength: float = 0.8
    gamma: int = 3
    tau: float | tuple[float, float] = 0.5
    filter_size: int = 3
    filter_sigma: float = 0.5
    mask_downsample: int = 4
    mask_step: int = 0
    modulation: bool = True
    modulation_stop: float = 1.0
    outside_values: str = "own"
    decoupled_guidance: bool = True
    decoupled_fraction: float = 0.75

    def __post_init__(self):
        """Checks every setting against its range, so that none can silently switch FoI off (a ``tau`` above 1 gives
        empty masks and an edit that does almost nothing); the errors name the setting and its range. Numbers are
        stored as Python ``int`` / ``float`` (NumPy scalars are accepted), ``tau`` ranges as tuples."""
        real, integer = _check_real, _check_int
        unit = lambda x: 0.0 <= x <= 1.0  # noqa: E731
        settings = dict(
            strength=real("strength", self.strength, "in (0, 1]", lambda x: 0.0 < x <= 1.0),
            gamma=integer("gamma", self.gamma, "an integer >= 0", lambda x: x >= 0),
            tau=_check_tau(self.tau),
            filter_size=integer("filter_size", self.filter_size, "a positive odd integer", lambda x: x > 0 and x % 2),
            filter_sigma=real("filter_sigma", self.filter_sigma, "a finite number > 0", lambda x: x > 0.0),
            mask_downsample=integer(
                "mask_downsample", self.mask_downsample, "a power of two >= 1", lambda x: x >= 1 and not x & (x - 1)
            ),
            mask_step=integer("mask_step", self.mask_step, "an integer >= 0", lambda x: x >= 0),
            modulation_stop=real("modulation_stop", self.modulation_stop, "in [0, 1]", unit),
            decoupled_fraction=real("decoupled_fraction", self.decoupled_fraction, "in [0, 1]", unit),
        )
        for name in ("modulation", "decoupled_guidance"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.outside_values not in ("own", "image_only"):
            raise ValueError(f"outside_values must be 'own' or 'image_only', got {self.outside_values!r}")
        for name, value in settings.items():
            object.__setattr__(self, name, value)

    @property
    def mask_level(self) -> int:
        """The UNet resolution level of the masks: ``log2(mask_downsample)`` (0 at the latent's size)."""
        return self.mask_downsample.bit_length() - 1

    @classmethod
    def for_model(cls, model: str | os.PathLike, **overrides) -> FoIConfig:
        """The paper's settings, updated by the model folder's ``foi_config.json`` where it has one (settings its
        makers chose for its architecture, e.g. the shipped ShapesEdit model's mask resolution), then by
        ``overrides``. Unknown or invalid settings in the file are errors that name it (even when overridden)."""
        path = Path(model) / FOI_CONFIG
        settings = json.loads(path.read_text()) if path.is_file() else {}
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"{path}: unknown FoI settings {unknown}")
        try:
            cls(**settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None
        return cls(**{**settings, **overrides})


def _is_real(value) -> bool:
    """A finite real number (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_real(name: str, value, expected: str, ok) -> float:
    """``value`` as a ``float``, or a ``ValueError`` naming the setting and its range unless it is a finite real
    number passing ``ok``."""
    if not (_is_real(value) and ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _check_int(name: str, value, expected: str, ok) -> int:
    """``value`` as an ``int``, or a ``ValueError`` naming the setting and its range unless it is an integer (not a
    bool) passing ``ok``."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def _check_tau(tau) -> float | tuple[float, float]:
    """``tau`` as a ``float`` in [0, 1] or a ``(low, high)`` tuple with ``0 <= low <= high <= 1``."""
    if isinstance(tau, list | tuple):
        if not (len(tau) == 2 and all(map(_is_real, tau)) and 0.0 <= tau[0] <= tau[1] <= 1.0):
            raise ValueError(f"tau must be a (low, high) range with 0 <= low <= high <= 1, got {tau!r}")
        return float(tau[0]), float(tau[1])
    return _check_real(
        "tau", tau, "in [0, 1], or a (low, high) range with 0 <= low <= high <= 1", lambda x: 0 <= x <= 1
    )


def level_size(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial size ``(height, width)`` of the UNet's layers ``level`` downsamplings below the latent: each stride-2
    3 x 3 convolution (padding 1) maps ``n`` to ``ceil(n / 2)``, so a latent of height 50 and width 75 has levels of
    (25, 38) and (13, 19), not the floor division's (25, 37) and (12, 18)."""
    height, width = latent_size
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


def mask_size(latent_size: tuple[int, int], mask_downsample: int) -> tuple[int, int]:
    """The FoI mask resolution: the size of the UNet's layers at level ``log2(mask_downsample)``
    (``mask_downsample`` a power of two)."""
    if mask_downsample < 1 or mask_downsample & (mask_downsample - 1):
        raise ValueError(f"mask_downsample must be a power of two >= 1, got {mask_downsample!r}")
    return level_size(latent_size, mask_downsample.bit_length() - 1)


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
) -> Callable[[Any, SamplerInputs, FoIInputs], tuple[jax.Array, jax.Array]]:
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
    from ip2p_jax import foi
    from ip2p_jax.models.attention import RecordCrossAttention, mean_of_layers

    if not settings.dual_guidance:
        raise ValueError("FoI needs the three guidance branches (guidance_scale > 1, image_guidance_scale >= 1)")
    scheduler, cfg = settings.scheduler, foi_config
    schedule = scheduler.schedule(settings.num_inference_steps)
    first, steps_run = settings.first_step, settings.num_steps_run
    if cfg.mask_step >= steps_run:
        raise ValueError(f"mask_step {cfg.mask_step} is not among the {steps_run} steps run")
    masks_hw = mask_size(latent_size, cfg.mask_downsample)
    train_steps = scheduler.config.num_train_timesteps

    def decoupled_mask(masks, run_index):
        """``(B, h, w, 1)`` text-guidance mask of this step: ``M_union`` in the decoupled window, else ones."""
        union = foi.resize_masks(foi.union_mask(masks)[:, None], latent_size)[:, 0, :, :, None]
        in_window = cfg.decoupled_guidance & (run_index < cfg.decoupled_fraction * steps_run)
        return jnp.where(in_window, union, jnp.ones_like(union))

    def plain_step(unet_params, inputs, sample, previous_x0, index):
        model_input = scheduler.scale_model_input(schedule, index, sample)
        eps, _ = guided_eps(unet_apply, unet_params, model_input, schedule.timesteps[index], inputs, True)
        noise = step_noise(inputs.keys, index, sample.shape[1:])
        return scheduler.step(schedule, index, sample, eps, noise, previous_x0)

    def three_branch_eps(unet_params, inputs, sample, index, control):
        model_input = scheduler.scale_model_input(schedule, index, sample)
        image_latents = inputs.image_latents.astype(model_input.dtype)
        x = jnp.concatenate([model_input] * 3)
        image = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)])
        context = jnp.concatenate([inputs.context, inputs.null_context, inputs.null_context])
        eps, aux = unet_apply(unet_params, jnp.concatenate([x, image], -1), schedule.timesteps[index], context, control)
        return eps.reshape(3, -1, *eps.shape[1:]), aux

    def guide_and_step(inputs, sample, previous_x0, index, eps_3b, masks):
        text_mask = decoupled_mask(masks, index - first)
        eps = dual_guidance(
            eps_3b, inputs.guidance_scale, inputs.image_guidance_scale, text_mask, inputs.guidance_rescale
        )
        noise = step_noise(inputs.keys, index, sample.shape[1:])
        return scheduler.step(schedule, index, sample, eps, noise, previous_x0)

    def mask_step(unet_params, inputs, foi_inputs, sample, previous_x0, index):
        control = RecordCrossAttention(sizes=(masks_hw,))
        eps_3b, aux = three_branch_eps(unet_params, inputs, sample, index, control)
        if not aux:  # at trace time; the pipeline checks the UNet's config before it compiles anything
            _, every = three_branch_eps(unet_params, inputs, sample, index, RecordCrossAttention())
            sizes = sorted({tuple(maps.shape[1:3]) for maps in every.values()}, reverse=True)
            raise ValueError(
                f"mask_downsample {cfg.mask_downsample} asks for masks of {masks_hw[0]} x {masks_hw[1]} (a "
                f"{latent_size[0]} x {latent_size[1]} latent halved {cfg.mask_level} times, rounding up), but the "
                f"UNet has no cross-attention layer of that size; its layers have sizes {sizes}"
            )
        maps = mean_of_layers(aux)[: sample.shape[0]]  # the text+image branch
        tau = jax.vmap(lambda key: foi.draw_tau(jax.random.fold_in(key, 2), cfg.tau))(inputs.keys)
        masks = foi.extract_masks(
            maps, foi_inputs.keyword_weights, foi_inputs.valid, tau, cfg.gamma, cfg.filter_size, cfg.filter_sigma
        )
        latents, x0 = guide_and_step(inputs, sample, previous_x0, index, eps_3b, masks)
        return latents, x0, masks, foi.keyword_maps(maps, foi_inputs.keyword_weights)

    def modulated_step(unet_params, inputs, foi_inputs, sample, previous_x0, masks, index):
        run_index = index - first
        control = foi.FoIModulation(
            masks=masks,
            owner=foi_inputs.owner,
            token_alpha=foi_inputs.token_alpha,
            xi_t=foi.xi(schedule.timesteps[index], train_steps),
            active=cfg.modulation & (run_index < cfg.modulation_stop * steps_run),
            outside_values=cfg.outside_values,
        )
        eps_3b, _ = three_branch_eps(unet_params, inputs, sample, index, control)
        return guide_and_step(inputs, sample, previous_x0, index, eps_3b, masks)

    batch, rep = PartitionSpec(DATA), PartitionSpec()
    sharded_plain = jax.shard_map(
        plain_step, mesh=mesh, in_specs=(rep, batch, batch, batch, rep), out_specs=(batch, batch)
    )
    sharded_mask = jax.shard_map(
        mask_step, mesh=mesh, in_specs=(rep, batch, batch, batch, batch, rep), out_specs=(batch,) * 4
    )
    sharded_modulated = jax.shard_map(
        modulated_step,
        mesh=mesh,
        in_specs=(rep, batch, batch, batch, batch, batch, rep),
        out_specs=(batch, batch),
    )

    def report(index):
        if progress is not None:
            jax.debug.callback(progress, index - first + 1)

    def sample(unet_params, inputs: SamplerInputs, foi_inputs: FoIInputs):
        latents = start_latents(settings, schedule, inputs)
        previous_x0 = jnp.zeros_like(latents)

        def plain_body(carry, index):
            carry = sharded_plain(unet_params, inputs, *carry, index)
            report(index)
            return carry, None

        mask_index = first + cfg.mask_step
        if cfg.mask_step > 0:  # (an empty scan would still trace, and compile, a UNet)
            (latents, previous_x0), _ = jax.lax.scan(plain_body, (latents, previous_x0), jnp.arange(first, mask_index))
        latents, previous_x0, masks, maps = sharded_mask(
            unet_params, inputs, foi_inputs, latents, previous_x0, mask_index
        )
        report(mask_index)

        def modulated_body(carry, index):
            carry = sharded_modulated(unet_params, inputs, foi_inputs, *carry, masks, index)
            report(index)
            return carry, None

        rest = jnp.arange(mask_index + 1, settings.num_inference_steps)
        (latents, _), _ = jax.lax.scan(modulated_body, (latents, previous_x0), rest)
        return latents, masks, maps

    return jax.jit(sample)
