"""A single-file checkpoint in the original LDM layout -> a diffusers pipeline folder.

    python tools/convert_single_file.py v1-5-pruned-emaonly.ckpt --allow-pickle --out runs/sd15
    python train.py --config configs/ip2p_sd15.py --config.model=runs/sd15 --workdir RUN   # IP2P from it

The folder holds the file's UNet, autoencoder and text encoder (float32 safetensors) and the tokenizer and scheduler
of ``--config`` (a diffusers folder or hub repo of the same architecture; by default the one the file's architecture
names, ``ip2p_jax.weights.SINGLE_FILE_CONFIGS``). Editing needs no conversion: ``sample.py --model FILE`` reads the
file itself.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help=".safetensors, or .ckpt with --allow-pickle")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--config", default=None, help="diffusers folder or hub repo of the same architecture")
    parser.add_argument("--allow-pickle", action="store_true", help="read a .ckpt (a pickle can run code)")
    parser.add_argument("--ema", action="store_true", help="the UNet's EMA weights, where the file has both")
    args = parser.parse_args(argv)

    from ip2p_jax.weights import CheckpointError
    from ip2p_jax.weights.export import folder_from_single_file

    try:
        out = folder_from_single_file(
            args.file, args.out, config=args.config, allow_pickle=args.allow_pickle, ema=args.ema
        )
    except (CheckpointError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
