"""Instruction-based image editing from the command line: InstructPix2Pix, and Focus on Your Instruction (FoI).

One image, IP2P:

    python sample.py --model timbrooks/instruct-pix2pix --image in.png --instruction "make it snow" --out out.png

Several instructions at once with FoI (each --instruction may have a --keyword and an --alpha, in order; a
keyword "-" means none), with a comparison grid (input | each mask over the input | IP2P | FoI):

    python sample.py --image in.png --instruction "make the sky blue" --keyword sky \
        --instruction "turn the cat into a dog" --keyword cat --out out.png --compare

Each instruction may bring its own mask instead of the one FoI cuts from attention (``--mask``, a black-and-white
picture at the image's size, white where the edit goes; one per --instruction), and each sub-instruction may have a
text branch of its own (``--config.foi.text_branches=per_instruction``, docs/foi.md).

A batch from a JSONL manifest, one ``{"image": ..., "instruction": ..., "out": ...}`` per line, or with
``"instructions": [{"text": ..., "keyword": ..., "alpha": ...}, ...]`` for FoI (paths relative to the manifest),
spread over all devices:

    python sample.py --model DIR --manifest edits.jsonl --grid

A bad item (missing or unreadable image, image under 64 px, empty instruction) is reported and skipped; the
others still run, and the exit status is 1 if any item failed.

The sampler's and FoI's settings are ``configs/sample.py``'s, each overridable (``--config.sample.steps=50``,
``--config.sample.scheduler=dpmpp_2m``, ``--config.foi.tau=0.3``; unset FoI settings take the model folder's
``foi_config.json``, else the paper's). A setting out of its range (``--config.foi.tau=2``) is an error that names
it, before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ip2p_jax import compilation_cache

MIN_SIDE = 64  # pixels; below this the UNet's lowest level has under one latent cell
ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "models" / "shapes-ip2p"
CONFIG = ROOT / "configs" / "sample.py"  # the sampler's and FoI's settings


@dataclass
class EditItem:
    """One edit: where it comes from, its sub-instructions and where it goes."""

    image: Path
    instructions: list  # of foi.SubInstruction
    out: Path
    source: str  # for messages: "--image" or "manifest line N"

    @property
    def prompt(self) -> str:
        from ip2p_jax.foi import composite_prompt

        return composite_prompt(self.instructions)[0]


def parse_args(argv=None) -> argparse.Namespace:
    """The everyday flags (what to edit, with which model, where to write) and the settings of ``--config``
    (``configs/sample.py``: ``sample.*``, the sampler's; ``foi.*``, FoI's) with its ``--config.GROUP.NAME=VALUE``
    overrides, as ``args.config``. FoI's settings, checked against their ranges, are ``args.foi_config``."""
    from ip2p_jax.schedulers import SCHEDULERS
    from ip2p_jax.script_config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="diffusers folder or hub repo id (default: the shipped ShapesEdit model; the public checkpoint is "
        "timbrooks/instruct-pix2pix), or a single-file checkpoint in the original layout (.safetensors, or .ckpt "
        "with --allow-pickle): the original InstructPix2Pix release, MagicBrush, Stable Diffusion 1.x / 2.x",
    )
    parser.add_argument(
        "--model-config",
        default=None,
        metavar="DIR_OR_REPO",
        help="for a single file: the diffusers folder or hub repo id of the same architecture that gives the "
        "configs, tokenizer, scheduler and any component the file lacks (default: inferred from the file)",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="read a .ckpt single file (a pickle can run code: trusted files)"
    )
    parser.add_argument("--ema", action="store_true", help="a single file's EMA weights, where it has both")
    parser.add_argument("--revision", default=None, help="hub revision")
    parser.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (half the download)")
    parser.add_argument("--image", type=Path, help="input image")
    parser.add_argument("--instruction", action="append", help="an edit instruction (repeat for several)")
    parser.add_argument("--keyword", action="append", help="FoI: the region word of each instruction, in order")
    parser.add_argument("--alpha", action="append", type=float, help="FoI: attention boost of each instruction")
    parser.add_argument(
        "--mask",
        action="append",
        type=Path,
        help="FoI: a black-and-white picture at the image's size, white where each instruction edits (one per "
        "--instruction), used instead of FoI's own masks",
    )
    parser.add_argument("--out", type=Path, help="output image path")
    parser.add_argument("--manifest", type=Path, help="JSONL file of edits (instead of --image/--instruction/--out)")
    parser.add_argument(
        "--config",
        default=str(CONFIG),
        metavar="FILE",
        help="the settings (default configs/sample.py); override any with --config.GROUP.NAME=VALUE, e.g. "
        "--config.sample.steps=50, --config.sample.scheduler=dpmpp_2m, --config.foi.tau=0.3 (unset FoI settings "
        "take the model folder's foi_config.json, else the paper's)",
    )
    parser.add_argument("--grid", action="store_true", help="also write OUT.grid.png: input | output")
    parser.add_argument("--compilation-cache", default=None, metavar="DIR", help=compilation_cache.HELP)
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress bar per edit; its per-step reports keep the samplers out of the compilation cache",
    )
    words = parser.add_argument_group("Word heatmaps (docs/attention.md)")
    words.add_argument(
        "--attention",
        default=None,
        metavar="WORD[,WORD...]",
        help="write OUT.attention.png: each word's cross-attention over the input and the edit (FoI: keywords, "
        "each beside its mask)",
    )
    words.add_argument(
        "--attention-level",
        type=int,
        default=None,
        help="resolution level of the layers averaged, 0 at the latent's size (default: the FoI mask level)",
    )
    words.add_argument(
        "--attention-steps", default="0,1", metavar="START,STOP", help="fractions of the steps run averaged (0,1)"
    )
    foi = parser.add_argument_group("Focus on Your Instruction (docs/foi.md; its settings: --config.foi.*)")
    foi.add_argument(
        "--foi",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on when keywords or several instructions are given",
    )
    foi.add_argument("--compare", action="store_true", help="write OUT.compare.png: input | masks | IP2P | FoI")
    args, overrides = parser.parse_known_args(argv)
    try:
        args.config = load_config(args.config, overrides)
    except ConfigError as error:
        parser.error(str(error))
    sample = args.config.sample
    single = [args.image, args.instruction, args.out]
    if args.manifest is None and any(x is None for x in single):
        parser.error("give --image, --instruction and --out, or --manifest")
    if args.manifest is not None and any(x is not None for x in single):
        parser.error("--manifest replaces --image, --instruction and --out")
    if sample.strength is not None and not 0.0 < sample.strength <= 1.0:
        parser.error(f"--config.sample.strength must be in (0, 1], got {sample.strength}")
    if not 0.0 <= sample.guidance_rescale <= 1.0:
        parser.error(f"--config.sample.guidance_rescale must be in [0, 1], got {sample.guidance_rescale}")
    if sample.steps < 1:
        parser.error(f"--config.sample.steps must be at least 1, got {sample.steps}")
    if sample.scheduler and sample.scheduler not in SCHEDULERS:
        parser.error(f"--config.sample.scheduler must be one of {', '.join(SCHEDULERS)}, got {sample.scheduler!r}")
    if sample.dtype not in ("float32", "bfloat16"):
        parser.error(f"--config.sample.dtype must be float32 or bfloat16, got {sample.dtype!r}")
    count = len(args.instruction or [])
    for name in ("keyword", "alpha", "mask"):
        given = getattr(args, name)
        if given is not None and len(given) != count:
            parser.error(f"give one --{name} per --instruction ({len(given)} for {count})")
    if args.mask is not None and args.foi is False:
        parser.error("--mask is FoI's; it cannot go with --no-foi")
    from ip2p_jax.foi import foi_config

    # A single file has no foi_config.json beside it; its config folder may.
    model = args.model_config if Path(args.model).is_file() and args.model_config else args.model
    try:
        args.foi_config = foi_config(model, args.config.foi)
    except ValueError as error:
        parser.error(f"--config.foi: {error}")
    args.attention_words, args.attention_recording = None, None
    if args.attention is not None:
        from ip2p_jax.sampling import AttentionRecording

        args.attention_words = [word.strip() for word in args.attention.split(",") if word.strip()]
        if not args.attention_words:
            parser.error("--attention needs at least one word")
        level = args.foi_config.mask_level if args.attention_level is None else args.attention_level
        try:
            steps = tuple(float(x) for x in args.attention_steps.split(","))
            args.attention_recording = AttentionRecording(level, steps)
        except (TypeError, ValueError) as error:
            parser.error(f"--attention-steps / --attention-level: {error}")
    return args


