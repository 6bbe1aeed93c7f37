"""Export a training run's UNet as an InstructPix2Pix diffusers folder.

    python export.py --workdir RUN --out DIR              # EMA weights of the latest checkpoint
    python export.py --workdir RUN --out DIR --step 2000 --weights params

The folder holds the UNet (safetensors, float32), the VAE, text encoder and tokenizer of the model the run started
from (frozen in training, copied unchanged), an Euler ancestral scheduler over the training noise schedule and
``model_index.json``: diffusers' ``StableDiffusionInstructPix2PixPipeline.from_pretrained`` and our
``InstructPix2PixPipeline.from_pretrained`` both load it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's --workdir", required=True)
_OUT = flags.DEFINE_string("out", None, "the folder to write (must not exist or be empty)", required=True)
_STEP = flags.DEFINE_integer("step", None, "the checkpoint to export (default: the latest)")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "the EMA weights or the raw params")


def main(argv) -> None:
    del argv
    from ip2p_jax.training import checkpoint
    from ip2p_jax.weights import load_noise_schedule
    from ip2p_jax.weights.export import export_ip2p, ip2p_scheduler_config

    logging.set_verbosity(logging.WARNING)
    workdir = Path(_WORKDIR.value)
    try:
        state, meta, step = checkpoint.restore_unet_weights(workdir / "checkpoints", _STEP.value)
    except FileNotFoundError as error:
        sys.exit(f"export.py: {error}")
    model = meta["config"]["model"]
    source = str(workdir / "tiny-model") if model == "tiny" else model
    weights = state["ema_params" if _WEIGHTS.value == "ema" else "params"]
    try:
        out = export_ip2p(_OUT.value, weights, source, ip2p_scheduler_config(**load_noise_schedule(source)))
    except (FileExistsError, ValueError) as error:
        sys.exit(f"export.py: {error}")
    print(f"exported the {_WEIGHTS.value} weights of step {step} from {source} to {out}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
