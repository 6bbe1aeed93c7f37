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
``"instructions": [{"text": ..., "keyword": ..., "alpha": ...}, ...]`` for FoI (paths relative to the manifest;
an optional ``"seed"`` per item), spread over all devices:

    python sample.py --model DIR --manifest edits.jsonl --grid

Each item is edited in its own mode (FoI when it has keywords or several instructions, IP2P for a plain one;
``--foi`` / ``--no-foi`` choose for all) and as it would be alone: its seed, not its place in the batch, draws its
noise. A bad item (missing or unreadable image, image under 64 px, empty instruction, a keyword not in its
instruction, an ``--attention`` word not in it) is reported and skipped before anything is edited; the others
still run, the failures are listed again at the end, and the exit status is 1 if any item failed.

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
from typing import Any

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
    seed: int | None = None  # the manifest's; None: --config.sample.seed
    masks: Any = None  # FoI: the (k, H, W) bool array of --mask, once read

    def uses_foi(self, forced: bool | None, masks_given: bool) -> bool:
        """The item's mode: ``--foi`` / ``--no-foi`` (``forced``) for every item, else FoI for an item with
        keywords, several sub-instructions or ``--mask``, IP2P for a plain instruction."""
        if forced is not None:
            return forced
        return masks_given or len(self.instructions) > 1 or any(sub.keyword for sub in self.instructions)

    @property
    def prompt(self) -> str:
        from ip2p_jax.foi import composite_prompt

        return composite_prompt(self.instructions)[0]


def parse_args(argv=None) -> argparse.Namespace:
    """The everyday flags (what to edit, with which model, where to write) and the settings of ``--config``
    (``configs/sample.py``: ``sample.*``, the sampler's; ``foi.*``, FoI's) with its ``--config.GROUP.NAME=VALUE``
    overrides, as ``args.config``, each checked (a usage error names the flag). FoI's settings, checked against
    their ranges, are ``args.foi_config``; ``--attention``'s words and recording ``args.attention_words`` and
    ``args.attention_recording``."""
    from ip2p_jax.script_config import ConfigError, load_config

    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        args.config = load_config(args.config, overrides)
    except ConfigError as error:
        parser.error(str(error))
    check_args(parser, args)
    args.foi_config = foi_settings_of(parser, args)
    args.attention_words, args.attention_recording = attention_of(parser, args)
    return args


def build_parser() -> argparse.ArgumentParser:
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
    add_heatmap_and_foi_flags(parser)
    return parser


def add_heatmap_and_foi_flags(parser: argparse.ArgumentParser) -> None:
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
        help="FoI for every item (--no-foi: IP2P for every item); default: per item, FoI when it has keywords, "
        "several instructions or --mask",
    )
    foi.add_argument("--compare", action="store_true", help="write OUT.compare.png: input | masks | IP2P | FoI")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """The flags against each other and the sampler's settings against their ranges (``parser.error``)."""
    from ip2p_jax.schedulers import SCHEDULERS

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


def foi_settings_of(parser: argparse.ArgumentParser, args):
    """FoI's settings: the model's ``foi_config.json`` (a single file's config folder's) under ``--config.foi``."""
    from ip2p_jax.foi import foi_config
    from ip2p_jax.weights import CheckpointError

    model = args.model_config if Path(args.model).is_file() and args.model_config else args.model
    try:
        return foi_config(model, args.config.foi)
    except CheckpointError as error:  # no such folder, or an unreachable hub: before anything is loaded
        parser.error(f"--model: {error}")
    except ValueError as error:
        parser.error(f"--config.foi: {error}")


