"""Top-1 retrieval of a CLIP folder among held-out captioned ShapesEdit scenes, both ways.

The scenes come from the ``eval`` stream of ``ip2p_jax/data/captioned_scenes.py`` (never trained on), in groups of
``--count``: within each group, each caption's best image must be its own (caption -> image) and each image's best
caption its own (image -> caption). Prints each group's figures and their mean.

    python tools/clip_retrieval.py --model models/shapes-clip --count 100 --groups 5
"""

from __future__ import annotations

import argparse


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-clip")
    parser.add_argument("--count", type=int, default=100, help="scenes per group")
    parser.add_argument("--groups", type=int, default=5)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from ip2p_jax.data import captioned_scenes
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training.clip import retrieval_top1
    from ip2p_jax.weights import load_clip, load_clip_preprocessor, load_tokenizer

    clip, params = load_clip(args.model)
    processor = load_clip_preprocessor(args.model)
    tokenizer = load_tokenizer(args.model, subfolder="")
    encode = jax.jit(lambda x, ids: clip.apply({"params": params}, x, ids)[:2])
    figures = []
    for group in range(args.groups):
        scenes = [captioned_scenes.draw(0, "eval", group * args.count + i) for i in range(args.count)]
        images = [scene.image for scene in scenes]
        pixels = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
        image_embeds, text_embeds = encode(pixels, tokenize(tokenizer, [scene.caption for scene in scenes]))
        figures.append(retrieval_top1(np.asarray(image_embeds), np.asarray(text_embeds)))
        print(f"group {group}: " + ", ".join(f"{k} {v:.1%}" for k, v in figures[-1].items()))
    mean = {k: float(np.mean([f[k] for f in figures])) for k in figures[0]}
    print(f"mean of {args.groups} groups of {args.count}: " + ", ".join(f"{k} {v:.1%}" for k, v in mean.items()))
    return mean


if __name__ == "__main__":
    main()