def sub_instructions(texts, keywords=None, alphas=None) -> list:
    from ip2p_jax.foi import SubInstruction

    keywords = keywords or [None] * len(texts)
    alphas = alphas or [1.0] * len(texts)
    return [
        SubInstruction(text, None if keyword in (None, "-") else keyword, float(alpha))
        for text, keyword, alpha in zip(texts, keywords, alphas, strict=True)
    ]


def read_masks(paths: list[Path], image: Image.Image):
    """``--mask`` files as one ``(k, H, W)`` bool array (white, above half brightness, is inside); each must be a
    readable picture of the image's size."""
    import numpy as np

    masks = []
    for path in paths:
        try:
            with Image.open(path) as picture:
                mask = np.asarray(picture.convert("L")) > 127
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read {path} ({error})") from None
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"{path} is {mask.shape[1]} x {mask.shape[0]} px, the image {image.width} x {image.height} px"
            )
        masks.append(mask)
    return np.stack(masks)


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
        if not isinstance(entry, dict):
            errors.append(f"{where}: not a JSON object")
            continue
        missing = [key for key in ("image", "out") if not isinstance(entry.get(key), str)]
        instructions = entry.get("instructions")
        if instructions is None:
            if not isinstance(entry.get("instruction"), str):
                missing.append("instruction")
            instructions = [{"text": entry.get("instruction")}]
        if missing:
            errors.append(f"{where}: needs string fields image, instruction, out (missing or not a string: {missing})")
            continue
        try:
            subs = sub_instructions(
                [x["text"] for x in instructions],
                [x.get("keyword") for x in instructions],
                [x.get("alpha", 1.0) for x in instructions],
            )
        except (TypeError, KeyError, ValueError) as error:
            errors.append(f"{where}: instructions must be a list of {{text, keyword, alpha}} ({error!r})")
            continue
        resolve = lambda p: p if Path(p).is_absolute() else path.parent / p  # noqa: E731
        items.append(EditItem(Path(resolve(entry["image"])), subs, Path(resolve(entry["out"])), where))
    return items, errors


