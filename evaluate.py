"""Measure what Focus on Your Instruction promises, on ShapesEdit's test splits (ground truth known exactly).

    python evaluate.py                                   # the shipped model, both test splits, every method
    python evaluate.py --model DIR --config.data.limit=50 --config.sample.steps=50 --out runs/eval

Settings (``configs/evaluate.py``): ``data`` (dataset, splits, examples per split), ``methods``, ``sample`` (steps,
guidance scales, seed, batch) and ``foi`` (unset: the model folder's ``foi_config.json``, else the paper's).

Splits: ``test_single``, ``test_multi`` and ``train_fit``, the fit check: the first non-leaky examples of the
training split itself (combinations the model was trained on), so that a model that fails there is undertrained,
and one that succeeds there but not on the test splits fails to generalise.

Methods, all from the same seeds (image ``i`` of a batch draws from ``fold_in(PRNGKey(seed + batch), i)``):
``ip2p`` (InstructPix2Pix, the composite prompt, full strength), ``ip2p_strength_0.8`` (the same entering the
schedule where FoI does), ``foi`` (Focus on Your Instruction, each sub-instruction with its keyword) and FoI's
ablations ``foi_no_modulation`` and ``foi_no_decoupled_guidance``. On request (``--config.methods``), for several
instructions: ``foi_true_masks`` (ShapesEdit's true regions as FoI's masks: its ceiling), ``foi_per_instruction``
and ``foi_per_instruction_true_masks`` (one text branch per sub-instruction, ``FoIConfig.text_branches``),
``foi_composite`` and ``foi_composite_true_masks`` (the paper's one composite prompt, whatever the model's settings
say), and ``ip2p_sequential`` and ``foi_sequential`` (one instruction at a time, each output edited by the next: the
multi-turn baseline). And two references that run no model, the judge's known answers: ``ground_truth`` (the exact
edited picture) and ``input`` (the picture unedited). For each: edit success per instruction, overall and by kind of
edit (recolour, reshape, remove, background), the share of examples with every instruction carried out, the change
outside the ground-truth region (mean absolute change in levels of 255, and PSNR), and for FoI the mask IoU at mask
resolution (``ip2p_jax/evaluation/shapes_edit.py``).

Writes ``OUT/results.md`` (a table) and ``OUT/results.json`` (settings, aggregates and per-example figures) after
every method, so that an interrupted evaluation keeps the methods it finished; at the end ``OUT/examples.png`` (input |
ground truth | FoI's masks | IP2P | FoI, enlarged 3x) and ``OUT/methods.png`` (input | ground truth | the true regions
over the input | each method's edit in the order run, enlarged 3x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from ip2p_jax import compilation_cache

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "models" / "shapes-ip2p"
CONFIG = ROOT / "configs" / "evaluate.py"  # the data, methods, sampler's and FoI's settings
METHODS = ("ip2p", "ip2p_strength_0.8", "foi", "foi_no_modulation", "foi_no_decoupled_guidance")
# On request: FoI's ceiling with ShapesEdit's true regions as masks, one text branch per sub-instruction, and one
# instruction at a time (each output edited by the next instruction: the multi-turn baseline).
MULTI_METHODS = (
    "foi_true_masks",
    "foi_composite",
    "foi_composite_true_masks",
    "foi_per_instruction",
    "foi_per_instruction_true_masks",
    "ip2p_sequential",
    "foi_sequential",
)
REFERENCES = ("ground_truth", "input")  # no model: the judge's known answers
SPLITS = ("test_single", "test_multi", "train_fit")
DEFAULT_SPLITS = ("test_single", "test_multi")
FIT_SPLIT = "train_fit"  # the training split's non-leaky examples
GRID_EXAMPLES = 4  # per split
ENLARGE = 3


def parse_args(argv=None) -> argparse.Namespace:
    """``--model``, ``--out`` and the settings of ``--config`` (``configs/evaluate.py``) with its
    ``--config.GROUP.NAME=VALUE`` overrides, as ``args.config``; the splits and methods as lists, and the model's FoI
    settings with the overrides, checked before anything is loaded, as ``args.foi_config``."""
    from ip2p_jax.foi import foi_config
    from ip2p_jax.script_config import ConfigError, load_config
    from ip2p_jax.weights import CheckpointError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="an InstructPix2Pix diffusers folder")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "evaluation")
    parser.add_argument(
        "--config",
        default=str(CONFIG),
        metavar="FILE",
        help="the settings (default configs/evaluate.py); override any with --config.GROUP.NAME=VALUE, e.g. "
        "--config.data.limit=50, --config.sample.steps=50, --config.methods=ip2p,foi, --config.foi.gamma=1",
    )
    parser.add_argument("--compilation-cache", default=None, metavar="DIR", help=compilation_cache.HELP)
    args, overrides = parser.parse_known_args(argv)
    try:
        args.config = config = load_config(args.config, overrides)
    except ConfigError as error:
        parser.error(str(error))
    args.splits = [s for s in config.data.splits.split(",") if s] or list(DEFAULT_SPLITS)
    args.methods = [m for m in config.methods.split(",") if m] or list(METHODS)
    for split in args.splits:
        if split not in SPLITS:
            parser.error(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    for method in args.methods:
        if method not in METHODS + MULTI_METHODS + REFERENCES:
            known = ", ".join(METHODS + MULTI_METHODS + REFERENCES)
            parser.error(f"unknown method {method!r} (one of {known})")
    if config.data.limit is not None and config.data.limit < 1:
        parser.error("--config.data.limit must be at least 1")
    if config.sample.steps < 1 or config.sample.batch < 1:
        parser.error("--config.sample.steps and --config.sample.batch must be at least 1")
    try:  # the model's FoI settings (its foi_config.json) and the overrides, checked before anything is loaded
        args.foi_config = foi_config(args.model, config.foi)
    except CheckpointError as error:
        parser.error(f"--model: {error}")
    except (TypeError, ValueError) as error:
        parser.error(f"--config.foi: {error}")
    return args


def load_split(builder, split: str, limit: int | None) -> list[dict]:
    """The split's examples as numpy dicts (text decoded); ``train_fit``: the training split's non-leaky ones."""
    import tensorflow_datasets as tfds

    dataset = builder.as_dataset(split="train" if split == FIT_SPLIT else split, shuffle_files=False)
    if split == FIT_SPLIT:
        dataset = dataset.filter(lambda example: example["leak"] == "")
    if limit is not None:
        dataset = dataset.take(limit)
    examples = []
    for example in tfds.as_numpy(dataset):
        decoded = {}
        for key, value in example.items():
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, np.ndarray) and value.dtype == object:
                value = [v.decode() for v in value]
            decoded[key] = value
        examples.append(decoded)
    return examples


def edit_batch(pipe, method: str, foi_config, examples: list[dict], args, seed: int) -> tuple[np.ndarray, list]:
    """``(B, 64, 64, 3)`` float edits in [0, 255] and FoI's ``(K, h, w)`` masks per example (``None`` for IP2P)."""
    common = dict(
        num_inference_steps=args.config.sample.steps,
        guidance_scale=args.config.sample.guidance_scale,
        image_guidance_scale=args.config.sample.image_guidance_scale,
        seed=seed,
        output_type="np",
        progress=False,
    )
    images = [e["input_image"] for e in examples]
    if method in REFERENCES:
        key = "edited_image" if method == "ground_truth" else "input_image"
        return np.stack([e[key] for e in examples]).astype(np.float64), [None] * len(examples)
    if method.endswith("_sequential"):
        return sequential_edits(pipe, method, foi_config, examples, common)
    if method.startswith("ip2p"):
        strength = foi_config.strength if method == "ip2p_strength_0.8" else 1.0
        out = pipe(images, [e["instruction"] for e in examples], strength=strength, **common)
        return np.asarray(out.images) * 255.0, [None] * len(examples)
    config = foi_config
    if method == "foi_no_modulation":
        config = dataclasses.replace(config, modulation=False)
    elif method == "foi_no_decoupled_guidance":
        config = dataclasses.replace(config, decoupled_guidance=False)
    elif method.startswith("foi_per_instruction"):
        config = dataclasses.replace(config, text_branches="per_instruction")
    elif method.startswith("foi_composite"):
        config = dataclasses.replace(config, text_branches="composite")
    masks = [e["regions"] for e in examples] if method.endswith("_true_masks") else None
    instructions = [list(zip(e["instructions"], e["keywords"], strict=True)) for e in examples]
    out = pipe(images, instructions=instructions, foi=config, masks=masks, **common)
    return np.asarray(out.images) * 255.0, [m["latent"] for m in out.masks]


