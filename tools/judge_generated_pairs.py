"""Judges the pairs ``generate_data.py`` made from ShapesEdit's caption triples (issue 20; docs/datagen.md).

Two commands:

* ``thresholds``: the lineage CLIP's four filter scores on real ShapesEdit training pairs (ground-truth pictures
  with their captions, examples the triples do not use), with a chosen low percentile of each: IP2P's thresholds
  were set for OpenAI's ViT-L/14, so for the small CLIP each threshold is re-derived as the score that this share
  of real pairs falls below.
* ``judge``: every candidate of a data set generated with ``save_candidates`` (its triples written by
  ``tools/shapes_triples.py``) judged by ``shapes_edit.generated_pair_judgement``: the share of correct pairs and the
  change outside, over all candidates and over those the CLIP filter kept, by edit kind and by Prompt-to-Prompt's
  ``p``; optionally a picture of kept and rejected pairs.

    python tools/judge_generated_pairs.py thresholds --clip models/shapes-clip --count 1000 --percentile 10
    python tools/judge_generated_pairs.py judge --data runs/datagen/pairs --triples runs/datagen/triples.jsonl \\
        --grid docs/images/datagen_pairs.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from ip2p_jax.evaluation.clip_metrics import SCORE_NAMES

P_BINS = (0.1, 0.3, 0.5, 0.7, 0.9)


def real_pair_scores(clip_folder: str, start: int, count: int, batch: int = 100) -> dict[str, np.ndarray]:
    """The four filter scores ``{name: (count,)}`` of ShapesEdit training examples ``[start, start + count)``."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax.clip_preprocess import ip2p_pixel_values
    from ip2p_jax.data import shapes_edit
    from ip2p_jax.evaluation.clip_metrics import edit_similarities
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.weights import load_clip, load_tokenizer

    module, params = load_clip(clip_folder)
    tokenizer = load_tokenizer(clip_folder, subfolder="")
    size = module.config.vision.image_size
    pixels = jax.jit(lambda images: ip2p_pixel_values(images, size))
    config = shapes_edit.ShapesEdit.BUILDER_CONFIGS[0]
    scores: dict[str, list] = {name: [] for name in SCORE_NAMES}
    for first in range(start, start + count, batch):
        indices = range(first, min(first + batch, start + count))
        examples = [shapes_edit.draw(config, "train", i) for i in indices]
        captions = [shapes_edit.draw_captions(config, "train", i, e) for i, e in zip(indices, examples, strict=True)]
        as_float = lambda images: jnp.asarray(np.stack(images), jnp.float32) / 255  # noqa: E731
        result = edit_similarities(
            module,
            params,
            pixels(as_float([e.input_image for e in examples])),
            pixels(as_float([e.edited_image for e in examples])),
            tokenize(tokenizer, [c[0] for c in captions]),
            tokenize(tokenizer, [c[1] for c in captions]),
        )
        for name in SCORE_NAMES:
            scores[name].extend(np.asarray(result[name]).tolist())
    return {name: np.asarray(values) for name, values in scores.items()}


def judge_folder(data: Path, triples: dict[int, dict]) -> list[dict]:
    """One record per candidate of every finished triple: its scores, ``kept``, the edit kind and the judgement."""
    from PIL import Image

    from ip2p_jax.data import shapes_edit
    from ip2p_jax.evaluation.shapes_edit import generated_pair_judgement
    from ip2p_jax.generation.layout import FINISHED

    config = shapes_edit.ShapesEdit.BUILDER_CONFIGS[0]
    records = []
    for folder in sorted(p for p in data.iterdir() if (p / FINISHED).is_file()):
        triple = triples[int(folder.name)]
        example = shapes_edit.draw(config, triple["split"], triple["index"])
        if example.instruction != triple["edit"]:
            raise ValueError(f"{folder}: the triple's instruction is not its ShapesEdit example's")
        edit = example.edits[0]
        for line in (folder / "scores.jsonl").read_text().splitlines():
            candidate = json.loads(line)
            images = [np.asarray(Image.open(folder / "candidates" / f"{candidate['seed']}_{r}.png")) for r in (0, 1)]
            judgement = generated_pair_judgement(images[0], images[1], example.scene, edit)
            records.append({**candidate, "triple": int(folder.name), "kind": edit.kind, **judgement})
    return records


def summary(records: list[dict]) -> dict:
    """Share correct and the correct pairs' median change outside, among the judged ``records``."""
    judged = [r for r in records if r["judged"]]
    correct = [r for r in judged if r["correct"]]
    return {
        "candidates": len(records),
        "judged": len(judged),
        "correct_share": len(correct) / len(judged) if judged else float("nan"),
        "present_share": float(np.mean([r["present"] for r in judged])) if judged else float("nan"),
        "outside_change_correct": float(np.nanmedian([r["outside_change"] for r in correct])) if correct else None,
    }


def candidate_of(record: dict):
    """A saved candidate's record as a ``candidates.Candidate`` (scores, no pictures)."""
    from ip2p_jax.generation.candidates import Candidate

    scores = {name: record[name] for name in SCORE_NAMES}
    return Candidate(record["seed"], record["p2p_threshold"], record["cfg_scale"], scores)


