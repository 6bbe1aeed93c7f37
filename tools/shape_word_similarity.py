"""How far apart a text encoder keeps the four shape words: cosine similarity of its output at the shape word.

For each context ("make the {} blue", ...), the text encoder's last hidden state (what the UNet's cross-attention
reads) at the shape word's token is taken for circle, square, triangle and diamond; the table gives the mean over
the six pairs and the largest. 1 means the encoder says the same thing whatever the shape; an edit that names an
object by its shape needs them far apart (issue: the lineage's goal is a mean of at most 0.3 in "make the {} blue").

    python tools/shape_word_similarity.py --model models/shapes-ip2p   # a pipeline folder (its text_encoder/)
    python tools/shape_word_similarity.py --model models/shapes-clip   # a CLIP folder (its text tower)
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

CONTEXTS = ("make the {} blue", "a red {} on a white background", "remove the {}", "turn the {} into a circle")


def shape_word_similarity(encode, tokenizer, context: str) -> tuple[float, float]:
    """``(mean, max)`` cosine over the pairs of shapes of ``encode``'s ``(B, T, D)`` output at the shape word.

    Args:
      encode: token ids ``(B, 77)`` int32 -> hidden states ``(B, 77, D)``.
      context: a text with one ``{}`` where the shape word goes.
    """
    import numpy as np

    from ip2p_jax.data.shapes import SHAPES
    from ip2p_jax.tokenizer import tokenize

    if not re.fullmatch(r"(.*\s)?\{\}(\s.*)?", context):
        raise ValueError(f"the shape in {context!r} must be a word of its own")
    prefix = tokenizer(context.split("{}")[0].strip()).input_ids[:-1]  # start token and the words before
    position = len(prefix)
    ids = tokenize(tokenizer, [context.format(shape) for shape in SHAPES])
    for shape, row in zip(SHAPES, ids, strict=True):
        word = tokenizer(shape, add_special_tokens=False).input_ids
        if len(word) != 1 or row[position] != word[0]:
            raise ValueError(f"{shape!r} is not one token at position {position} of {context.format(shape)!r}")
    hidden = np.asarray(encode(ids))[:, position]
    hidden = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
    cosines = [float(hidden[a] @ hidden[b]) for a, b in itertools.combinations(range(len(SHAPES)), 2)]
    return float(np.mean(cosines)), float(np.max(cosines))


def load_encoder(model: Path):
    """``(encode, tokenizer)`` of a pipeline folder's text encoder or a CLIP folder's text tower."""
    import jax

    from ip2p_jax.weights import load_clip, load_text_encoder, load_tokenizer

    if (model / "text_encoder").is_dir():
        text, params = load_text_encoder(model)
        return jax.jit(lambda ids: text.apply({"params": params}, ids)), load_tokenizer(model)
    clip, params = load_clip(model)
    encode = jax.jit(lambda ids: clip.apply({"params": params}, ids, method=lambda m, ids: m.text_model(ids)))
    return encode, load_tokenizer(model, subfolder="")


def main(argv=None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/shapes-ip2p"))
    parser.add_argument("--context", action="append", help="a text with {} for the shape (repeatable)")
    args = parser.parse_args(argv)
    contexts = args.context or list(CONTEXTS)
    for context in contexts:
        if context.count("{}") != 1:
            parser.error(f"--context needs exactly one {{}}, got {context!r}")
    if not args.model.is_dir():
        parser.error(f"--model {args.model} is not a folder")

    encode, tokenizer = load_encoder(args.model)
    table = {}
    print(f"{args.model}: cosine of the text encoder's output at the shape word, over the 6 pairs of shapes")
    print("| context | mean | max |\n| --- | --- | --- |")
    for context in contexts:
        table[context] = shape_word_similarity(encode, tokenizer, context)
        print(f'| "{context}" | {table[context][0]:.2f} | {table[context][1]:.2f} |')
    return table


if __name__ == "__main__":
    main()
