"""Generates InstructPix2Pix training pairs from caption triples (paper 3.1.2), in the released data set's layout.

    python generate_data.py --config configs/generate_data.py --config.triples=TRIPLES.jsonl --out DATA
    python generate_data.py --config configs/generate_data.py:tiny --out /tmp/tiny-data    # random models

Reads a JSONL file of {"input", "edit", "output"} triples, generates ``samples_per_triple`` Prompt-to-Prompt pairs
per triple over the local devices, keeps the best few that pass IP2P's CLIP filter and writes ``seeds.json``,
``NAME/prompt.json`` and ``NAME/{seed}_0.jpg`` / ``{seed}_1.jpg`` (``ip2p_jax/generation/`` has the
details); ``train.py --config.data.name=ip2p_original --config.data.manual_dir=DATA`` trains on the result. A
rerun into the same folder skips finished triples. Bad triples are reported and skipped; the exit status is then 1.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from ip2p_jax import compilation_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/generate_data.py file", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "the data set folder (created; a rerun resumes it)", required=True)
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", None, compilation_cache.HELP)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/generate_data.py:tiny")
    if not config.triples:
        raise app.UsageError("no triples file: give --config.triples=FILE.jsonl")

    compilation_cache.enable(_COMPILATION_CACHE.value)
    from ip2p_jax.generation.pairs import generate_dataset
    from ip2p_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    try:
        summary = generate_dataset(config, _OUT.value, progress=_PROGRESS.value)
    except (FileNotFoundError, ValueError) as error:  # a missing triples file, a model that does not fit, ...
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary.finished} triples generated ({summary.kept} pairs kept), {summary.skipped_finished} already "
        f"finished, {len(summary.bad)} skipped as bad; seeds.json lists {summary.listed} triples: {_OUT.value}"
    )
    return 1 if summary.bad else 0


if __name__ == "__main__":
    app.run(main)
