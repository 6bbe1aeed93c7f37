"""The user-facing InstructPix2Pix pipeline: load, encode, edit, decode.

    pipe = InstructPix2PixPipeline.from_pretrained("timbrooks/instruct-pix2pix")
    edited = pipe(image, "make it snow", num_inference_steps=20).images[0]

Arguments and their defaults follow diffusers' ``StableDiffusionInstructPix2PixPipeline``; images are PIL
images or ``uint8`` ``(H, W, 3)`` arrays, and everything inside is NHWC.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ip2p_jax import foi as foi_lib
from ip2p_jax.foi import FoIConfig, FoIInputs, make_foi_sampler
from ip2p_jax.foi import call as foi_call
from ip2p_jax.image_processing import ImageLike, postprocess, preprocess, to_pil, to_rgb_array
from ip2p_jax.models.stack import ModelStack
from ip2p_jax.parallel import batch_sharded, data_mesh, pad_batch, padded_size, replicated
from ip2p_jax.sampling import AttentionRecording, SamplerInputs, SamplerSettings, make_ip2p_sampler
from ip2p_jax.schedulers import Scheduler
from ip2p_jax.tokenizer import tokenize, word_token_weights
from ip2p_jax.weights import load_single_file_stack, load_stack


@dataclasses.dataclass
class EditOutput:
    """What an edit returns.

    Attributes:
      images: PIL images, or float32 ``(H, W, 3)`` arrays in [0, 1] for ``output_type="np"`` (stacked into
        ``(B, H, W, 3)`` when all have one size), in input order.
      masks: FoI edits only: per image, a dict with ``"latent"`` ``(k, h/d, w/d)`` masks at the mask resolution
        and ``"image"`` ``(k, H, W)`` the same masks at the image's resolution (float32 0 / 1), one per
        sub-instruction, and ``"attention"`` ``(k, h/d, w/d)`` each keyword's cross-attention map at the mask step,
        what its mask was cut from.
      attention: IP2P edits with ``attention=`` only: per image, ``(mh, mw, T)`` float32 token maps (the
        ``AttentionRecording``'s layers and steps averaged); ``pipe.word_maps`` picks words out of them.
    """

    images: list | np.ndarray
    masks: list | None = None
    attention: list | None = None


class _Progress:
    """A host-side progress bar that the jitted loop reports to (the jitted function keeps this object)."""

    def __init__(self):
        self.bar = None

    def __call__(self, done) -> None:
        if self.bar is not None:
            self.bar.n = int(done)
            self.bar.refresh()


def _with_attention_backend(attention_backend: str):
    """``load_stack``'s ``prepare_unet``: the UNet with this attention kernel (checked as the UNet is read)."""
    return lambda unet, params: (unet.clone(attention_backend=attention_backend), params)


@dataclasses.dataclass
class _EditCall:
    """One call's options once checked and settled (``InstructPix2PixPipeline._settle``), the same for each of its
    size groups.

    Attributes:
      settings: the sampler's static settings (scheduler, steps, strength, whether the three branches run).
      guidance_scale, image_guidance_scale: the call's scales, one for all its images.
      guidance_rescale: the rescale's ``phi`` where it runs (above 0, with the three branches), else ``None``.
      latents: ``latents=``, the ``(B, h, w, 4)`` start noise, or ``None``.
      keys: per image ``(seed, index)``: it draws from ``fold_in(key(seed), index)`` (``(seed, i)`` for image ``i``
        of a call with one seed, ``(seeds[i], 0)`` for a call with one seed per image).
      foi: FoI's settings; ``None`` for IP2P.
      attention: IP2P's ``attention=``, or ``None``.
      progress, output_type: as given.
    """

    settings: SamplerSettings
    guidance_scale: float
    image_guidance_scale: float
    guidance_rescale: float | None
    latents: np.ndarray | None
    keys: tuple[tuple[int, int], ...]
    foi: FoIConfig | None
    attention: AttentionRecording | None
    progress: bool
    output_type: str


@dataclasses.dataclass
class _SizeGroup:
    """The ``n`` images of a call that share one size, edited as one batch.

    Attributes:
      indices: the images' positions in the call: where their results go, and the ``i`` of their keys.
      pixels: ``(n, H, W, 3)`` float32 in [-1, 1] (``preprocess``).
      prompts: IP2P: the images' instructions; ``None`` for FoI.
      tokens: FoI: each image's ``foi.InstructionTokens`` (composite prompt ids, token owners, keyword weights, in
        the call's ``K`` sub-instruction slots); ``None`` for IP2P.
        ``foi.BranchTokens`` in the per-instruction mode.
      counts: FoI: each image's number of sub-instructions, ``k <= K``; ``None`` for IP2P.
      masks: FoI with ``masks=``: each image's ``(k, H, W)`` float32 masks as given; else ``None``.
    """

    indices: list[int]
    pixels: np.ndarray
    prompts: list[str] | None
    tokens: list[foi_lib.InstructionTokens] | list[foi_lib.BranchTokens] | None
    counts: list[int] | None
    masks: list[np.ndarray] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``, the images' size in pixels."""
        return self.pixels.shape[1:3]


class InstructPix2PixPipeline:
    """InstructPix2Pix editing with Flax models, jitted and sharded over the devices of ``mesh``.

    Attributes:
      unet, vae, text_encoder: Flax modules; ``params`` holds their float32 params under those names,
        replicated over the mesh.
      tokenizer: the CLIP tokenizer.
      scheduler: the checkpoint's scheduler (``scheduler=`` in a call overrides it).
      mesh: the device mesh; batches are split over its ``data`` axis.
      foi_config: the FoI settings of a call that gives ``instructions=`` and no ``foi=``: the model's own
        (``FoIConfig.for_model``: the paper's, updated by the model folder's ``foi_config.json``).
    """

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler: Scheduler,
        params: dict,
        mesh=None,
        foi_config: FoIConfig | None = None,
    ):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.foi_config = FoIConfig() if foi_config is None else foi_config
        self.mesh = data_mesh() if mesh is None else mesh
        self.params = jax.device_put(params, replicated(self.mesh))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._progress = _Progress()
        self._samplers: dict[SamplerSettings, Any] = {}
        self._compiled: dict[tuple, Any] = {}  # (sampler, argument signature) -> compiled sampler
        self._encode_text = jax.jit(lambda p, ids: text_encoder.apply({"params": p}, ids))
        self._encode_image = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode")[0])
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z / vae.config.scaling_factor, method="decode"))

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        dtype: Any = jnp.float32,
        revision: str | None = None,
        variant: str | None = None,
        mesh=None,
        attention_backend: str = "auto",
    ) -> InstructPix2PixPipeline:
        """Loads a diffusers-layout folder or hub repo id (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/``). ``dtype`` is the compute dtype of the UNet and the text encoder (``jnp.bfloat16`` on
        accelerators); params stay float32, and so do the autoencoder and the scheduler's arithmetic: the
        autoencoder runs once per image (float32 costs little beside the UNet's steps) and its decoder is where
        half precision overflows (diffusers upcasts SDXL's for that reason), and the sampler keeps latents, noise
        and model outputs in float32 between steps, so that rounding does not accumulate over the schedule.
        ``attention_backend`` forces the UNet's attention kernel (``models/attention_kernels.py``; ``"auto"``: the
        platform's)."""
        stack = load_stack(
            path_or_repo_id,
            dtype=dtype,
            vae_dtype=jnp.float32,
            revision=revision,
            variant=variant,
            prepare_unet=_with_attention_backend(attention_backend),
        )
        return cls.from_stack(stack, mesh, FoIConfig.for_model(path_or_repo_id, revision=revision))

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        config: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        ema: bool = False,
        dtype: Any = jnp.float32,
        revision: str | None = None,
        mesh=None,
        attention_backend: str = "auto",
    ) -> InstructPix2PixPipeline:
        """Loads a single-file checkpoint in the original LDM layout (``.safetensors``, or ``.ckpt`` with
        ``allow_pickle``): the original InstructPix2Pix release, MagicBrush, Stable Diffusion 1.x / 2.x files with 4
        or 8 input channels (``weights/single_file.py``). The tokenizer, the scheduler, every component's config and
        any component the file lacks come from ``config``, a diffusers folder or hub repo id of the same
        architecture (by default the one ``weights.SINGLE_FILE_CONFIGS`` names for the file); ``ema`` takes the
        UNet's EMA weights where the file has both. ``foi_config`` is ``config``'s where it names a folder with a
        ``foi_config.json``, else the paper's. Other arguments as ``from_pretrained``."""
        stack = load_single_file_stack(
            path,
            config,
            allow_pickle=allow_pickle,
            ema=ema,
            revision=revision,
            dtype=dtype,
            prepare_unet=_with_attention_backend(attention_backend),
        )
        foi_config = FoIConfig() if config is None else FoIConfig.for_model(config, revision=revision)
        return cls.from_stack(stack, mesh, foi_config)

    @classmethod
    def from_stack(cls, stack: ModelStack, mesh=None, foi_config: FoIConfig | None = None) -> InstructPix2PixPipeline:
        """The pipeline of a ``ModelStack`` (``weights.load_stack``, ``random_models.tiny_text_to_image``);
        ``foi_config``: its FoI settings (``None``: the paper's)."""
        stack_parts = (stack.unet, stack.vae, stack.text_encoder, stack.tokenizer, stack.scheduler, stack.params)
        return cls(*stack_parts, mesh, foi_config)

    # ------------------------------------------------------------------ building blocks

    def _shard(self, x: np.ndarray) -> tuple[jax.Array, int]:
        """Pads the batch to a multiple of the mesh and splits it over ``data``; returns the real batch size."""
        size = padded_size(len(x), self.mesh)
        return jax.device_put(pad_batch(np.asarray(x), size), batch_sharded(self.mesh)), len(x)

    def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
        """Instructions -> CLIP encodings ``(B, 77, D)`` float32 (a prompt over 77 tokens is truncated, with a
        warning)."""
        ids, n = self._shard(tokenize(self.tokenizer, list(prompts)))
        return self._encode_text(self.params["text_encoder"], ids)[:n]

    def encode_image(self, images: Sequence[ImageLike] | np.ndarray) -> jax.Array:
        """Images of one size -> unscaled latents ``E(image).mode()`` ``(B, H/8, W/8, 4)`` float32, the UNet's
        conditioning channels. Accepts PIL / uint8 images or a float ``(B, H, W, 3)`` batch in [-1, 1]."""
        if isinstance(images, np.ndarray | jax.Array) and np.asarray(images).dtype != np.uint8:
            pixels = np.asarray(images, np.float32)
        else:
            pixels = np.stack([preprocess(image, self.vae_scale_factor) for image in images])
        x, n = self._shard(pixels)
        return self._encode_image(self.params["vae"], x)[:n]

    def decode_latents(self, latents_bhwc: jax.Array) -> np.ndarray:
        """Scaled latents (the sampler's output) -> images ``(B, H, W, 3)`` float32 in [0, 1]."""
        z, n = self._shard(np.asarray(latents_bhwc, np.float32))
        return postprocess(self._decode(self.params["vae"], z)[:n])

    def sampler(self, settings: SamplerSettings, progress: bool = True, attention: AttentionRecording | None = None):
        """The jitted sampler for ``settings`` (compiled once per settings and input shape); with ``progress`` it
        reports each step to the progress bar, a host callback that keeps it out of JAX's persistent compilation
        cache (``ip2p_jax/compilation_cache.py``); with ``attention`` it also returns token maps."""
        key = (settings, progress, attention)
        if key not in self._samplers:
            apply = lambda p, x, t, c, control: self.unet.apply({"params": p}, x, t, c, control)  # noqa: E731
            report = self._progress if progress else None
            self._samplers[key] = make_ip2p_sampler(apply, settings, self.mesh, report, attention)
        return self._samplers[key]

    def word_maps(self, prompt: str, token_maps_hwt, words: Sequence[str]) -> np.ndarray:
        """Each word's map out of an edit's token maps (``EditOutput.attention[i]`` for ``prompt``):
        ``(h, w, T)`` -> ``(W, h, w)``, a word of several tokens averaged over them. A word that is not in the
        prompt is a ``ValueError`` naming it."""
        weights = word_token_weights(self.tokenizer, prompt, words)
        return np.einsum("hwt,kt->khw", np.asarray(token_maps_hwt, np.float32), weights)

    # ------------------------------------------------------------------ editing

    def __call__(
        self,
        image: ImageLike | Sequence[ImageLike],
        prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        scheduler: Scheduler | str | None = None,
        seed: int | Sequence[int] = 0,
        latents: np.ndarray | None = None,
        strength: float | None = None,
        output_type: str = "pil",
        progress: bool = True,
        instructions: Sequence | None = None,
        foi: FoIConfig | None = None,
        guidance_rescale: float = 0.0,
        attention: AttentionRecording | None = None,
        masks: Sequence | np.ndarray | None = None,
    ) -> EditOutput:
        """Edits each image by its instruction (IP2P), or by its list of sub-instructions (FoI).

        Args:
          image: one image or a list (PIL or uint8 ``(H, W, 3)``); images of different sizes are edited in
            groups of one size, never resized to a common size.
          prompt: IP2P: one instruction for all images, or one per image.
          num_inference_steps, guidance_scale, image_guidance_scale: as diffusers; ``guidance_scale <= 1`` or
            ``image_guidance_scale < 1`` runs one conditioned branch, as diffusers does (IP2P only).
          scheduler: a ``Scheduler``, a scheduler name (``schedulers.SCHEDULERS``) with the checkpoint's config, or
            ``None`` for the checkpoint's own; ``pipe.scheduler.replace("dpmpp_2m", use_karras_sigmas=True)`` is
            DPM++ 2M Karras. The checkpoint's ``prediction_type`` (epsilon or v) and noise schedule come along.
          seed: image ``i`` of the call draws its noise (and FoI's ``tau``) from ``fold_in(PRNGKey(seed), i)``; a list
            of one seed per image: image ``i`` draws as it would alone in a call with ``seed=seed[i]``.
          latents: ``(B, H/8, W/8, 4)`` start noise (as diffusers' ``latents``: multiplied by the scheduler's
            ``init_noise_sigma`` at full strength); all images must then have one size.
          strength: in (0, 1]; below 1, start from the image latent noised to step ``n - int(n * strength)`` and
            run ``int(n * strength)`` steps. Default 1 for IP2P, ``foi.strength`` (0.8) for FoI.
          output_type: ``"pil"`` or ``"np"``.
          progress: show a progress bar per group of images.
          instructions: FoI: per image a list of sub-instructions (``foi.SubInstruction``, ``(text, keyword)``,
            ``(text, keyword, alpha)`` or a plain text); a flat list is one image's. Replaces ``prompt``.
          foi: FoI settings, given with ``instructions``; ``None``: the model's own, ``self.foi_config`` (its folder's
            ``foi_config.json`` over the paper's); ``FoIConfig()`` is the paper's whatever the model.
          guidance_rescale: ``phi`` in [0, 1] of Lin et al.'s guidance rescale applied to the three-branch guidance
            (ours, ``guidance.dual_guidance``; diffusers' IP2P pipeline has none): the guided output's standard
            deviation is pulled toward the text + image branch's. 0 (the default) is plain IP2P guidance.
          attention: IP2P: also return each image's cross-attention token maps (``EditOutput.attention``) over the
            layers and steps it names; a level without cross-attention layers is a ``ValueError``. FoI returns each
            keyword's map with its mask instead.
          masks: FoI: masks to use instead of those FoI cuts from attention: per image a ``(k, H, W)`` array of 0 / 1
            (bool, or integers or floats that are 0 or 1) at the image's size, one per sub-instruction (one array
            for one image). Brought to the mask resolution as FoI resizes masks (``foi.resize_masks``: a cell is
            inside when any of its area is). The masks returned are these.
        """
        images, prompts, per_image, foi = _images_and_instructions(image, prompt, instructions, foi, self.foi_config)
        image_sizes = None if masks is None else [to_rgb_array(im).shape[:2] for im in images]
        given_masks = foi_call.given_masks(masks, image_sizes, per_image)
        call = self._settle(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            scheduler=scheduler,
            seed=seed,
            image_count=len(images),
            latents=latents,
            strength=strength,
            output_type=output_type,
            progress=progress,
            foi=foi,
            guidance_rescale=guidance_rescale,
            attention=attention,
        )
        groups = self._group_by_size(images, prompts, per_image, call, given_masks)
        if call.foi is not None:
            foi_call.check_call(
                call.foi, call.settings, self.unet.config, self.vae_scale_factor, [group.size for group in groups]
            )
        # Everything that can be wrong with a call has been found by now, before anything is encoded or compiled.
        null_context = self.encode_prompt([""])
        pictures, extras = [None] * len(images), [None] * len(images)
        for group in groups:
            image_latents, context = self._encode(group)
            inputs = self._sampler_inputs(call, group, image_latents, context, null_context)
            edited_latents, group_extras = self._sample(call, group, inputs, context)
            for i, picture, extra in zip(group.indices, self.decode_latents(edited_latents), group_extras, strict=True):
                pictures[i], extras[i] = picture, extra
        return _edit_output(call, pictures, extras)

    def _settle(
        self,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        image_guidance_scale: float,
        scheduler: Scheduler | str | None,
        seed: int | Sequence[int],
        image_count: int,
        latents: np.ndarray | None,
        strength: float | None,
        output_type: str,
        progress: bool,
        foi: FoIConfig | None,
        guidance_rescale: float,
        attention: AttentionRecording | None,
    ) -> _EditCall:
        """Checks a call's options (those of ``__call__``; ``foi`` as ``_images_and_instructions`` settled it)
        against each other and the model, and settles them: the default strength (1, FoI's ``foi.strength``), the
        scheduler, whether the three guidance branches and the guidance rescale run, each image's key;
        ``steps_for_strength`` checks the strength against the steps."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if attention is not None and foi is not None:
            raise ValueError("attention= records IP2P edits; FoI returns each keyword's map in masks[i]['attention']")
        if guidance_rescale > 0.0 and foi is not None and foi.text_branches == "per_instruction":
            raise ValueError("guidance_rescale is not defined for FoI's per_instruction text branches (set it to 0)")
        if attention is not None and attention.level not in self.unet.config.cross_attention_levels():
            levels = self.unet.config.cross_attention_levels()
            raise ValueError(f"attention level {attention.level}: the UNet has cross-attention at levels {levels}")
        if strength is None:
            strength = 1.0 if foi is None else foi.strength
        settings = SamplerSettings(
            scheduler=self._scheduler(scheduler),
            num_inference_steps=num_inference_steps,
            strength=strength,
            dual_guidance=guidance_scale > 1.0 and image_guidance_scale >= 1.0,
            scaling_factor=self.vae.config.scaling_factor,
        )
        settings.scheduler.steps_for_strength(num_inference_steps, strength)
        return _EditCall(
            settings=settings,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            guidance_rescale=guidance_rescale if guidance_rescale > 0.0 and settings.dual_guidance else None,
            latents=latents,
            keys=_image_keys(seed, image_count),
            foi=foi,
            attention=attention,
            progress=progress,
            output_type=output_type,
        )

    def _group_by_size(
        self,
        images: list[ImageLike],
        prompts: list[str],
        per_image: list[list[foi_lib.SubInstruction]] | None,
        call: _EditCall,
        given_masks: list[np.ndarray] | None = None,
    ) -> list[_SizeGroup]:
        """The call's images as batches of one size, in order of each size's first image: FoI's sub-instructions
        tokenised (``foi.instruction_tokens``, or ``foi.branch_tokens`` per sub-instruction in the per-instruction
        mode; ``K`` slots for the call's most sub-instructions), each image preprocessed to ``(H, W, 3)`` float32
        in [-1, 1] (``preprocess``), and grouped by that shape. ``latents=`` with images of more than one size is a
        ``ValueError``."""
        tokens = None
        if per_image is not None:
            slots = max(len(subs) for subs in per_image)
            per_branch = call.foi.text_branches == "per_instruction"
            tokenise = foi_lib.branch_tokens if per_branch else foi_lib.instruction_tokens
            tokens = [tokenise(self.tokenizer, subs, slots) for subs in per_image]
        pixels = [preprocess(im, self.vae_scale_factor) for im in images]
        by_shape = defaultdict(list)
        for index, x in enumerate(pixels):
            by_shape[x.shape].append(index)
        if call.latents is not None and len(by_shape) > 1:
            raise ValueError("latents= needs all images to have one size")
        return [
            _SizeGroup(
                indices=indices,
                pixels=np.stack([pixels[i] for i in indices]),
                prompts=[prompts[i] for i in indices] if tokens is None else None,
                tokens=None if tokens is None else [tokens[i] for i in indices],
                counts=None if per_image is None else [len(per_image[i]) for i in indices],
                masks=None if given_masks is None else [given_masks[i] for i in indices],
            )
            for indices in by_shape.values()
        ]

    def _encode(self, group: _SizeGroup) -> tuple[jax.Array, jax.Array]:
        """A group's conditioning: its images' unscaled latents ``(n, h, w, 4)`` (``encode_image``) and its
        instructions' CLIP encodings ``(n, 77, D)`` (``encode_prompt``; FoI: the composite prompts' ids,
        ``_encode_ids``)."""
        image_latents = self.encode_image(group.pixels)
        if group.tokens is None:
            return image_latents, self.encode_prompt(group.prompts)
        ids = np.stack([t.ids for t in group.tokens])
        if ids.ndim == 2:
            return image_latents, self._encode_ids(ids)
        # per-instruction mode: (n, K, 77) -> (n, K, 77, D), each sub-instruction alone
        return image_latents, self._encode_ids(ids.reshape(-1, ids.shape[-1])).reshape(*ids.shape, -1)

    def _sampler_inputs(
        self, call: _EditCall, group: _SizeGroup, image_latents: jax.Array, context: jax.Array, null_context: jax.Array
    ) -> SamplerInputs:
        """A group's ``SamplerInputs``, ``n`` images: ``image_latents`` ``(n, h, w, 4)``, ``context`` ``(n, 77, D)``
        and the null text's ``(1, 77, D)`` encoding broadcast to it, each image's key (``call.keys``), the guidance
        scales (and the rescale's ``phi`` when it runs) as ``(n,)`` float32, and ``latents=`` as float32."""
        n = len(group.indices)
        fill = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (n,))  # noqa: E731
        keys = [call.keys[i] for i in group.indices]
        if context.ndim == 4:  # per-instruction mode: the sampler reads the slots' contexts (FoIInputs.contexts)
            context = context[:, 0]
        return SamplerInputs(
            image_latents=image_latents,
            context=context,
            null_context=jnp.broadcast_to(null_context, context.shape),
            keys=jax.random.wrap_key_data(
                jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(seed), i)) for seed, i in keys])
            ),
            guidance_scale=fill(call.guidance_scale),
            image_guidance_scale=fill(call.image_guidance_scale),
            latents=None if call.latents is None else jnp.asarray(call.latents, jnp.float32),
            guidance_rescale=None if call.guidance_rescale is None else fill(call.guidance_rescale),
        )

    def _sample(
        self, call: _EditCall, group: _SizeGroup, inputs: SamplerInputs, context: jax.Array
    ) -> tuple[jax.Array, list]:
        """Runs a group's sampler (``sampler`` for IP2P, ``foi_sampler`` with the group's ``foi.FoIInputs`` for FoI:
        its tokens, the slots' own ``(n, K, 77, D)`` contexts in the per-instruction mode, the masks given) through
        ``_run``. Returns the edited latents ``(n, h, w, 4)``, scaled, and per image what the edit returns besides
        its picture: FoI's masks (``foi.call.output_masks``), IP2P's ``(mh, mw, T)`` token maps with
        ``attention=``, else ``None``."""
        n = len(group.indices)
        height, width = group.size
        description = f"{'FoI' if call.foi else 'IP2P'}: {n} image(s) of {width}x{height}"
        if group.tokens is None:
            sampler = self.sampler(call.settings, call.progress, call.attention)
            out = self._run(sampler, call.settings, (inputs,), n, call.progress, description)
            if call.attention is None:
                return out, [None] * n
            edited_latents, token_maps = out
            return edited_latents, list(np.asarray(token_maps))
        latent_size = tuple(inputs.image_latents.shape[1:3])
        masks = None
        if group.masks is not None:  # each image's (k, H, W) at the mask resolution, in K slots
            size, slots = foi_lib.mask_size(latent_size, call.foi.mask_downsample), group.tokens[0].valid.shape[0]
            masks = jnp.zeros((n, slots, *size), jnp.float32)
            for row, given in enumerate(group.masks):
                masks = masks.at[row, : len(given)].set(foi_lib.resize_masks(jnp.asarray(given)[None], size)[0])
        foi_inputs = FoIInputs(
            keyword_weights=jnp.stack([t.keyword_weights for t in group.tokens]),
            owner=jnp.stack([t.owner for t in group.tokens]),
            token_alpha=jnp.stack([t.token_alpha for t in group.tokens]),
            valid=jnp.stack([t.valid for t in group.tokens]),
            contexts=context if context.ndim == 4 else None,
            masks=masks,
        )
        sampler = self.foi_sampler(call.settings, call.foi, latent_size, call.progress)
        edited_latents, masks, keyword_maps = self._run(
            sampler, call.settings, (inputs, foi_inputs), n, call.progress, description
        )
        per_image = zip(np.asarray(masks), np.asarray(keyword_maps), group.counts, strict=True)
        return edited_latents, [foi_call.output_masks(m, a, k, group.size) for m, a, k in per_image]

    def foi_sampler(
        self, settings: SamplerSettings, foi: FoIConfig, latent_size: tuple[int, int], progress: bool = True
    ):
        """The jitted FoI sampler for these settings and latent size (``progress`` as for :meth:`sampler`)."""
        key = (settings, foi, latent_size, progress)
        if key not in self._samplers:
            apply = lambda p, x, t, c, control: self.unet.apply({"params": p}, x, t, c, control)  # noqa: E731
            report = self._progress if progress else None
            self._samplers[key] = make_foi_sampler(apply, settings, foi, self.mesh, latent_size, report)
        return self._samplers[key]

    def _encode_ids(self, ids: np.ndarray) -> jax.Array:
        x, n = self._shard(ids)
        return self._encode_text(self.params["text_encoder"], x)[:n]

    def _scheduler(self, scheduler: Scheduler | str | None) -> Scheduler:
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, Scheduler):
            return scheduler
        return Scheduler(scheduler, self.scheduler.config)

    def _run(self, sampler, settings: SamplerSettings, arguments: tuple, n: int, progress: bool, description: str):
        """Pads and shards one group's inputs, runs a jitted sampler with a progress bar, drops the padding.

        The sampler is compiled ahead of time (once per argument shapes and shardings) under a "compiling" status
        line, and the step bar starts after it, so that its time estimate counts steps only."""
        size = padded_size(n, self.mesh)
        sharding = batch_sharded(self.mesh)
        arguments = jax.tree.map(lambda x: jax.device_put(pad_batch(x, size), sharding), arguments)
        arguments = (self.params["unet"], *arguments)
        compiled = self._compile(sampler, arguments, progress, description)
        self._progress.bar = tqdm(total=settings.num_steps_run, desc=description, disable=not progress, leave=False)
        try:
            out = compiled(*arguments)
            jax.block_until_ready(out)
            jax.effects_barrier()
        finally:
            self._progress.bar.close()
            self._progress.bar = None
        return jax.tree.map(lambda x: x[:n], out)

    def _compile(self, sampler, arguments: tuple, progress: bool, description: str):
        """The sampler compiled for these arguments, from the cache when their shapes, dtypes and shardings (host
        arrays: none) have been seen with this sampler."""
        leaves, treedef = jax.tree.flatten(arguments)
        signature = tuple(
            (np.shape(x), x.dtype, getattr(x, "weak_type", False), x.sharding if isinstance(x, jax.Array) else None)
            for x in leaves
        )
        key = (sampler, treedef, signature)
        if key not in self._compiled:
            status = tqdm(
                total=0, desc=f"{description}: compiling", bar_format="{desc}", disable=not progress, leave=False
            )
            try:
                self._compiled[key] = sampler.lower(*arguments).compile()
            finally:
                status.close()
        return self._compiled[key]