def attention_of(parser: argparse.ArgumentParser, args) -> tuple:
    """``--attention``'s words and the IP2P edits' ``AttentionRecording`` (``(None, None)`` without it)."""
    if args.attention is None:
        return None, None
    from ip2p_jax.sampling import AttentionRecording

    words = [word.strip() for word in args.attention.split(",") if word.strip()]
    if not words:
        parser.error("--attention needs at least one word")
    level = args.foi_config.mask_level if args.attention_level is None else args.attention_level
    try:
        steps = tuple(float(x) for x in args.attention_steps.split(","))
        return words, AttentionRecording(level, steps)
    except (TypeError, ValueError) as error:
        parser.error(f"--attention-steps / --attention-level: {error}")


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
            raise ValueError(f"--mask: cannot read {path} ({error})") from None
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"--mask: {path} is {mask.shape[1]} x {mask.shape[0]} px, the image {image.width} x {image.height} px"
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
        seed = entry.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            errors.append(f"{where}: seed must be an integer >= 0, got {seed!r}")
            continue
        resolve = lambda p: p if Path(p).is_absolute() else path.parent / p  # noqa: E731
        items.append(EditItem(Path(resolve(entry["image"])), subs, Path(resolve(entry["out"])), where, seed))
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
    ready, errors = readable_items(args)
    total = len(ready) + len(errors)  # a manifest's lines, each an item or an error
    if not ready:
        print("error: nothing to edit", file=sys.stderr)
        return 1
    pipe, scheduler = load_pipeline(args)
    if pipe is None:
        return 1
    ready = checked_items(pipe, args, ready, errors)
    if not ready:
        return report_failures(errors, total)
    modes = [item.uses_foi(args.foi, args.mask is not None) for item, _ in ready]
    counts = f"{sum(modes)} with FoI, {len(modes) - sum(modes)} with IP2P"
    print(f"editing {len(ready)} image(s) ({counts}) on {pipe.mesh.size} device(s)", file=sys.stderr)
    for use_foi in (True, False):
        group = [(item, image) for (item, image), mode in zip(ready, modes, strict=True) if mode == use_foi]
        if group:
            try:  # the pipeline checks a call's settings against the model before it compiles anything
                edits = edit_group(pipe, args, group, use_foi, scheduler)
            except ValueError as error:
                print(f"error: {error}", file=sys.stderr)
                errors.extend(f"{item.source}: {error}" for item, _ in group)
                continue
            for (item, image), edit in zip(group, edits, strict=True):
                try:
                    written = write_outputs(pipe, args, item, image, edit)
                except (OSError, ValueError) as error:
                    errors.append(f"{item.source}: cannot write {item.out} ({error})")
                    print(f"error: {errors[-1]}", file=sys.stderr)
                    continue
                print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return report_failures(errors, total)


def readable_items(args) -> tuple[list[tuple[EditItem, Image.Image]], list[str]]:
    """The items (the manifest's, or the one of --image) whose images load, each with its image, and the errors of
    the others (each printed as found)."""
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
    return ready, errors


