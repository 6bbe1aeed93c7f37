"""Instruction-based image editing from the command line: InstructPix2Pix, and Focus on Your Instruction (FoI).

One image, IP2P:

    python sample.py --model timbrooks/instruct-pix2pix --image in.png --instruction "make it snow" --out out.png

Several instructions at once with FoI (each --instruction may have a --keyword and an --alpha, in order; a
keyword "-" means none), with a comparison grid (input | each mask over the input | IP2P | FoI):

    python sample.py --image in.png --instruction "make the sky blue" --keyword sky \
        --instruction "turn the cat into a dog" --keyword cat --out out.png --compare

A batch from a JSONL manifest, one ``{"image": ..., "instruction": ..., "out": ...}`` per line, or with
``"instructions": [{"text": ..., "keyword": ..., "alpha": ...}, ...]`` for FoI (paths relative to the manifest),
spread over all devices:

    python sample.py --model DIR --manifest edits.jsonl --grid

A bad item (missing or unreadable image, image under 64 px, empty instruction) is reported and skipped; the
others still run, and the exit status is 1 if any item failed. A setting out of its range (``--tau 2``) is an
error that names it, before the model is loaded.
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
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "shapes-ip2p"


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
    from ip2p_jax.schedulers import SCHEDULERS

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
    parser.add_argument("--out", type=Path, help="output image path")
    parser.add_argument("--manifest", type=Path, help="JSONL file of edits (instead of --image/--instruction/--out)")
    parser.add_argument("--steps", type=int, default=100, help="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance s_T")
    parser.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance s_I")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the checkpoint's own")
    parser.add_argument(
        "--karras",
        action="store_true",
        help="Karras sigmas (euler_ancestral, euler, dpmpp_2m; --scheduler dpmpp_2m --karras is DPM++ 2M Karras)",
    )
    parser.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="in [0, 1]: pull the guided output's std toward the text+image branch's (Lin et al. 2024); 0 = off",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strength", type=float, default=None, help="fraction of the schedule run, in (0, 1]; default 1, FoI 0.8"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument(
        "--attention-backend",
        default="auto",
        help="the UNet's attention kernel: auto (the platform's), tiled, xla, cudnn or splash",
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
    foi = parser.add_argument_group("Focus on Your Instruction (docs/foi.md)")
    foi.add_argument(
        "--foi",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on when keywords or several instructions are given",
    )
    foi.add_argument("--compare", action="store_true", help="write OUT.compare.png: input | masks | IP2P | FoI")
    # Unset FoI settings take the model folder's foi_config.json, else the paper's (FoIConfig.for_model).
    foi.add_argument(
        "--tau", default=None, help="mask threshold in [0, 1] (0.5), or a range LOW,HIGH within it drawn per image"
    )
    foi.add_argument("--gamma", type=int, default=None, help="rounds of square + min-max, >= 0 (3)")
    foi.add_argument(
        "--mask-downsample", type=int, default=None, help="mask resolution = latent size / this, a power of two (4)"
    )
    foi.add_argument("--mask-step", type=int, default=None, help="step run that builds the masks, >= 0 (0)")
    foi.add_argument("--no-modulation", action="store_true", help="ablation: no attention modulation")
    foi.add_argument(
        "--modulation-stop", type=float, default=None, help="fraction of steps with modulation, in [0, 1] (1)"
    )
    foi.add_argument("--no-decoupled-guidance", action="store_true", help="ablation: plain IP2P guidance")
    foi.add_argument(
        "--decoupled-fraction", type=float, default=None, help="fraction of steps with it, in [0, 1] (0.75)"
    )
    foi.add_argument("--outside-values", choices=("own", "image_only"), default=None, help="(own)")
    args = parser.parse_args(argv)
    single = [args.image, args.instruction, args.out]
    if args.manifest is None and any(x is None for x in single):
        parser.error("give --image, --instruction and --out, or --manifest")
    if args.manifest is not None and any(x is not None for x in single):
        parser.error("--manifest replaces --image, --instruction and --out")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        parser.error(f"--strength must be in (0, 1], got {args.strength}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        parser.error(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    count = len(args.instruction or [])
    for name in ("keyword", "alpha"):
        given = getattr(args, name)
        if given is not None and len(given) != count:
            parser.error(f"give one --{name} per --instruction ({len(given)} for {count})")
    try:
        args.foi_config = foi_config(args)
    except ValueError as error:
        parser.error(str(error))
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
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


def foi_config(args):
    """``FoIConfig`` of the model (its folder's ``foi_config.json``, else the paper's) with the settings given on
    the command line."""
    from ip2p_jax.foi import FoIConfig

    given = dict(
        strength=args.strength,
        gamma=args.gamma,
        mask_downsample=args.mask_downsample,
        mask_step=args.mask_step,
        modulation_stop=args.modulation_stop,
        outside_values=args.outside_values,
        decoupled_fraction=args.decoupled_fraction,
    )
    if args.tau is not None:
        try:
            given["tau"] = tuple(float(x) for x in args.tau.split(",")) if "," in args.tau else float(args.tau)
        except ValueError:
            raise ValueError(f"--tau must be a number or a range LOW,HIGH, got {args.tau!r}") from None
    if args.no_modulation:
        given["modulation"] = False
    if args.no_decoupled_guidance:
        given["decoupled_guidance"] = False
    # A single file has no foi_config.json beside it; its config folder may.
    model = args.model_config if Path(args.model).is_file() and args.model_config else args.model
    return FoIConfig.for_model(model, **{k: v for k, v in given.items() if v is not None})


def sub_instructions(texts, keywords=None, alphas=None) -> list:
    from ip2p_jax.foi import SubInstruction

    keywords = keywords or [None] * len(texts)
    alphas = alphas or [1.0] * len(texts)
    return [
        SubInstruction(text, None if keyword in (None, "-") else keyword, float(alpha))
        for text, keyword, alpha in zip(texts, keywords, alphas, strict=True)
    ]


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

    try:
        check_backend(args.attention_backend)
    except ValueError as error:
        print(f"error: --attention-backend: {error}", file=sys.stderr)
        return 1

    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import SchedulerError
    from ip2p_jax.visualisation import compare_grid
    from ip2p_jax.weights import CheckpointError

    options = dict(
        revision=args.revision,
        dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
        attention_backend=args.attention_backend,
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
    scheduler = args.scheduler
    if args.karras:
        try:
            scheduler = pipe.scheduler.replace(args.scheduler, use_karras_sigmas=True)
        except SchedulerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    use_foi = args.foi
    if use_foi is None:
        use_foi = any(len(item.instructions) > 1 or item.instructions[0].keyword for item, _ in ready)
    if use_foi:
        from ip2p_jax.foi import InstructionError, instruction_tokens

        checked = []
        for item, image in ready:
            try:
                instruction_tokens(pipe.tokenizer, item.instructions)
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
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        scheduler=scheduler,
        seed=args.seed,
        guidance_rescale=args.guidance_rescale,
        progress=args.progress,
    )
    try:  # the pipeline checks a call's settings against the model before it compiles anything
        if use_foi:
            instructions = [item.instructions for item, _ in ready]
            result = pipe(images, instructions=instructions, foi=args.foi_config, **common)
        else:
            prompts = [item.prompt for item, _ in ready]
            result = pipe(images, prompts, strength=args.strength, attention=args.attention_recording, **common)
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
                side_by_side(image, edited).save(item.out.with_suffix(".grid.png"))
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
