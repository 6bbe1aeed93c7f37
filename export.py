"""Export a training run as a diffusers folder.

    python export.py --workdir RUN --out DIR              # EMA weights of the latest checkpoint
    python export.py --workdir RUN --out DIR --step 2000 --weights params
    python export.py --workdir RUN --out DIR --single-file model.safetensors   # also one file, LDM layout

An InstructPix2Pix run (``task = "ip2p"``) or a text-to-image run (``"text_to_image"``) becomes a pipeline folder:
the UNet (safetensors, float32), the VAE, text encoder and tokenizer of the model the run started from (frozen in
training, copied unchanged), an Euler ancestral scheduler over the training noise schedule with the run's prediction
type (zero terminal SNR schedules with the trailing spacing) and ``model_index.json``;
diffusers' ``StableDiffusionInstructPix2PixPipeline`` (or ``StableDiffusionPipeline``) and our
``InstructPix2PixPipeline.from_pretrained`` load it. An autoencoder run (``task = "autoencoder"``) becomes a
diffusers ``AutoencoderKL`` folder whose ``scaling_factor`` is measured on the run's training data (``1 / std`` of
latent samples). A CLIP run (``"clip"``) becomes a transformers ``CLIPModel`` folder with its tokenizer and image
processor settings. ``--single-file`` also writes an InstructPix2Pix or text-to-image model as one
``.safetensors`` in the original LDM layout, for the original InstructPix2Pix / Stable Diffusion tools
(``ip2p_jax/weights/single_file.py``; ``sample.py --model FILE --model-config DIR`` reads it back).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's --workdir", required=True)
_OUT = flags.DEFINE_string("out", None, "the folder to write (must not exist or be empty)", required=True)
_STEP = flags.DEFINE_integer("step", None, "the checkpoint to export (default: the latest)")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "the EMA weights or the raw params")
_SINGLE_FILE = flags.DEFINE_string(
    "single-file", None, "also write the model as one LDM-layout .safetensors (InstructPix2Pix / text-to-image runs)"
)
SCALE_IMAGES = 512  # pictures that measure an autoencoder's scaling_factor and reconstruction PSNR


def autoencoder_config(config) -> dict:
    """The diffusers config of an autoencoder run's VAE."""
    import json

    from ip2p_jax.weights.files import DIFFUSERS_WEIGHTS, resolve_folder

    if config["model"] == "new":
        return dict(config["new_model"]["vae"])
    folder = resolve_folder(config["model"], "vae", weights_name=DIFFUSERS_WEIGHTS)
    return json.loads((folder / "config.json").read_text())


def measured_latents(config: dict, vae_config: dict, params) -> tuple[float, float]:
    """``(scaling_factor, PSNR)`` over ``SCALE_IMAGES`` pictures of the run's data: ``1 / std`` of their latent
    samples, and the reconstruction PSNR (dB, peak 255) of their latent means."""
    import jax
    import ml_collections
    import numpy as np

    from ip2p_jax.data.input_pipeline import batches_from_config, builder_from_config
    from ip2p_jax.models.vae import AutoencoderKL, VAEConfig
    from ip2p_jax.training.autoencoder import latent_scaling_factor

    config = ml_collections.ConfigDict(config)
    stream = batches_from_config(config, builder_from_config(config), 32, position=0)
    pictures = np.concatenate([next(stream)["edited_image"] for _ in range(SCALE_IMAGES // 32)])
    vae = AutoencoderKL(VAEConfig.from_diffusers(vae_config))
    reconstructions = jax.jit(lambda p, x: vae.apply({"params": p}, x))(params, pictures)
    error = np.mean((127.5 * (np.clip(np.asarray(reconstructions), -1, 1) - pictures)) ** 2)
    return latent_scaling_factor(vae, params, pictures, jax.random.key(0)), float(10 * np.log10(255**2 / error))


def main(argv) -> None:
    del argv
    from ip2p_jax.training import checkpoint
    from ip2p_jax.training.new_model import INITIAL_MODEL
    from ip2p_jax.training.objective import training_objective
    from ip2p_jax.weights.export import (
        export_clip,
        export_ip2p,
        export_single_file,
        export_vae,
        ip2p_scheduler_config,
    )

    logging.set_verbosity(logging.WARNING)
    workdir = Path(_WORKDIR.value)
    try:
        state, meta, step = checkpoint.restore_weights(workdir / "checkpoints", _STEP.value)
    except FileNotFoundError as error:
        sys.exit(f"export.py: {error}")
    config = meta["config"]
    if _SINGLE_FILE.value and config.get("task", "ip2p") not in ("ip2p", "text_to_image"):
        sys.exit(f"export.py: --single-file is for InstructPix2Pix and text-to-image runs, not {config['task']!r}")
    weights = state["ema_params" if _WEIGHTS.value == "ema" else "params"]
    try:
        if config.get("task", "ip2p") == "autoencoder":
            vae_config = autoencoder_config(config)
            scaling_factor, psnr = measured_latents(config, vae_config, weights)
            out = export_vae(_OUT.value, weights, {**vae_config, "scaling_factor": scaling_factor})
            what = f"an autoencoder (scaling_factor {scaling_factor:.5f}, reconstruction PSNR {psnr:.2f} dB)"
        elif config.get("task") == "clip":
            source = str(workdir / INITIAL_MODEL) if config["model"] == "new" else config["model"]
            out = export_clip(_OUT.value, weights, source)
            what = f"a CLIP (from {source})"
        else:
            source = str(workdir / INITIAL_MODEL) if config["model"] == "new" else config["model"]
            # The run's objective: its config's group; a config saved before the groups has the settings at its top
            # level, and one saved before they existed reads as the defaults.
            objective, schedule = training_objective(config.get("objective", config), source)
            scheduler = ip2p_scheduler_config(**schedule, prediction_type=objective.prediction_type)
            out = export_ip2p(_OUT.value, weights, source, scheduler)
            kind = "text-to-image" if config.get("task") == "text_to_image" else "InstructPix2Pix"
            what = f"a {kind} model (from {source}, {objective.prediction_type} prediction)"
            if _SINGLE_FILE.value:
                what += f", and as one file {export_single_file(out, _SINGLE_FILE.value)}"
    except (FileExistsError, ValueError, OSError) as error:
        sys.exit(f"export.py: {error}")
    print(f"exported the {_WEIGHTS.value} weights of step {step}, {what}, to {out}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