def _images_and_instructions(
    image, prompt, instructions, foi: FoIConfig | None, default_foi: FoIConfig
) -> tuple[list[ImageLike], list[str], list[list[foi_lib.SubInstruction]] | None, FoIConfig | None]:
    """A call's images, each paired with its instruction: ``prompt`` (IP2P) or ``instructions`` (FoI, with ``foi``
    defaulting to ``default_foi``, the model's); a single instruction is repeated over the images, a single image
    over the instructions. Returns ``(images, prompts, per_image, foi)``: ``prompts`` one per image (FoI's: the
    composite prompts), ``per_image`` FoI's sub-instructions per image (``None`` for IP2P)."""
    images = [image] if isinstance(image, Image.Image | np.ndarray) and np.ndim(image) != 4 else list(image)
    if (instructions is None) == (prompt is None):
        raise ValueError("give either prompt= (IP2P) or instructions= (FoI)")
    if instructions is not None:
        per_image = foi_call.instruction_lists(instructions)
        foi = default_foi if foi is None else foi
        prompts = [foi_lib.composite_prompt(subs)[0] for subs in per_image]
    else:
        if foi is not None:
            raise ValueError("foi= needs instructions= (a list of sub-instructions per image)")
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        per_image = None
    if len(prompts) == 1 and len(images) > 1:
        prompts, per_image = prompts * len(images), None if per_image is None else per_image * len(images)
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} instructions")
    return images, prompts, per_image, foi