def sequential_edits(pipe, method: str, foi_config, examples: list[dict], common: dict) -> tuple[np.ndarray, list]:
    """One instruction at a time: pass ``k`` edits each example that has a ``k``-th instruction, starting from the
    previous pass's picture (rounded to uint8 as a saved picture would be), by IP2P at full strength or FoI with that
    sub-instruction alone. FoI's masks are each pass's own, stacked ``(K, h, w)``."""
    pictures = [e["input_image"] for e in examples]
    masks = [[] for _ in examples]
    for k in range(max(len(e["instructions"]) for e in examples)):
        rows = [i for i, e in enumerate(examples) if k < len(e["instructions"])]
        images = [pictures[i] for i in rows]
        if method == "ip2p_sequential":
            out = pipe(images, [examples[i]["instructions"][k] for i in rows], strength=1.0, **common)
        else:
            subs = [[(examples[i]["instructions"][k], examples[i]["keywords"][k])] for i in rows]
            out = pipe(images, instructions=subs, foi=foi_config, **common)
        for position, i in enumerate(rows):
            pictures[i] = (np.asarray(out.images[position]) * 255.0).round().clip(0, 255).astype(np.uint8)
            if out.masks is not None:
                masks[i].append(out.masks[position]["latent"][0])
    found = [np.stack(m) if m else None for m in masks]
    return np.stack(pictures).astype(np.float64), found


