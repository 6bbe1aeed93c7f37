"""The CLIP trade-off curve of an editing model: InstructPix2Pix's figure 8 (paper 4.1).

Each edit of a held-out set (input image ``x0``, input caption ``c0``, edited caption ``c1``, instruction) is made at
a sweep of image guidance scales ``s_I`` with the text guidance fixed (the reference's
``metrics/compute_metrics.py``: ``s_T = 7.5``, ``s_I`` from 1.0 to 2.2 by 0.2, edits from the test split of its
generated data set), and scored with CLIP (``metrics``, on ``clip_preprocess.ip2p_pixel_values``):

- **CLIP image similarity** ``cos(E(x0), E(x1))``: how much of the input the edit kept (the figure's y axis);
- **directional similarity** ``cos(E(x1) - E(x0), E(c1) - E(c0))``: whether the image changed as the caption did
  (the x axis); raising ``s_I`` trades the second for the first;
- each image against its caption, for the table.

One point per ``s_I``: the means over the edits. The edits are read from a folder in the released layout
(``seeds.json``; ``prompt.json`` holds the captions, which the TFDS builder does not keep), each prompt's first
seed's ``_0.jpg`` resized to the resolution (Lanczos, as the reference's ``EditDatasetEval``). Images are scored in
[0, 1], as the reference's ``ClipSimilarity`` expects; its ``compute_metrics.py`` hands it the [-1, 1] decoder
output instead, so its absolute figures are not comparable with these.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from ip2p_jax.clip_preprocess import ip2p_pixel_values
from ip2p_jax.evaluation.clip_metrics import edit_scores, image_embeddings, text_embeddings
from ip2p_jax.tokenizer import tokenize

# The reference's sweep (compute_metrics.py) and its fixed text guidance.
IMAGE_GUIDANCE_SCALES = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)
METRICS = ("clip_sim_image", "clip_sim_dir", "clip_sim_1", "clip_sim_0")
COLUMNS = {
    "clip_sim_image": "CLIP image similarity",
    "clip_sim_dir": "directional similarity",
    "clip_sim_1": "CLIP(x1, c1)",
    "clip_sim_0": "CLIP(x0, c0)",
}


@dataclasses.dataclass(frozen=True)
class EditExample:
    """One held-out edit.

    Attributes:
      name, seed: where it came from (``NAME/{seed}_0.jpg``).
      image: ``(H, W, 3)`` uint8 input image.
      input_caption, output_caption, instruction: ``prompt.json``'s ``input``, ``output``, ``edit``.
    """

    name: str
    seed: str
    image: np.ndarray
    input_caption: str
    output_caption: str
    instruction: str


def load_edit_examples(
    folder: str | os.PathLike, split: str = "test", limit: int | None = None, resolution: int | None = None
) -> list[EditExample]:
    """The edits of a split of a released-layout folder (the TFDS builder's contiguous slices of ``seeds.json``),
    at most ``limit``, each image resized to ``resolution`` square (``None``: as stored)."""
    from ip2p_jax.data.edit_datasets import SPLIT_FRACTIONS  # the builder's splits (imports TFDS: only here)

    folder = Path(folder)
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"split must be one of {sorted(SPLIT_FRACTIONS)}, got {split!r}")
    seeds_file = folder / "seeds.json"
    if not seeds_file.is_file():
        raise FileNotFoundError(f"{folder} has no seeds.json: not the InstructPix2Pix data set layout")
    prompts = json.loads(seeds_file.read_text())
    start, stop = SPLIT_FRACTIONS[split]
    chosen = prompts[math.floor(start * len(prompts)) : math.floor(stop * len(prompts))][:limit]
    examples = []
    for name, seeds in chosen:
        prompt = json.loads((folder / name / "prompt.json").read_text())
        missing = [key for key in ("input", "output", "edit") if key not in prompt]
        if missing:
            raise ValueError(f"{folder / name / 'prompt.json'} lacks {missing}: the CLIP metrics need both captions")
        with Image.open(folder / name / f"{seeds[0]}_0.jpg") as image:
            image = image.convert("RGB")
            if resolution is not None:
                image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
            pixels = np.asarray(image)
        examples.append(EditExample(name, str(seeds[0]), pixels, prompt["input"], prompt["output"], prompt["edit"]))
    if not examples:
        raise ValueError(f"the {split} split of {folder} holds no edits ({len(prompts)} prompts in all)")
    return examples


def load_shapes_edit_examples(
    name: str = "shapes_edit", split: str = "test_single", limit: int | None = None, data_dir: str | None = None
) -> list[EditExample]:
    """The edits of a ShapesEdit split (TFDS ``name``, e.g. ``"shapes_edit"`` or ``"shapes_edit/small"``, built here
    if needed) with their caption triples (builder 1.1.0), at most ``limit``, pictures as stored (64 x 64)."""
    from ip2p_jax.data.input_pipeline import prepared_builder

    builder = prepared_builder(name, data_dir, None, prepare=True)
    if split not in builder.info.splits:
        raise ValueError(f"split must be one of {sorted(builder.info.splits)}, got {split!r}")
    examples = []
    for index, record in enumerate(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()):
        if limit is not None and index >= limit:
            break
        text = {key: record[key].decode() for key in ("input_caption", "edited_caption", "instruction")}
        examples.append(
            EditExample(
                split,
                str(index),
                record["input_image"],
                text["input_caption"],
                text["edited_caption"],
                text["instruction"],
            )
        )
    return examples


def clip_scores(clip_module, clip_params, clip_tokenizer, inputs_01, edited_01, input_captions, output_captions):
    """The four CLIP scores of edits: ``(B, H, W, 3)`` float images in [0, 1] and captions -> ``{name: (B,)}``."""
    size = clip_module.config.vision.image_size
    image_0 = image_embeddings(clip_module, clip_params, ip2p_pixel_values(jnp.asarray(inputs_01), size))
    image_1 = image_embeddings(clip_module, clip_params, ip2p_pixel_values(jnp.asarray(edited_01), size))
    text_0 = text_embeddings(clip_module, clip_params, tokenize(clip_tokenizer, list(input_captions)))
    text_1 = text_embeddings(clip_module, clip_params, tokenize(clip_tokenizer, list(output_captions)))
    return {name: np.asarray(value) for name, value in edit_scores(image_0, image_1, text_0, text_1).items()}


def sweep(
    pipeline,
    clip_module,
    clip_params,
    clip_tokenizer,
    examples: Sequence[EditExample],
    image_guidance_scales: Sequence[float] = IMAGE_GUIDANCE_SCALES,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 100,
    seed: int = 0,
    batch_size: int = 8,
    scheduler=None,
    progress: bool = True,
) -> list[dict]:
    """Edits every example at every ``s_I`` and averages the CLIP scores: one row per ``s_I`` with
    ``image_guidance_scale``, ``guidance_scale``, the mean of each of ``METRICS`` and ``num_samples``.

    Each batch of ``batch_size`` examples is edited with the same seed at every scale, so a curve compares the
    same noise throughout (as the reference, which reseeds for each scale).
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no examples to edit")
    rows = []
    bar = tqdm(total=len(image_guidance_scales) * len(examples), desc="edits", unit="edit", disable=not progress)
    for scale in image_guidance_scales:
        totals = dict.fromkeys(METRICS, 0.0)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            edited = pipeline(
                [e.image for e in chunk],
                [e.instruction for e in chunk],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                image_guidance_scale=scale,
                scheduler=scheduler,
                seed=seed + start,
                output_type="np",
                progress=False,
            ).images
            scores = clip_scores(
                clip_module,
                clip_params,
                clip_tokenizer,
                np.stack([e.image for e in chunk]).astype(np.float32) / 255.0,
                np.asarray(edited, np.float32),
                [e.input_caption for e in chunk],
                [e.output_caption for e in chunk],
            )
            for name in METRICS:
                totals[name] += float(np.sum(scores[name]))
            bar.update(len(chunk))
        rows.append(
            dict(
                image_guidance_scale=float(scale),
                guidance_scale=float(guidance_scale),
                **{name: totals[name] / len(examples) for name in METRICS},
                num_samples=len(examples),
            )
        )
    bar.close()
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The sweep as a markdown table, one row per ``s_I``."""
    header = ["s_I", "s_T"] + [COLUMNS[name] for name in METRICS] + ["edits"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['image_guidance_scale']:.2f}", f"{row['guidance_scale']:.2f}"]
        cells += [f"{row[name]:.4f}" for name in METRICS] + [str(row["num_samples"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Figure 8's axes: directional similarity (x) against CLIP image similarity (y), each point labelled with
    its ``s_I``; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    x = [row["clip_sim_dir"] for row in rows]
    y = [row["clip_sim_image"] for row in rows]
    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=150)
    axes.plot(x, y, marker="o", linewidth=2, markersize=5, label=f"s_T = {rows[0]['guidance_scale']:g}")
    for row, xi, yi in zip(rows, x, y, strict=True):
        axes.annotate(f"s_I={row['image_guidance_scale']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel("CLIP text-image direction similarity")
    axes.set_ylabel("CLIP image similarity")
    axes.margins(0.15)  # room for the labels
    axes.grid(True, alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_results(rows: Sequence[dict], out: str | os.PathLike, title: str = "") -> dict[str, Path]:
    """Writes ``clip_tradeoff.png``, ``clip_tradeoff.md`` and ``clip_tradeoff.jsonl`` (one row per ``s_I``) to
    ``out``; returns their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"clip_tradeoff.{kind}" for kind in ("png", "md", "jsonl")}
    plot(rows, paths["png"], title)
    heading = f"# {title}\n\n" if title else ""
    paths["md"].write_text(heading + markdown_table(rows))
    paths["jsonl"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths
