"""The user-facing InstructPix2Pix pipeline: load, encode, edit, decode.

    pipe = InstructPix2PixPipeline.from_pretrained("timbrooks/instruct-pix2pix")
    edited = pipe(image, "make it snow", num_inference_steps=20).images[0]

Arguments and their defaults follow diffusers' ``StableDiffusionInstructPix2PixPipeline``; images are PIL
images or ``uint8`` ``(H, W, 3)`` arrays, and everything inside is NHWC.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ip2p_jax.parallel import batch_sharded, data_mesh, pad_batch, padded_size, replicated
from ip2p_jax.sampling import SamplerInputs, SamplerSettings, make_ip2p_sampler
from ip2p_jax.schedulers import Scheduler
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.weights import load_text_encoder, load_tokenizer, load_unet, load_vae
from ip2p_jax.weights.files import resolve_folder

ImageLike = Image.Image | np.ndarray


@dataclasses.dataclass
class EditOutput:
    """What an edit returns.

    Attributes:
      images: PIL images, or float32 ``(H, W, 3)`` arrays in [0, 1] for ``output_type="np"`` (stacked into
        ``(B, H, W, 3)`` when all have one size), in input order.
    """

    images: list | np.ndarray


class _Progress:
    """A host-side progress bar that the jitted loop reports to (the jitted function keeps this object)."""

    def __init__(self):
        self.bar = None

    def __call__(self, done) -> None:
        if self.bar is not None:
            self.bar.n = int(done)
            self.bar.refresh()


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """A PIL image or an ``(H, W)`` / ``(H, W, 1|3|4)`` uint8 array -> ``(H, W, 3)`` uint8 RGB."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W, 3), got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    return np.asarray(Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB"))


def preprocess(image: ImageLike, multiple: int) -> np.ndarray:
    """As diffusers' ``VaeImageProcessor``: RGB, each side floored to a multiple of ``multiple`` (a Lanczos resize
    when that changes it), scaled to [-1, 1]. Returns ``(H, W, 3)`` float32."""
    rgb = to_rgb_array(image)
    height, width = (rgb.shape[0] // multiple) * multiple, (rgb.shape[1] // multiple) * multiple
    if height == 0 or width == 0:
        raise ValueError(f"image of {rgb.shape[1]}x{rgb.shape[0]} px is smaller than {multiple} px")
    if (height, width) != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.LANCZOS))
    return rgb.astype(np.float32) / 127.5 - 1.0


def postprocess(images_bhwc: np.ndarray) -> np.ndarray:
    """Decoder output about [-1, 1] -> float32 [0, 1]."""
    return np.clip(np.asarray(images_bhwc, np.float32) / 2 + 0.5, 0.0, 1.0)


def to_pil(image_hwc: np.ndarray) -> Image.Image:
    """float [0, 1] ``(H, W, 3)`` -> PIL, rounded as diffusers' ``numpy_to_pil``."""
    return Image.fromarray((image_hwc * 255).round().astype(np.uint8))


