"""One-step denoising error of an InstructPix2Pix folder: how well does its UNet see the edited picture from noise?

Sampling from pure noise passes through every high-noise step first; a model that denoises those badly drifts in
colour and background before the low-noise steps can repair anything (docs/shapes.md, "the model is too weak at
high noise"). For ``test_single``'s first ``--limit`` examples, the target picture's latent is noised to timestep
``t``, the UNet runs once with the instruction and the input picture as conditioning (no guidance), its output is
turned into ``x0`` by the folder's own prediction type and noise schedule, decoded, and compared with the target:
mean absolute error in levels of 255, over the picture, inside the edit's region and outside it. Two floors are
printed beside it: the autoencoder's own error (the target encoded and decoded) and the input picture itself.

    python tools/denoising_error.py --model models/shapes-ip2p --timesteps 100,300,500,700,900,999
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def one_step_x0(
    unet_apply: Callable,
    unet_params: Any,
    latents_bhwc: jax.Array,
    noise_bhwc: jax.Array,
    timestep: jax.Array,
    alpha_cumprod: jax.Array,
    context_btd: jax.Array,
    image_latents_bhwc: jax.Array,
    prediction_type: str,
) -> jax.Array:
    """The clean latents ``(B, h, w, 4)`` the UNet predicts from ``latents`` noised to ``timestep`` in one step.

    Args:
      unet_apply: ``(params, sample, timesteps, context, control) -> (output, aux)``.
      latents_bhwc: clean latents, scaled (``scaling_factor * E(x)``).
      noise_bhwc: the noise added, ``N(0, 1)``.
      alpha_cumprod: ``alpha_bar`` of ``timestep`` (0 at a zero-terminal-SNR schedule's last step).
      image_latents_bhwc: the conditioning channels (unscaled ``E(input).mode()``).
      prediction_type: ``epsilon`` or ``v_prediction`` (the folder's scheduler config).
    """
    from ip2p_jax.schedulers import vp_predictions

    alpha_t, sigma_t = jnp.sqrt(alpha_cumprod), jnp.sqrt(1.0 - alpha_cumprod)
    noisy = alpha_t * latents_bhwc + sigma_t * noise_bhwc
    timesteps = jnp.full((noisy.shape[0],), timestep, jnp.int32)
    output, _ = unet_apply(unet_params, jnp.concatenate([noisy, image_latents_bhwc], -1), timesteps, context_btd, None)
    return vp_predictions(output, noisy, alpha_t, sigma_t, prediction_type)[0]


def region_errors(pictures: np.ndarray, targets: np.ndarray, regions: np.ndarray) -> dict[str, float]:
    """Mean absolute error in levels of 255 between ``(B, H, W, 3)`` pictures in [0, 1] and uint8 targets: over
    every pixel, inside the ``(B, H, W)`` boolean regions, and outside them."""
    error = np.abs(pictures * 255.0 - targets.astype(np.float64)).mean(-1)  # (B, H, W)
    return {
        "all": float(error.mean()),
        "inside": float(error[regions].mean()),
        "outside": float(error[~regions].mean()),
    }


def main(argv=None) -> dict:
    """Prints the table; returns ``{t: {"all" / "inside" / "outside": levels}}``, with ``"autoencoder"`` and
    ``"input"`` rows for the two floors."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-ip2p", help="an InstructPix2Pix diffusers folder")
    parser.add_argument("--limit", type=int, default=100, help="test_single examples")
    parser.add_argument("--timesteps", default="100,300,500,700,900,999")
    parser.add_argument("--dataset", default="shapes_edit", help="TFDS name (and config)")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir (default TFDS's)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    import ip2p_jax.data.shapes_edit  # noqa: F401 (registers the builder)
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import SchedulerConfig
    from ip2p_jax.weights import load_noise_schedule, load_prediction_type

    examples = list(tfds.as_numpy(tfds.load(args.dataset, split=f"test_single[:{args.limit}]", data_dir=args.data_dir)))
    inputs = np.stack([e["input_image"] for e in examples])
    targets = np.stack([e["edited_image"] for e in examples])
    regions = np.stack([e["mask"] for e in examples]).astype(bool)  # (B, H, W): the edit's whole region
    pipe = InstructPix2PixPipeline.from_pretrained(args.model)
    if pipe.unet.config.in_channels != 8:
        channels = pipe.unet.config.in_channels
        parser.error(f"{args.model} is not an InstructPix2Pix folder (its UNet has {channels} input channels, not 8)")
    prediction_type = load_prediction_type(args.model)
    alphas_cumprod = SchedulerConfig(**load_noise_schedule(args.model)).alphas_cumprod()
    image_latents = pipe.encode_image(list(inputs))
    latents = pipe.vae.config.scaling_factor * pipe.encode_image(list(targets))
    context = pipe.encode_prompt([e["instruction"].decode() for e in examples])
    apply = lambda p, *a: pipe.unet.apply({"params": p}, *a)  # noqa: E731
    denoise = jax.jit(
        lambda noise, t, a: one_step_x0(
            apply, pipe.params["unet"], latents, noise, t, a, context, image_latents, prediction_type
        )
    )
    print(f"{args.model} ({prediction_type}): {len(examples)} test_single targets, one UNet step from timestep t")
    results = {
        "autoencoder": region_errors(pipe.decode_latents(latents), targets, regions),
        "input": region_errors(inputs / 255.0, targets, regions),
    }
    for t in [int(t) for t in args.timesteps.split(",")]:
        noise = jax.random.normal(jax.random.key(t), latents.shape)
        x0 = denoise(noise, jnp.int32(t), jnp.float32(alphas_cumprod[t]))
        results[t] = region_errors(pipe.decode_latents(x0), targets, regions)
    print("| from | all | inside the region | outside |\n| --- | --- | --- | --- |")
    floors = {"autoencoder": "the target, encoded and decoded", "input": "the input picture, unedited"}
    for row, errors in results.items():
        name = floors.get(row, f"t = {row}")
        print(f"| {name} | {errors['all']:.2f} | {errors['inside']:.2f} | {errors['outside']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