def judge(example: dict, output: np.ndarray, masks) -> dict:
    """Per-example figures (``ip2p_jax/evaluation/shapes_edit.py``)."""
    from ip2p_jax.evaluation import shapes_edit as evaluation

    target, regions = example["edited_image"], example["regions"]
    success = [evaluation.edit_success(output, target, region) for region in regions]
    figures = {
        "kinds": list(example["kinds"]),
        "success": success,
        "all_success": all(success),
        "outside_change": evaluation.outside_change(output, example["input_image"], example["mask"]),
        "outside_psnr": evaluation.outside_psnr(output, example["input_image"], example["mask"]),
    }
    if masks is not None:
        figures["mask_iou"] = [evaluation.mask_iou(m, region) for m, region in zip(masks, regions, strict=True)]
    return figures


def aggregate(per_example: list[dict]) -> dict:
    """Means over a split: per-instruction success (overall and by kind of edit, ``success_by_kind``; a kind absent
    from the split has none), all-instructions success, outside change and PSNR, mask IoU."""
    from ip2p_jax.data.shapes import EDIT_KINDS

    instructions = [s for e in per_example for s in e["success"]]
    by_kind = {kind: [] for kind in EDIT_KINDS}
    for e in per_example:
        for kind, success in zip(e["kinds"], e["success"], strict=True):
            by_kind[kind].append(success)
    psnr = [e["outside_psnr"] for e in per_example if math.isfinite(e["outside_psnr"])]
    summary = {
        "examples": len(per_example),
        "edit_success": float(np.mean(instructions)),
        "success_by_kind": {kind: float(np.mean(found)) for kind, found in by_kind.items() if found},
        "all_success": float(np.mean([e["all_success"] for e in per_example])),
        "outside_change": float(np.mean([e["outside_change"] for e in per_example])),
        "outside_psnr": float(np.mean(psnr)) if psnr else float("inf"),
    }
    if "mask_iou" in per_example[0]:
        summary["mask_iou"] = float(np.mean([iou for e in per_example for iou in e["mask_iou"]]))
    return summary


def markdown_table(results: dict) -> str:
    """One row per split and method: the aggregates, success by kind of edit included ("-" where the split has
    none of a kind)."""
    from ip2p_jax.data.shapes import EDIT_KINDS

    lines = [
        "| split | method | edit success (per instruction) | every instruction | "
        + " | ".join(EDIT_KINDS)
        + " | outside change (levels) | outside PSNR (dB) | mask IoU |",
        "|---|---|---|---|" + "---|" * len(EDIT_KINDS) + "---|---|---|",
    ]
    for split, methods in results.items():
        for method, s in methods.items():
            iou = f"{s['mask_iou']:.3f}" if "mask_iou" in s else "-"
            kinds = [s["success_by_kind"].get(kind) for kind in EDIT_KINDS]
            kinds = " | ".join("-" if k is None else f"{100 * k:.0f} %" for k in kinds)
            lines.append(
                f"| {split} ({s['examples']}) | {method} | {100 * s['edit_success']:.1f} % | "
                f"{100 * s['all_success']:.1f} % | {kinds} | {s['outside_change']:.2f} | {s['outside_psnr']:.2f} "
                f"| {iou} |"
            )
    return "\n".join(lines) + "\n"


def picture(pixels):
    """``(H, W, 3)`` levels in [0, 255] as a PIL picture (rounded, clipped)."""
    from PIL import Image

    return Image.fromarray(np.asarray(pixels, np.float64).round().clip(0, 255).astype(np.uint8))


def method_rows(examples: list[dict], edits: dict[str, np.ndarray]) -> list[list]:
    """input | ground truth | the true regions (all of the example's, together) over the input | each method's edit
    in ``edits``' order: one row of PIL tiles per example."""
    from ip2p_jax.visualisation import mask_overlay

    rows = []
    for index, example in enumerate(examples):
        image = picture(example["input_image"])
        regions = np.asarray(example["regions"]).max(axis=0)
        tiles = [image, picture(example["edited_image"]), mask_overlay(image, regions)]
        rows.append(tiles + [picture(edit[index]) for edit in edits.values()])
    return rows