def refilter(records: list[dict], thresholds) -> list[dict]:
    """``records`` with ``kept`` recomputed per triple by IP2P's filter with ``thresholds`` (a
    ``candidates.FilterThresholds``): the filter is a function of the saved scores alone."""
    from ip2p_jax.generation.candidates import select

    by_triple: dict[int, list[dict]] = {}
    for record in records:
        by_triple.setdefault(record["triple"], []).append(record)
    out = []
    for triple_records in by_triple.values():
        candidates = [candidate_of(r) for r in triple_records]
        kept = {c.seed for c in select(candidates, thresholds)}
        out.extend({**r, "kept": r["seed"] in kept} for r in triple_records)
    return out


def calibrate(records: list[dict], max_kept: int, min_yield: float = 0.5):
    """The thresholds, among each score's quartiles of ``records`` (or none), whose filter keeps the largest share
    of correct pairs among the judged ones it keeps, while at least ``min_yield`` of the triples keep a pair; one
    threshold for both image-caption scores, as IP2P has. Returns ``(FilterThresholds, that share, yield)``."""
    from ip2p_jax.generation.candidates import FilterThresholds

    def levels(name):
        return [-1.0, *np.percentile([r[name] for r in records], [25, 50, 75]).tolist()]

    text = sorted(set(levels("clip_sim_0")) | set(levels("clip_sim_1")))
    triples = {r["triple"] for r in records}
    best = None
    for text_image in text:
        for directional in levels("clip_sim_dir"):
            for image in levels("clip_sim_image"):
                thresholds = FilterThresholds(text_image, directional, image, max_kept)
                kept = [r for r in refilter(records, thresholds) if r["kept"]]
                judged = [r for r in kept if r["judged"]]
                share_of_triples = len({r["triple"] for r in kept}) / len(triples)
                if not judged or share_of_triples < min_yield:
                    continue
                share = float(np.mean([r["correct"] for r in judged]))
                if best is None or share > best[1]:
                    best = (thresholds, share, share_of_triples)
    return best


def report(records: list[dict]) -> dict:
    """``summary`` of all candidates and of the kept ones, by kind and by ``p`` bin."""
    kept = [r for r in records if r["kept"]]
    result = {"all": summary(records), "kept": summary(kept), "kinds": {}, "p": {}}
    for kind in sorted({r["kind"] for r in records}):
        result["kinds"][kind] = {
            "all": summary([r for r in records if r["kind"] == kind]),
            "kept": summary([r for r in kept if r["kind"] == kind]),
        }
    for low, high in zip(P_BINS[:-1], P_BINS[1:], strict=True):
        in_bin = [r for r in records if low <= r["p2p_threshold"] < high]
        result["p"][f"{low}-{high}"] = {"all": summary(in_bin), "kept": summary([r for r in in_bin if r["kept"]])}
    return result