class InstructPix2PixPipeline:
    """InstructPix2Pix editing with Flax models, jitted and sharded over the devices of ``mesh``.

    Attributes:
      unet, vae, text_encoder: Flax modules; ``params`` holds their float32 params under those names,
        replicated over the mesh.
      tokenizer: the CLIP tokenizer.
      scheduler: the checkpoint's scheduler (``scheduler=`` in a call overrides it).
      mesh: the device mesh; batches are split over its ``data`` axis.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler: Scheduler, params: dict, mesh=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.mesh = data_mesh() if mesh is None else mesh
        self.params = jax.device_put(params, replicated(self.mesh))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._progress = _Progress()
        self._samplers: dict[SamplerSettings, Any] = {}
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
    ) -> InstructPix2PixPipeline:
        """Loads a diffusers-layout folder or hub repo id (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/``). ``dtype`` is the compute dtype; params stay float32."""
        options = dict(revision=revision, variant=variant, dtype=dtype)
        unet, unet_params = load_unet(path_or_repo_id, **options)
        vae, vae_params = load_vae(path_or_repo_id, **options)
        text_encoder, text_params = load_text_encoder(path_or_repo_id, **options)
        tokenizer = load_tokenizer(path_or_repo_id, revision=revision)
        scheduler = Scheduler.from_folder(resolve_folder(path_or_repo_id, "scheduler", revision=revision))
        params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}
        return cls(unet, vae, text_encoder, tokenizer, scheduler, params, mesh)

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

    def sampler(self, settings: SamplerSettings):
        """The jitted sampler for ``settings`` (compiled once per settings and input shape)."""
        if settings not in self._samplers:
            apply = lambda p, x, t, c, control: self.unet.apply({"params": p}, x, t, c, control)  # noqa: E731
            self._samplers[settings] = make_ip2p_sampler(apply, settings, self.mesh, self._progress)
        return self._samplers[settings]

    # ------------------------------------------------------------------ editing

    def __call__(
        self,
        image: ImageLike | Sequence[ImageLike],
        prompt: str | Sequence[str],
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        scheduler: Scheduler | str | None = None,
        seed: int = 0,
        latents: np.ndarray | None = None,
        strength: float = 1.0,
        output_type: str = "pil",
        progress: bool = True,
    ) -> EditOutput:
        """Edits each image by its instruction.

        Args:
          image: one image or a list (PIL or uint8 ``(H, W, 3)``); images of different sizes are edited in
            groups of one size, never resized to a common size.
          prompt: one instruction for all images, or one per image.
          num_inference_steps, guidance_scale, image_guidance_scale: as diffusers; ``guidance_scale <= 1`` or
            ``image_guidance_scale < 1`` runs one conditioned branch, as diffusers does.
          scheduler: a ``Scheduler``, a scheduler name (``schedulers.SCHEDULERS``) with the checkpoint's config, or
            ``None`` for the checkpoint's own.
          seed: image ``i`` of the call draws its noise from ``fold_in(PRNGKey(seed), i)``.
          latents: ``(B, H/8, W/8, 4)`` start noise (as diffusers' ``latents``: multiplied by the scheduler's
            ``init_noise_sigma``); all images must then have one size.
          strength: in (0, 1]; below 1, start from the image latent noised to step
            ``n - int(n * strength)`` and run ``int(n * strength)`` steps.
          output_type: ``"pil"`` or ``"np"``.
          progress: show a progress bar per group of images.
        """
        images = [image] if isinstance(image, Image.Image | np.ndarray) and np.ndim(image) != 4 else list(image)
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) == 1 and len(images) > 1:
            prompts = prompts * len(images)
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        settings = SamplerSettings(
            scheduler=self._scheduler(scheduler),
            num_inference_steps=num_inference_steps,
            strength=strength,
            dual_guidance=guidance_scale > 1.0 and image_guidance_scale >= 1.0,
            scaling_factor=self.vae.config.scaling_factor,
        )
        settings.scheduler.steps_for_strength(num_inference_steps, strength)  # validates early
        pixels = [preprocess(im, self.vae_scale_factor) for im in images]
        groups = defaultdict(list)
        for index, x in enumerate(pixels):
            groups[x.shape].append(index)
        if latents is not None and len(groups) > 1:
            raise ValueError("latents= needs all images to have one size")
        null_context = self.encode_prompt([""])
        base_key = jax.random.key(seed)
        results: list[np.ndarray | None] = [None] * len(images)
        for shape, indices in groups.items():
            image_latents = self.encode_image(np.stack([pixels[i] for i in indices]))
            context = self.encode_prompt([prompts[i] for i in indices])
            keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(jnp.asarray(indices))
            out = self._sample(
                settings, image_latents, context, null_context, keys, guidance_scale, image_guidance_scale,
                latents, progress, f"editing {len(indices)} image(s) of {shape[1]}x{shape[0]}",
            )  # fmt: skip
            for i, picture in zip(indices, self.decode_latents(out), strict=True):
                results[i] = picture
        if output_type == "pil":
            return EditOutput([to_pil(x) for x in results])
        same_size = len({x.shape for x in results}) == 1
        return EditOutput(np.stack(results) if same_size else results)

    def _scheduler(self, scheduler: Scheduler | str | None) -> Scheduler:
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, Scheduler):
            return scheduler
        return Scheduler(scheduler, self.scheduler.config)

    def _sample(
        self, settings, image_latents, context, null_context, keys, guidance_scale, image_guidance_scale, latents,
        progress, description,
    ) -> jax.Array:  # fmt: skip
        """Runs the jitted sampler on one group of equally sized images; returns ``(B, h, w, 4)`` latents."""
        n = image_latents.shape[0]
        size = padded_size(n, self.mesh)
        fill = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (n,))  # noqa: E731
        inputs = SamplerInputs(
            image_latents=image_latents,
            context=context,
            null_context=jnp.broadcast_to(null_context, context.shape),
            keys=keys,
            guidance_scale=fill(guidance_scale),
            image_guidance_scale=fill(image_guidance_scale),
            latents=None if latents is None else jnp.asarray(latents, jnp.float32),
        )
        inputs = jax.tree.map(lambda x: jax.device_put(pad_batch_jax(x, size), batch_sharded(self.mesh)), inputs)
        self._progress.bar = tqdm(total=settings.num_steps_run, desc=description, disable=not progress, leave=False)
        try:
            out = self.sampler(settings)(self.params["unet"], inputs)
            out.block_until_ready()
            jax.effects_barrier()
        finally:
            self._progress.bar.close()
            self._progress.bar = None
        return out[:n]


def pad_batch_jax(x: jax.Array, size: int) -> jax.Array:
    """``parallel.pad_batch`` for device arrays (typed PRNG keys included)."""
    if x.shape[0] == size:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], size - x.shape[0], axis=0)], axis=0)
