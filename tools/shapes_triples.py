"""Caption triples of ShapesEdit's training scenes, for ``generate_data.py`` (issue 20; docs/datagen.md).

The paper's step 1 writes triples with a fine-tuned GPT-3; here the procedural ones stand in for it: example ``i``
of the ``train`` split gives ``{"input": its input caption, "edit": its instruction, "output": its edited
caption}``, plus ``split`` and ``index`` so that a generated pair can be judged against the scene it came from
(``tools/judge_generated_pairs.py``). ``generate_data.py`` ignores the extra keys.

    python tools/shapes_triples.py --count 1000 --out runs/datagen/triples.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def triple(config, split: str, index: int) -> dict:
    """Example ``index`` of ``split`` as a caption triple with where it came from."""
    from ip2p_jax.data import shapes_edit

    example = shapes_edit.draw(config, split, index)
    input_caption, edited_caption = shapes_edit.draw_captions(config, split, index, example)
    return {
        "input": input_caption,
        "edit": example.instruction,
        "output": edited_caption,
        "split": split,
        "index": index,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="the first COUNT training examples")
    parser.add_argument("--start", type=int, default=0, help="the first example's index")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    args = parser.parse_args(argv)
    if args.count < 1 or args.start < 0:
        parser.error("--count must be at least 1 and --start at least 0")

    from ip2p_jax.data import shapes_edit

    config = shapes_edit.ShapesEdit.BUILDER_CONFIGS[0]
    if args.start + args.count > config.num_train:
        parser.error(f"ShapesEdit's train split has {config.num_train} examples")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(triple(config, "train", i)) for i in range(args.start, args.start + args.count)]
    args.out.write_text("".join(line + "\n" for line in lines))
    print(f"{args.count} triples: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