def load_pipeline(args):
    """The pipeline and the scheduler of the edits (``None``: the model's own), or ``(None, None)`` after printing
    why not (an unknown attention kernel, a checkpoint that cannot be loaded, Karras sigmas the scheduler lacks)."""
    compilation_cache.enable(args.compilation_cache)
    import jax.numpy as jnp

    from ip2p_jax.models.attention_kernels import check_backend
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import SchedulerError
    from ip2p_jax.weights import CheckpointError

    sample = args.config.sample
    options = dict(
        revision=args.revision,
        dtype=jnp.bfloat16 if sample.dtype == "bfloat16" else jnp.float32,
        attention_backend=sample.attention_backend,
    )
    try:
        check_backend(sample.attention_backend)
    except ValueError as error:
        print(f"error: --config.sample.attention_backend: {error}", file=sys.stderr)
        return None, None
    try:
        if Path(args.model).is_file():
            pipe = InstructPix2PixPipeline.from_single_file(
                args.model, config=args.model_config, allow_pickle=args.allow_pickle, ema=args.ema, **options
            )
        else:
            pipe = InstructPix2PixPipeline.from_pretrained(args.model, variant=args.variant, **options)
        scheduler = sample.scheduler or None
        if sample.karras:
            scheduler = pipe.scheduler.replace(scheduler, use_karras_sigmas=True)
    except (CheckpointError, SchedulerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None, None
    return pipe, scheduler


def checked_items(pipe, args, ready: list, errors: list[str]) -> list:
    """The items that pass the checks that need the tokenizer, before anything is edited: FoI's keywords in their
    sub-instructions, ``--attention``'s words in the item (FoI: among its keywords; IP2P: in its instruction),
    ``--mask`` files readable at the image's size. The others' errors are printed and added to ``errors``."""
    from ip2p_jax.foi import branch_tokens, instruction_tokens
    from ip2p_jax.tokenizer import word_token_weights

    tokenise = branch_tokens if args.foi_config.text_branches == "per_instruction" else instruction_tokens
    checked = []
    for item, image in ready:
        try:
            if item.uses_foi(args.foi, args.mask is not None):
                tokenise(pipe.tokenizer, item.instructions)
                keywords = [(sub.keyword or "").lower() for sub in item.instructions]
                missing = [word for word in args.attention_words or [] if word.lower() not in keywords]
                if missing:
                    raise ValueError(f"--attention {', '.join(missing)}: FoI shows keywords, and these are {keywords}")
                item.masks = None if args.mask is None else read_masks(args.mask, image)  # --image: one item
            elif args.attention_words:
                word_token_weights(pipe.tokenizer, item.prompt, args.attention_words)
            checked.append((item, image))
        except ValueError as error:  # foi.InstructionError is one
            errors.append(f"{item.source}: {error}")
            print(f"error: {errors[-1]}", file=sys.stderr)
    return checked


def edit_group(pipe, args, group: list, use_foi: bool, scheduler) -> list[dict]:
    """One pipeline call for the items of one mode; each item's image is edited as it would be alone (its own
    seed, never its place in the batch). Per item ``{"edited", "masks", "attention", "plain"}``: FoI's masks and
    keyword maps, IP2P's token maps, and with ``--compare`` the IP2P edit of FoI's composite prompt (else None)."""
    sample = args.config.sample
    images = [image for _, image in group]
    common = dict(
        num_inference_steps=sample.steps,
        guidance_scale=sample.guidance_scale,
        image_guidance_scale=sample.image_guidance_scale,
        scheduler=scheduler,
        seed=[item.seed if item.seed is not None else sample.seed for item, _ in group],
        guidance_rescale=sample.guidance_rescale,
        progress=args.progress,
    )
    prompts = [item.prompt for item, _ in group]
    plain = [None] * len(group)
    if use_foi:
        masks = None if args.mask is None else [item.masks for item, _ in group]
        instructions = [item.instructions for item, _ in group]
        result = pipe(images, instructions=instructions, foi=args.foi_config, masks=masks, **common)
        if args.compare:  # IP2P with the composite prompt, same steps, strength and seeds
            plain = pipe(images, prompts, strength=args.foi_config.strength, **common).images
    else:
        result = pipe(images, prompts, strength=sample.strength, attention=args.attention_recording, **common)
    return [
        {
            "edited": result.images[index],
            "masks": None if result.masks is None else result.masks[index],
            "attention": None if result.attention is None else result.attention[index],
            "plain": plain[index],
        }
        for index in range(len(group))
    ]


def write_outputs(pipe, args, item: EditItem, image: Image.Image, edit: dict) -> list[Path]:
    """Writes an item's edit and the pictures asked for (``--grid``, ``--compare``, ``--attention``); returns
    their paths."""
    from ip2p_jax.visualisation import compare_grid, grid

    edited = edit["edited"]
    item.out.parent.mkdir(parents=True, exist_ok=True)
    edited.save(item.out)
    written = [item.out]
    if args.grid:
        # input | output, the input resized to the output's size if they differ (sides floor to multiples of 8)
        base = image.resize(edited.size, Image.LANCZOS) if image.size != edited.size else image
        written.append(item.out.with_suffix(".grid.png"))
        grid([[base, edited]]).save(written[-1])
    if edit["plain"] is not None:
        written.append(item.out.with_suffix(".compare.png"))
        compare_grid(image, edit["masks"]["image"], edit["plain"], edited).save(written[-1])
    if args.attention_words:
        written.append(item.out.with_suffix(".attention.png"))
        attention_picture(pipe, item, image, edit, args.attention_words).save(written[-1])
    return written


def report_failures(errors: list[str], total: int) -> int:
    """The exit status, 1 when any item failed, after a summary of the failures (a long batch's first errors have
    scrolled away by its end)."""
    if not errors:
        return 0
    print(f"{len(errors)} of {total} item(s) failed:", file=sys.stderr)
    for message in errors:
        print(f"  {message}", file=sys.stderr)
    return 1


def attention_picture(pipe, item, image, edit: dict, words: list[str]):
    """``--attention``'s grid for one edit: each word's map over the input and the edit (IP2P: from the token maps
    the edit recorded; FoI: each keyword's map at the mask step, beside its mask). ``checked_items`` has checked
    the words."""
    from ip2p_jax.visualisation import attention_grid

    if edit["masks"] is None:
        maps = pipe.word_maps(item.prompt, edit["attention"], words)
        return attention_grid(image, edit["edited"], words, maps)
    keywords = [(sub.keyword or "").lower() for sub in item.instructions]
    picks = [keywords.index(word.lower()) for word in words]
    masks = edit["masks"]
    return attention_grid(image, edit["edited"], words, masks["attention"][picks], masks["image"][picks])


if __name__ == "__main__":
    sys.exit(main())
