"""Instruction-based image editing from the command line (InstructPix2Pix).

One image:

    python sample.py --model timbrooks/instruct-pix2pix --image in.png --instruction "make it snow" --out out.png

A batch from a JSONL manifest, one ``{"image": ..., "instruction": ..., "out": ...}`` per line (paths relative to
the manifest), spread over all devices:

    python sample.py --model DIR --manifest edits.jsonl --grid

A bad item (missing or unreadable image, image under 64 px, empty instruction) is reported and skipped; the
others still run, and the exit status is 1 if any item failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MIN_SIDE = 64  # pixels; below this the UNet's lowest level has under one latent cell


@dataclass
class EditItem:
    """One edit: where it comes from, its instruction and where it goes."""

    image: Path
    instruction: str
    out: Path
    source: str  # for messages: "--image" or "manifest line N"


def parse_args(argv=None) -> argparse.Namespace:
    from ip2p_jax.schedulers import SCHEDULERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timbrooks/instruct-pix2pix", help="diffusers folder or hub repo id")
    parser.add_argument("--revision", default=None, help="hub revision")
    parser.add_argument("--image", type=Path, help="input image")
    parser.add_argument("--instruction", help="the edit instruction")
    parser.add_argument("--out", type=Path, help="output image path")
    parser.add_argument("--manifest", type=Path, help="JSONL file of edits (instead of --image/--instruction/--out)")
    parser.add_argument("--steps", type=int, default=100, help="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance s_T")
    parser.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance s_I")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the checkpoint's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", type=float, default=1.0, help="fraction of the schedule run, in (0, 1]")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--grid", action="store_true", help="also write OUT.grid.png: input | output")
    args = parser.parse_args(argv)
    single = [args.image, args.instruction, args.out]
    if args.manifest is None and any(x is None for x in single):
        parser.error("give --image, --instruction and --out, or --manifest")
    if args.manifest is not None and any(x is not None for x in single):
        parser.error("--manifest replaces --image, --instruction and --out")
    if not 0.0 < args.strength <= 1.0:
        parser.error(f"--strength must be in (0, 1], got {args.strength}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def read_manifest(path: Path) -> tuple[list[EditItem], list[str]]:
    """Items of a JSONL manifest and the errors of the lines that are not items."""
    items, errors = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        return [], [f"cannot read manifest {path}: {error.strerror}"]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            errors.append(f"{where}: not JSON ({error.msg})")
            continue
        missing = [key for key in ("image", "instruction", "out") if not isinstance(entry.get(key), str)]
        if missing:
            errors.append(f"{where}: needs string fields image, instruction, out (missing or not a string: {missing})")
            continue
        resolve = lambda p: p if Path(p).is_absolute() else path.parent / p  # noqa: E731
        items.append(EditItem(Path(resolve(entry["image"])), entry["instruction"], Path(resolve(entry["out"])), where))
    return items, errors


def load_item(item: EditItem) -> Image.Image:
    """The item's image as RGB, or ``ValueError`` saying what is wrong with the item."""
    if not item.instruction.strip():
        raise ValueError(f"{item.source}: the instruction is empty")
    try:
        with Image.open(item.image) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{item.source}: image {item.image} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{item.source}: cannot read image {item.image} ({error})") from None
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"{item.source}: image {item.image} is {image.width}x{image.height} px, under {MIN_SIDE} px")
    return image


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """``left | right``, the input resized to the output's height if they differ (sizes floor to multiples of 8)."""
    if left.size != right.size:
        left = left.resize(right.size, Image.LANCZOS)
    grid = Image.new("RGB", (left.width + right.width, right.height))
    grid.paste(left, (0, 0))
    grid.paste(right, (left.width, 0))
    return grid


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.manifest is not None:
        items, errors = read_manifest(args.manifest)
    else:
        items, errors = [EditItem(args.image, args.instruction, args.out, "--image")], []
    ready = []
    for item in items:
        try:
            ready.append((item, load_item(item)))
        except ValueError as error:
            errors.append(str(error))
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if not ready:
        print("error: nothing to edit", file=sys.stderr)
        return 1

    import jax.numpy as jnp

    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.weights import CheckpointError

    try:
        pipe = InstructPix2PixPipeline.from_pretrained(
            args.model, revision=args.revision, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        )
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"editing {len(ready)} image(s) on {pipe.mesh.size} device(s)", file=sys.stderr)
    result = pipe(
        [image for _, image in ready],
        [item.instruction for item, _ in ready],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        scheduler=args.scheduler,
        seed=args.seed,
        strength=args.strength,
    )
    failed = bool(errors)
    for (item, image), edited in zip(ready, result.images, strict=True):
        try:
            item.out.parent.mkdir(parents=True, exist_ok=True)
            edited.save(item.out)
            if args.grid:
                side_by_side(image, edited).save(item.out.with_suffix(".grid.png"))
        except (OSError, ValueError) as error:
            print(f"error: {item.source}: cannot write {item.out} ({error})", file=sys.stderr)
            failed = True
            continue
        print(f"wrote {item.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
