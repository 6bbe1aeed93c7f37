"""Word localisation of any model folder: do its words' cross-attention maps land on the things they name?

FoI's masks are read from the keyword's cross-attention, so this is the question behind them
(``ip2p_jax/evaluation/localisation.py`` says how it is measured). ``--context scene`` (a text-to-image folder's
default): the prompts are full captions of held-out scenes of the captioned-scene stream and the words are each object's
shape word and ``background``. ``--context instruction`` (an InstructPix2Pix folder's default): ``test_single``'s
instructions, the word is the instruction's keyword and its region the edit's; an 8-channel UNet also gets the input
picture as conditioning, a 4-channel one sees it only noised, which is what the InstructPix2Pix stage starts from.
``--context caption``: the same keyword read in the example's input caption. Each table row is a timestep; the masks are
FoI's own (``--gamma``, ``--tau``: the model folder's ``foi_config.json`` by default), and ``--sweep`` adds the IoU over
a grid of both.

    python tools/attention_localisation.py --model models/shapes-t2i
    python tools/attention_localisation.py --model models/shapes-t2i --context instruction --sweep
    python tools/attention_localisation.py --model models/shapes-ip2p --limit 200 --sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SWEEP_GAMMAS, SWEEP_TAUS = (0, 1, 2, 3), (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def caption_prompts(pipe, count: int, seed: int = 0):
    """Held-out captioned scenes: ``(images uint8, prompts, token weights (B, G, T), regions (B, G, H, W), valid
    (B, G), word kinds (G,))``."""
    from ip2p_jax.data import captioned_scenes
    from ip2p_jax.tokenizer import span_token_weights

    rows = captioned_scenes.batch([captioned_scenes.draw(seed, "eval", i) for i in range(count)])
    prompts = list(rows["caption"])
    weights = span_token_weights(pipe.tokenizer, prompts, rows["word_spans"])
    valid = (rows["word_spans"][..., 0] >= 0) & rows["word_masks"].any(axis=(2, 3))
    kinds = np.array(["shape word"] * (captioned_scenes.GROUNDED - 1) + ["background"])
    images = ((rows["image"] + 1) * 127.5).round().astype(np.uint8)
    return images, prompts, weights, rows["word_masks"], valid, kinds


def instruction_prompts(pipe, count: int, dataset: str, data_dir: str | None, context: str = "instruction"):
    """``test_single``'s first ``count`` examples, keyword weights as FoI computes them, the edit's region. With
    ``context="caption"`` the prompt is the example's input caption and the keyword is its word there (the same
    word, read in the context the text-to-image stage was trained on)."""
    import re

    import tensorflow_datasets as tfds

    import ip2p_jax.data.shapes_edit  # noqa: F401 (registers the builder)
    from ip2p_jax.foi import SubInstruction, instruction_tokens
    from ip2p_jax.tokenizer import span_token_weights

    examples = list(tfds.as_numpy(tfds.load(dataset, split=f"test_single[:{count}]", data_dir=data_dir)))
    keywords = [e["keywords"][0].decode() for e in examples]
    if context == "caption":
        prompts = [e["input_caption"].decode() for e in examples]
        spans = [re.search(rf"\b{keyword}\b", text).span() for text, keyword in zip(prompts, keywords, strict=True)]
        weights = span_token_weights(pipe.tokenizer, prompts, np.asarray(spans, np.int32)[:, None])  # (B, 1, T)
    else:
        prompts = [e["instruction"].decode() for e in examples]
        tokens = [
            instruction_tokens(pipe.tokenizer, [SubInstruction(text, keyword)])
            for text, keyword in zip(prompts, keywords, strict=True)
        ]
        weights = np.stack([t.keyword_weights for t in tokens])  # (B, 1, T)
    regions = np.stack([e["regions"][:1] for e in examples])
    kinds = np.array([e["kinds"][0].decode() for e in examples])
    images = np.stack([e["input_image"] for e in examples])
    return images, prompts, weights, regions, np.ones(weights.shape[:2], bool), kinds


def main(argv=None) -> dict:
    """Prints the tables; returns ``{t: {word kind: (IoU, inside / mean)}}`` at the chosen gamma and tau."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-ip2p")
    parser.add_argument("--limit", type=int, default=100, help="scenes (text-to-image) or examples (IP2P)")
    parser.add_argument("--timesteps", default="300,500,700,800")
    parser.add_argument("--gamma", type=int, default=None, help="default: the model's foi_config.json")
    parser.add_argument("--tau", type=float, default=None, help="default: the model's foi_config.json")
    parser.add_argument("--mask-downsample", type=int, default=None, help="default: the model's foi_config.json")
    parser.add_argument("--sweep", action="store_true", help=f"also IoU over gamma {SWEEP_GAMMAS} x tau {SWEEP_TAUS}")
    parser.add_argument(
        "--context",
        choices=("scene", "instruction", "caption"),
        default=None,
        help="held-out captioned scenes, or test_single's keywords read in the instruction (as FoI reads them) or "
        "in the input caption (default: scene for a text-to-image folder, instruction for an InstructPix2Pix one)",
    )
    parser.add_argument(
        "--dataset", default="shapes_edit", help="--context instruction or caption: TFDS name (and config)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="--context instruction or caption: TFDS data_dir (default TFDS's)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from ip2p_jax.evaluation.localisation import localisation, noised_maps
    from ip2p_jax.foi import FoIConfig, mask_size
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import SchedulerConfig
    from ip2p_jax.weights import load_noise_schedule

    pipe = InstructPix2PixPipeline.from_pretrained(args.model)
    chosen = {"mask_downsample": args.mask_downsample} if args.mask_downsample is not None else {}
    foi = FoIConfig.for_model(args.model, **chosen)
    gamma = foi.gamma if args.gamma is None else args.gamma
    tau = (foi.tau if isinstance(foi.tau, float | int) else sum(foi.tau) / 2) if args.tau is None else args.tau
    ip2p = pipe.unet.config.in_channels == 8
    context_kind = args.context or ("instruction" if ip2p else "scene")
    if context_kind == "scene" and ip2p:
        parser.error("--context scene needs a text-to-image folder (a 4-channel UNet)")
    edits = context_kind != "scene"  # words are per example (B,) rather than per word slot (B, G)
    if edits:
        images, prompts, weights, regions, valid, kinds = instruction_prompts(
            pipe, args.limit, args.dataset, args.data_dir, context_kind
        )
    else:
        images, prompts, weights, regions, valid, kinds = caption_prompts(pipe, args.limit)
    image_latents = pipe.encode_image(list(images))
    latents = pipe.vae.config.scaling_factor * image_latents
    context = pipe.encode_prompt(prompts)
    latent_size = tuple(image_latents.shape[1:3])
    size = mask_size(latent_size, foi.mask_downsample)
    alphas_cumprod = SchedulerConfig(**load_noise_schedule(args.model)).alphas_cumprod()
    apply = lambda p, *a: pipe.unet.apply({"params": p}, *a)  # noqa: E731
    maps_at = jax.jit(
        lambda noise, t, a: noised_maps(
            apply, pipe.params["unet"], latents, noise, t, a, context, size, image_latents if ip2p else None
        )
    )
    what = f"keywords in their {context_kind}s" if edits else "caption words"
    print(f"{args.model}: {len(prompts)} {what}, maps of {size[0]}x{size[1]}, FoI masks at gamma {gamma}, tau {tau}")
    groups = {kind: kinds == kind for kind in dict.fromkeys(kinds)}  # (G,) word slots, or (B,) examples for IP2P
    results, sweeps = {}, {}

    def by_kind(values: np.ndarray) -> dict[str, float]:
        """Per-word figures ``(B, G)`` averaged within each kind of word, and over every word (``"all"``)."""
        kinds_of = {kind: values[chosen] if edits else values[:, chosen] for kind, chosen in groups.items()}
        return {**{kind: float(np.nanmean(v)) for kind, v in kinds_of.items()}, "all": float(np.nanmean(values))}

    for t in [int(t) for t in args.timesteps.split(",")]:
        noise = jax.random.normal(jax.random.key(t), latents.shape)
        maps = np.asarray(maps_at(noise, jnp.int32(t), jnp.float32(alphas_cumprod[t])))
        found = localisation(maps, weights, regions, valid, gamma=gamma, tau=tau)
        iou, ratio = by_kind(found["iou"]), by_kind(found["inside_over_mean"])
        results[t] = {kind: (iou[kind], ratio[kind]) for kind in groups}
        row = "   ".join(f"{kind} IoU {a:.3f} (inside / mean {b:.2f})" for kind, (a, b) in results[t].items())
        print(f"t = {t}: {row}")
        if args.sweep:
            sweeps[t] = {
                f"gamma {g}, tau {x}": by_kind(localisation(maps, weights, regions, valid, gamma=g, tau=x)["iou"])
                for g in SWEEP_GAMMAS
                for x in SWEEP_TAUS
            }
    if args.sweep:
        for kind in [*groups, "all"]:
            print(f"FoI-mask IoU of {'every word' if kind == 'all' else kind}, gamma (rows) x tau (columns):")
            for t, sweep in sweeps.items():
                print(f"  t = {t}")
                print("           " + "".join(f"{x:>8}" for x in SWEEP_TAUS))
                for g in SWEEP_GAMMAS:
                    print(f"  gamma {g}  " + "".join(f"{sweep[f'gamma {g}, tau {x}'][kind]:8.3f}" for x in SWEEP_TAUS))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "sweeps": sweeps}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