def _image_keys(seed: int | Sequence[int], image_count: int) -> tuple[tuple[int, int], ...]:
    """``(seed, index)`` of each image's key (``_EditCall.keys``): ``(seed, i)`` for one seed, ``(seed[i], 0)``, as
    alone in a call, for one seed per image."""
    if isinstance(seed, numbers.Integral):
        return tuple((int(seed), i) for i in range(image_count))
    seeds = list(seed)
    if len(seeds) != image_count or not all(isinstance(s, numbers.Integral) for s in seeds):
        raise ValueError(f"seed must be an integer or a list of one integer per image ({image_count}), got {seed!r}")
    return tuple((int(s), 0) for s in seeds)


def _edit_output(call: _EditCall, pictures: list[np.ndarray], extras: list) -> EditOutput:
    """The call's ``EditOutput``: its ``(H, W, 3)`` [0, 1] pictures in input order (PIL, or float32 arrays stacked
    when all have one size), and the per-image ``extras`` of ``_sample`` as FoI's masks or IP2P's token maps."""
    masks = None if call.foi is None else extras
    token_maps = None if call.attention is None else extras
    if call.output_type == "pil":
        return EditOutput([to_pil(x) for x in pictures], masks, token_maps)
    same_size = len({x.shape for x in pictures}) == 1
    return EditOutput(np.stack(pictures) if same_size else pictures, masks, token_maps)
