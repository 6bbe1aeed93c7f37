"""The functional core of an InstructPix2Pix edit: pixels and token ids in, pictures out, a pure function of the
params. Call it under your own ``jax.jit`` (or inside a larger program) with any params: fine-tuned, EMA, LoRA-merged,
sharded. ``InstructPix2PixPipeline`` is the convenience around the same steps: it loads params, tokenizes, groups
images by size, pads batches to the mesh, shows progress and runs FoI.

    models = EditModels(pipe.unet, pipe.vae, pipe.text_encoder)
    settings = SamplerSettings(pipe.scheduler, num_inference_steps=20)
    run = jax.jit(functools.partial(edit, models, settings=settings, mesh=pipe.mesh))
    pictures = run(params, EditInputs(pixels, input_ids, null_ids, keys, guidance_scale, image_guidance_scale))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from ip2p_jax.sampling import SamplerInputs, SamplerSettings, make_ip2p_sampler


@dataclasses.dataclass(frozen=True)
class EditModels:
    """The modules of an edit (their definitions; the params come with each call)."""

    unet: Any
    vae: Any
    text_encoder: Any


class EditInputs(struct.PyTreeNode):
    """One batch of edits, every array batched over images ``B`` (a multiple of the mesh's ``data`` axis).

    Attributes:
      pixels: ``(B, H, W, 3)`` float32 in [-1, 1] (``image_processing.preprocess``), ``H`` and ``W`` multiples of
        the VAE's scale factor.
      input_ids: ``(B, 77)`` int32 instruction ids (``tokenizer.tokenize``).
      null_ids: ``(1, 77)`` int32 ids of the empty instruction ``""``.
      keys: ``(B,)`` typed PRNG keys, one per image (the pipeline's: ``fold_in(key(seed), i)``).
      guidance_scale: ``(B,)`` float32 text guidance ``s_T``.
      image_guidance_scale: ``(B,)`` float32 image guidance ``s_I``.
    """

    pixels: jax.Array
    input_ids: jax.Array
    null_ids: jax.Array
    keys: jax.Array
    guidance_scale: jax.Array
    image_guidance_scale: jax.Array


def edit(models: EditModels, params: dict, inputs: EditInputs, *, settings: SamplerSettings, mesh) -> jax.Array:
    """Encode, sample, decode: ``params`` (``{"unet", "vae", "text_encoder"}``) and ``inputs`` -> the edited
    pictures ``(B, H, W, 3)`` float32 in [0, 1]. Pure; ``settings`` and ``mesh`` are static (bind them before
    ``jit``)."""
    vae, text = models.vae, models.text_encoder
    image_latents = vae.apply({"params": params["vae"]}, inputs.pixels, method="encode")[0]
    context = text.apply({"params": params["text_encoder"]}, inputs.input_ids)
    null_context = text.apply({"params": params["text_encoder"]}, inputs.null_ids)
    sampler = make_ip2p_sampler(lambda p, *a: models.unet.apply({"params": p}, *a), settings, mesh)
    latents = sampler(
        params["unet"],
        SamplerInputs(
            image_latents=image_latents,
            context=context,
            null_context=jnp.broadcast_to(null_context, context.shape),
            keys=inputs.keys,
            guidance_scale=inputs.guidance_scale,
            image_guidance_scale=inputs.image_guidance_scale,
        ),
    )
    decoded = vae.apply({"params": params["vae"]}, latents / vae.config.scaling_factor, method="decode")
    return jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