def draw_grid(data: Path, records: list[dict], path: Path, rows: int = 8) -> None:
    """``rows`` triples, each: its kept pairs, then its first rejected ones (green / red frames), 6 pairs a row."""
    from PIL import Image, ImageDraw

    cell, pad, per_row = 64, 4, 6
    by_triple: dict[int, list[dict]] = {}
    for record in records:
        if record["judged"]:
            by_triple.setdefault(record["triple"], []).append(record)
    chosen = [t for t, rs in sorted(by_triple.items()) if any(r["kept"] for r in rs)][:rows]
    canvas = Image.new("RGB", (per_row * (2 * cell + 3 * pad), len(chosen) * (cell + 2 * pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, triple in enumerate(chosen):
        ordered = sorted(by_triple[triple], key=lambda r: not r["kept"])[:per_row]
        for column, record in enumerate(ordered):
            x, y = column * (2 * cell + 3 * pad), row * (cell + 2 * pad)
            colour = "green" if record["kept"] else "red"
            draw.rectangle([x, y, x + 2 * cell + 2 * pad - 1, y + cell + 2 * pad - 1], outline=colour, width=2)
            for role in (0, 1):
                picture = Image.open(data / f"{triple:07d}" / "candidates" / f"{record['seed']}_{role}.png")
                canvas.paste(picture, (x + pad + role * cell, y + pad))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def export(data: Path, records: list[dict], triples: dict[int, dict], out: Path) -> int:
    """Writes the kept pairs of ``records`` in the released layout (``ip2p_jax.generation.pairs``' module docstring) to
    ``out``, from the saved candidate pictures; returns the triples listed in ``seeds.json``."""
    from PIL import Image

    from ip2p_jax.generation.layout import write_seeds_json, write_triple
    from ip2p_jax.generation.triples import Triple

    by_triple: dict[int, list[dict]] = {}
    for record in records:
        by_triple.setdefault(record["triple"], []).append(record)
    for index, triple_records in sorted(by_triple.items()):
        spec = triples[index]
        triple = Triple(index, spec["input"], spec["edit"], spec["output"])
        candidates, kept = [], []
        for r in triple_records:
            candidate = candidate_of(r)
            if r["kept"]:
                folder = data / triple.name / "candidates"
                candidate.images = np.stack(
                    [np.asarray(Image.open(folder / f"{r['seed']}_{role}.png")) for role in (0, 1)]
                )
                kept.append(candidate)
            candidates.append(candidate)
        kept.sort(key=lambda c: (c.scores["clip_sim_dir"], c.seed), reverse=True)
        write_triple(out, triple, candidates, kept, quality=100)
    return write_seeds_json(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    thresholds = commands.add_parser("thresholds", help="re-derive the CLIP filter's thresholds on real pairs")
    thresholds.add_argument("--clip", default="models/shapes-clip")
    thresholds.add_argument("--start", type=int, default=10_000, help="the first training example used")
    thresholds.add_argument("--count", type=int, default=1000)
    thresholds.add_argument("--percentile", type=float, default=10.0)
    judge = commands.add_parser("judge", help="judge a generated data set's candidates")
    judge.add_argument("--data", type=Path, required=True, help="generate_data.py's --out (save_candidates on)")
    judge.add_argument("--triples", type=Path, required=True, help="the triples file the data set was made from")
    judge.add_argument(
        "--calibrate",
        type=int,
        default=0,
        help="choose the filter's thresholds on the triples of the first N lines (calibrate) and report the rest",
    )
    judge.add_argument("--export", type=Path, default=None, help="write the calibrated filter's pairs (every triple)")
    judge.add_argument("--grid", type=Path, default=None, help="a PNG of kept (green) and rejected (red) pairs")
    judge.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.command == "thresholds":
        scores = real_pair_scores(args.clip, args.start, args.count)
        result = {name: float(np.percentile(values, args.percentile)) for name, values in scores.items()}
        for name, values in scores.items():
            quartiles = np.percentile(values, [25, 50, 75]).round(3).tolist()
            print(f"{name}: percentile {args.percentile:g} = {result[name]:.3f} (quartiles {quartiles})")
        return result

    from ip2p_jax.generation.layout import SETTINGS_FILE

    if not (args.data / SETTINGS_FILE).is_file():
        parser.error(f"{args.data} is not a generate_data.py folder (no {SETTINGS_FILE})")
    if args.export and not args.calibrate:
        parser.error("--export writes the calibrated filter's pairs: give --calibrate N")
    lines = args.triples.read_text().splitlines()
    triples = {i: json.loads(line) for i, line in enumerate(lines) if line.strip()}
    records = judge_folder(args.data, triples)
    if not records:
        parser.error(f"{args.data} has no finished triple")
    groups = {"generated (kept: the best 4 by directional similarity)": records}
    result = {}
    if args.calibrate:
        settings = json.loads((args.data / SETTINGS_FILE).read_text())
        calibration = [r for r in records if r["triple"] < args.calibrate]
        held_out = [r for r in records if r["triple"] >= args.calibrate]
        if not calibration or not held_out:
            parser.error(f"--calibrate {args.calibrate} leaves no calibration or no held-out triple")
        best = calibrate(calibration, settings["max_kept"])
        if best is None:
            parser.error(f"no thresholds keep a judged pair for half of the first {args.calibrate} triples")
        chosen, share, triples_kept = best
        print(
            f"thresholds chosen on {len({r['triple'] for r in calibration})} triples: image-caption "
            f"{chosen.text_image:.3f}, directional {chosen.directional:.3f}, image {chosen.image:.3f} (correct "
            f"{share:.1%} of the judged pairs kept there, {triples_kept:.0%} of its triples keep a pair)"
        )
        result["thresholds"] = dataclasses.asdict(chosen)
        groups = {
            "held-out, kept: the best 4 by directional similarity": held_out,
            "held-out, kept: the calibrated filter": refilter(held_out, chosen),
        }
        if args.export:
            export(args.data, refilter(records, chosen), triples, args.export)
    for title, group in groups.items():
        figures = report(group)
        result[title] = figures
        print(title)
        for name in ("all", "kept"):
            f = figures[name]
            print(
                f"  {name}: {f['candidates']} pairs ({len({r['triple'] for r in group if name == 'all' or r['kept']})} "
                f"triples), {f['judged']} judged, correct {f['correct_share']:.1%} (the input shows the object: "
                f"{f['present_share']:.1%}), correct pairs' median change outside {f['outside_change_correct']}"
            )
        for kind, by_kind in figures["kinds"].items():
            print(f"  {kind}: all {by_kind['all']['correct_share']:.1%}, kept {by_kind['kept']['correct_share']:.1%}")
        for bin_name, by_p in figures["p"].items():
            print(f"  p {bin_name}: all {by_p['all']['correct_share']:.1%}, kept {by_p['kept']['correct_share']:.1%}")
    if args.grid:
        draw_grid(args.data, list(groups.values())[-1], args.grid)
    if args.json:
        args.json.write_text(json.dumps({"report": result, "records": records}, indent=1))
    return result


if __name__ == "__main__":
    main()
