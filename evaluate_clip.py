"""The CLIP trade-off curve of an editing model over a sweep of image guidance scales (IP2P's figure 8).

    python evaluate_clip.py --config configs/evaluate_clip.py --config.data=DATA --out RESULTS
    python evaluate_clip.py --config configs/evaluate_clip.py:tiny --config.data=/tmp/tiny-data --out /tmp/curve
    python evaluate_clip.py --config configs/evaluate_clip.py:shapes --out runs/clip-curve   # ShapesEdit, our CLIP

Edits the test split of a released-layout data set at each image guidance scale, scores every edit with CLIP
(image similarity to the input, directional similarity to the caption change) and writes
``RESULTS/clip_tradeoff.png`` (the curve), ``clip_tradeoff.md`` (the table) and ``clip_tradeoff.jsonl``.
``ip2p_jax/evaluation/clip_tradeoff.py`` has the details.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/evaluate_clip.py file", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "where the plot and the table go", required=True)
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")


def load_editor(config, workdir: Path):
    """The IP2P pipeline and the CLIP ``(module, params, tokenizer)`` of the config (``"tiny"``: random)."""
    import jax.numpy as jnp

    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.random_models import tiny_clip, tiny_text_to_image
    from ip2p_jax.weights import load_clip, load_tokenizer

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    if config.model == "tiny":
        pipeline = InstructPix2PixPipeline.from_stack(
            tiny_text_to_image(workdir / "vocab", config.seed, in_channels=8, dtype=dtype)
        )
    else:
        pipeline = InstructPix2PixPipeline.from_pretrained(config.model, dtype=dtype)
    if config.clip == "tiny":
        clip = tiny_clip(workdir / "clip-vocab", config.seed + 1)
    else:
        module, params = load_clip(config.clip)
        clip = (module, params, load_tokenizer(config.clip, subfolder=""))
    return pipeline, clip


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/evaluate_clip.py")
    if not config.data:
        raise app.UsageError(
            "no data: give --config.data=FOLDER (the released layout, e.g. from generate_data.py) or a ShapesEdit "
            "TFDS name (shapes_edit)"
        )
    import tempfile

    from ip2p_jax.evaluation.clip_tradeoff import load_edit_examples, load_shapes_edit_examples, sweep, write_results

    try:
        if config.data.split("/")[0] == "shapes_edit":  # a TFDS name: ShapesEdit's caption triples
            data_dir = config.get("data_dir") or None
            examples = load_shapes_edit_examples(config.data, config.split, config.num_samples, data_dir)
        else:
            examples = load_edit_examples(config.data, config.split, config.num_samples, config.resolution)
        with tempfile.TemporaryDirectory() as workdir:
            pipeline, (clip_module, clip_params, clip_tokenizer) = load_editor(config, Path(workdir))
        rows = sweep(
            pipeline,
            clip_module,
            clip_params,
            clip_tokenizer,
            examples,
            image_guidance_scales=tuple(config.image_guidance_scales),
            guidance_scale=config.guidance_scale,
            num_inference_steps=config.steps,
            seed=config.seed,
            batch_size=config.batch_size,
            scheduler=config.scheduler or None,
            progress=_PROGRESS.value,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    title = config.title or f"{config.model}: {len(examples)} edits, s_T = {config.guidance_scale:g}"
    paths = write_results(rows, _OUT.value, title)
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    app.run(main)