def load_item(item: EditItem) -> Image.Image:
    """The item's image as RGB, or ``ValueError`` saying what is wrong with the item."""
    if not item.instructions or any(not isinstance(sub.text, str) or not sub.text.strip() for sub in item.instructions):
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.manifest is not None:
        items, errors = read_manifest(args.manifest)
    else:
        subs = sub_instructions(args.instruction, args.keyword, args.alpha)
        items, errors = [EditItem(args.image, subs, args.out, "--image")], []
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

    compilation_cache.enable(args.compilation_cache)
    import jax.numpy as jnp

    from ip2p_jax.models.attention_kernels import check_backend

    sample = args.config.sample
    try:
        check_backend(sample.attention_backend)
    except ValueError as error:
        print(f"error: --config.sample.attention_backend: {error}", file=sys.stderr)
        return 1

    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import SchedulerError
    from ip2p_jax.visualisation import compare_grid, grid
    from ip2p_jax.weights import CheckpointError

    options = dict(
        revision=args.revision,
        dtype=jnp.bfloat16 if sample.dtype == "bfloat16" else jnp.float32,
        attention_backend=sample.attention_backend,
    )
    try:
        if Path(args.model).is_file():
            pipe = InstructPix2PixPipeline.from_single_file(
                args.model, config=args.model_config, allow_pickle=args.allow_pickle, ema=args.ema, **options
            )
        else:
            pipe = InstructPix2PixPipeline.from_pretrained(args.model, variant=args.variant, **options)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    scheduler = sample.scheduler or None
    if sample.karras:
        try:
            scheduler = pipe.scheduler.replace(scheduler, use_karras_sigmas=True)
        except SchedulerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    use_foi = args.foi
    if use_foi is None:
        use_foi = args.mask is not None or any(
            len(item.instructions) > 1 or item.instructions[0].keyword for item, _ in ready
        )
    masks = None
    if args.mask is not None:
        try:
            masks = [read_masks(args.mask, ready[0][1])]
        except ValueError as error:
            print(f"error: --mask: {error}", file=sys.stderr)
            return 1
    if use_foi:
        from ip2p_jax.foi import InstructionError, branch_tokens, instruction_tokens

        tokenise = branch_tokens if args.foi_config.text_branches == "per_instruction" else instruction_tokens
        checked = []
        for item, image in ready:
            try:
                tokenise(pipe.tokenizer, item.instructions)
                checked.append((item, image))
            except InstructionError as error:
                errors.append(f"{item.source}: {error}")
                print(f"error: {item.source}: {error}", file=sys.stderr)
        ready = checked
        if not ready:
            return 1
    method = "FoI" if use_foi else "IP2P"
    print(f"editing {len(ready)} image(s) with {method} on {pipe.mesh.size} device(s)", file=sys.stderr)
    images = [image for _, image in ready]
    common = dict(
        num_inference_steps=sample.steps,
        guidance_scale=sample.guidance_scale,
        image_guidance_scale=sample.image_guidance_scale,
        scheduler=scheduler,
        seed=sample.seed,
        guidance_rescale=sample.guidance_rescale,
        progress=args.progress,
    )
    try:  # the pipeline checks a call's settings against the model before it compiles anything
        if use_foi:
            instructions = [item.instructions for item, _ in ready]
            result = pipe(images, instructions=instructions, foi=args.foi_config, masks=masks, **common)
        else:
            prompts = [item.prompt for item, _ in ready]
            result = pipe(images, prompts, strength=sample.strength, attention=args.attention_recording, **common)
        plain = None
        if args.compare and use_foi:  # IP2P with the composite prompt, same steps, strength and seed
            prompts = [item.prompt for item, _ in ready]
            plain = pipe(images, prompts, strength=args.foi_config.strength, **common).images
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    failed = bool(errors)
    for index, ((item, image), edited) in enumerate(zip(ready, result.images, strict=True)):
        try:
            item.out.parent.mkdir(parents=True, exist_ok=True)
            edited.save(item.out)
            if args.grid:
                # input | output, the input resized to the output's size if they differ (sides floor to multiples of 8)
                base = image.resize(edited.size, Image.LANCZOS) if image.size != edited.size else image
                grid([[base, edited]]).save(item.out.with_suffix(".grid.png"))
            if plain is not None:
                comparison = compare_grid(image, result.masks[index]["image"], plain[index], edited)
                comparison.save(item.out.with_suffix(".compare.png"))
            if args.attention_words:
                picture = attention_picture(pipe, item, image, edited, result, index, args.attention_words)
                picture.save(item.out.with_suffix(".attention.png"))
        except (OSError, ValueError) as error:
            print(f"error: {item.source}: cannot write {item.out} ({error})", file=sys.stderr)
            failed = True
            continue
        print(f"wrote {item.out}", file=sys.stderr)
    return 1 if failed else 0


def attention_picture(pipe, item, image, edited, result, index: int, words: list[str]):
    """``--attention``'s grid for one edit: each word's map over the input and the edit (IP2P: from the token maps
    the edit recorded; FoI: each keyword's map at the mask step, beside its mask). A word that is not in the
    instruction (FoI: not a keyword) is a ``ValueError`` naming it."""
    from ip2p_jax.visualisation import attention_grid

    if result.masks is None:
        return attention_grid(image, edited, words, pipe.word_maps(item.prompt, result.attention[index], words))
    keywords = [(sub.keyword or "").lower() for sub in item.instructions]
    missing = [word for word in words if word.lower() not in keywords]
    if missing:
        raise ValueError(f"--attention {', '.join(missing)}: FoI shows keywords, and this edit's are {keywords}")
    picks = [keywords.index(word.lower()) for word in words]
    masks = result.masks[index]
    return attention_grid(image, edited, words, masks["attention"][picks], masks["image"][picks])


if __name__ == "__main__":
    sys.exit(main())