def example_rows(examples: list[dict], edits: dict[str, np.ndarray], masks: list, max_masks: int) -> list[list]:
    """input | ground truth | FoI's masks over the input (``max_masks`` tiles, blank where an example has fewer) |
    IP2P | FoI: one row of PIL tiles per example."""
    from PIL import Image

    from ip2p_jax.visualisation import mask_overlay

    size = examples[0]["input_image"].shape[0]
    blank = Image.new("RGB", (size, size), "white")
    rows = []
    for index, example in enumerate(examples):
        image = picture(example["input_image"])
        tiles = [image, picture(example["edited_image"])]
        found = masks[index] if masks[index] is not None else []
        for k in range(max_masks):
            if k < len(found):
                tiles.append(mask_overlay(image, np.kron(found[k], np.ones((size // found.shape[1],) * 2))))
            else:
                tiles.append(blank)
        tiles += [picture(edits[name][index]) for name in ("ip2p", "foi") if name in edits]
        rows.append(tiles)
    return rows


def run_method(pipe, method: str, foi_config, split_batches: list[list[dict]], args, bar) -> tuple[list, tuple]:
    """One method over one split's batches: each example's figures (``judge``) and the first batch's edits and
    masks for the grids (at most ``GRID_EXAMPLES``)."""
    figures, shown = [], None
    for number, batch in enumerate(split_batches):
        edits, masks = edit_batch(pipe, method, foi_config, batch, args, args.config.sample.seed + number)
        figures += [judge(e, o, m) for e, o, m in zip(batch, edits, masks, strict=True)]
        if number == 0:
            shown = (edits[:GRID_EXAMPLES], masks[:GRID_EXAMPLES])
        bar.update(1)
    return figures, shown


def write_results(out: Path, settings: dict, results: dict, per_example: dict) -> str:
    """``results.md`` and ``results.json`` of the methods finished so far; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    record = {"settings": settings, "results": results, "per_example": per_example}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    compilation_cache.enable(args.compilation_cache)
    from tqdm import tqdm

    from ip2p_jax.data.input_pipeline import prepared_builder
    from ip2p_jax.evaluation.shapes_edit import JUDGE_VERSION
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.visualisation import grid
    from ip2p_jax.weights import CheckpointError

    try:
        pipe = InstructPix2PixPipeline.from_pretrained(args.model)
        data_dir = args.config.data.data_dir or None
        builder = prepared_builder(args.config.data.dataset, data_dir, None, prepare=True)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    foi_config = args.foi_config
    settings = dict(model=args.model, out=str(args.out), splits=args.splits, methods=args.methods)
    settings["judge_version"] = JUDGE_VERSION
    settings["config"], settings["foi"] = args.config.to_dict(), dataclasses.asdict(foi_config)
    data = {split: load_split(builder, split, args.config.data.limit) for split in args.splits}
    size = args.config.sample.batch
    batches = {
        split: [examples[i : i + size] for i in range(0, len(examples), size)] for split, examples in data.items()
    }
    total = sum(len(b) for b in batches.values()) * len(args.methods)
    results, per_example, rows, all_methods = {}, {}, [], []
    with tqdm(total=total, desc="evaluating") as bar:
        for split, split_batches in batches.items():
            results[split], per_example[split], shown = {}, {}, {}
            for method in args.methods:
                bar.set_postfix_str(f"{split}, {method}")
                try:  # a call's settings that do not fit the model, found before anything compiles
                    figures, shown[method] = run_method(pipe, method, foi_config, split_batches, args, bar)
                except ValueError as error:
                    print(f"error: {method}: {error}", file=sys.stderr)
                    return 1
                results[split][method], per_example[split][method] = aggregate(figures), figures
                # Written after every method: an interrupted evaluation keeps the methods it finished.
                table = write_results(args.out, settings, results, per_example)
            count = len(next(iter(shown.values()))[0])  # the first batch's examples, at most GRID_EXAMPLES
            masks = shown["foi"][1] if "foi" in shown else [None] * count
            edits = {name: value[0] for name, value in shown.items()}
            rows += example_rows(data[split][:count], edits, masks, max_masks=3)
            models = {name: edit for name, edit in edits.items() if name not in REFERENCES}
            all_methods += method_rows(data[split][:count], models)
    grid(rows, enlarge=ENLARGE).save(args.out / "examples.png")
    grid(all_methods, enlarge=ENLARGE).save(args.out / "methods.png")
    print(table, file=sys.stderr)
    print(f"wrote {args.out / 'results.md'}, results.json, examples.png and methods.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
