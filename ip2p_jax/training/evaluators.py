"""Held-out measurements of the EMA weights during training, chosen by name (``config.eval.name``) and run every
``sample.every`` steps: each builder takes the config and the task's ``Parts`` and returns
``EMA params on the host -> {name: value}``.

  * ``keyword_localisation`` (``ip2p``): the instruction keyword's cross-attention localisation on fresh ShapesEdit
    edits, conditioned on the input picture as FoI's mask step is;
  * ``word_localisation`` (``text_to_image``): shape words' and "background"'s localisation on held-out scenes;
  * ``retrieval`` (``clip``): top-1 retrieval both ways and the shape / colour picks on held-out scenes.

To add one: a builder here and its entry in ``EVALUATORS`` with the tasks it serves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Evaluate = Callable[[Any], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a task hands its evaluator.

    Attributes:
      batch: the task's ``data rows -> step arrays``.
      tokenizer: the task's tokenizer.
      stack: the diffusion tasks' ``ModelStack`` (UNet, VAE, text encoder and their params).
      alphas_cumprod: ``(T,)`` the diffusion tasks' noise schedule.
      clip: the CLIP task's model.
    """

    batch: Callable[[dict], dict]
    tokenizer: Any
    stack: Any = None
    alphas_cumprod: Any = None
    clip: Any = None


def keyword_localisation(config, parts: Parts) -> Evaluate | None:
    """The instruction keyword's localisation (``ip2p_jax/evaluation/localisation.py``) on ``eval.count`` fresh
    ShapesEdit training-distribution edits (drawn past the split's end, so never trained on; the test splits stay
    untouched). Only for ShapesEdit data (``None`` otherwise: other data sets have no keyword regions)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ip2p_jax.data import shapes_edit
    from ip2p_jax.evaluation.localisation import localisation, noised_maps
    from ip2p_jax.foi import SubInstruction, instruction_tokens
    from ip2p_jax.tokenizer import tokenize

    if config.data.name.split("/")[0] != "shapes_edit":
        return None
    stack, tokenizer = parts.stack, parts.tokenizer
    unet, vae, text, params = stack.unet, stack.vae, stack.text_encoder, stack.params
    builder_config = shapes_edit.ShapesEditConfig(name="eval", leak_fraction=0.0)
    examples = [shapes_edit.draw(builder_config, "train", 10**6 + i) for i in range(config.eval.count)]
    pixels = np.stack([e.input_image for e in examples]).astype(np.float32) / 127.5 - 1.0
    image_latents, _ = jax.jit(lambda x: vae.apply({"params": params["vae"]}, x, method="encode"))(pixels)
    latents = vae.config.scaling_factor * image_latents
    ids = jnp.asarray(tokenize(tokenizer, [e.instruction for e in examples]))
    context = text.apply({"params": params["text_encoder"]}, ids)
    weights = np.stack(
        [
            instruction_tokens(tokenizer, [SubInstruction(e.instruction, e.edits[0].keyword)]).keyword_weights
            for e in examples
        ]
    )
    regions = np.stack([e.regions[:1] for e in examples])
    valid = np.ones(weights.shape[:2], bool)
    unet_apply = lambda p, *a: unet.apply({"params": p}, *a)  # noqa: E731
    size = tuple(config.eval.map_size)
    maps_at = jax.jit(
        lambda p, noise, t, a: noised_maps(unet_apply, p, latents, noise, t, a, context, size, image_latents),
        static_argnums=2,  # the timestep: one compile per measured timestep
    )

    def evaluate(ema):
        measured = {}
        for t in config.eval.timesteps:
            noise = jax.random.normal(jax.random.key(t), latents.shape)
            maps = np.asarray(maps_at(ema, noise, int(t), float(parts.alphas_cumprod[t])))
            found = localisation(maps, weights, regions, valid, gamma=config.eval.gamma, tau=config.eval.tau)
            measured[f"keyword_iou_t{t}"] = float(np.nanmean(found["iou"]))
            measured[f"keyword_inside_over_mean_t{t}"] = float(np.nanmean(found["inside_over_mean"]))
        return measured

    return evaluate


def word_localisation(config, parts: Parts) -> Evaluate:
    """Word localisation on ``eval.count`` held-out captioned scenes: FoI's mask IoU and inside / mean of the shape
    words and of "background"."""
    import jax
    import numpy as np

    from ip2p_jax.data import captioned_scenes
    from ip2p_jax.evaluation.localisation import localisation, noised_maps

    stack = parts.stack
    unet, vae, text, params = stack.unet, stack.vae, stack.text_encoder, stack.params
    held_out = parts.batch(next(captioned_scenes.batches(config.seed, config.eval.count, stream="eval")))
    mean, _ = jax.jit(lambda x: vae.apply({"params": params["vae"]}, x, method="encode"))(held_out["image"])
    latents = vae.config.scaling_factor * mean
    context = jax.jit(lambda ids: text.apply({"params": params["text_encoder"]}, ids))(held_out["input_ids"])
    unet_apply = lambda p, *a: unet.apply({"params": p}, *a)  # noqa: E731
    map_size = tuple(config.eval.map_size)
    maps_at = jax.jit(
        lambda p, noise, t, a: noised_maps(unet_apply, p, latents, noise, t, a, context, map_size),
        static_argnums=2,  # the timestep: one compile per measured timestep
    )
    shape_words = np.arange(captioned_scenes.GROUNDED) < captioned_scenes.GROUNDED - 1  # the last is "background"

    def evaluate(ema):
        measured = {}
        for t in config.eval.timesteps:
            noise = jax.random.normal(jax.random.key(t), latents.shape)
            maps = np.asarray(maps_at(ema, noise, int(t), float(parts.alphas_cumprod[t])))
            found = localisation(
                maps,
                held_out["token_weights"],
                held_out["word_masks"],
                held_out["word_valid"],
                gamma=config.eval.gamma,
                tau=config.eval.tau,
            )
            for name, words in (("shape", shape_words), ("background", ~shape_words)):
                measured[f"{name}_iou_t{t}"] = float(np.nanmean(found["iou"][:, words]))
                measured[f"{name}_inside_over_mean_t{t}"] = float(np.nanmean(found["inside_over_mean"][:, words]))
        return measured

    return evaluate


def retrieval(config, parts: Parts) -> Evaluate:
    """Top-1 retrieval among ``eval.count`` held-out scenes, both ways; shape and colour picks among their objects'
    one-word variants (``training/clip.py:word_pick_questions``)."""
    import jax
    import numpy as np

    from ip2p_jax.data import captioned_scenes
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training.clip import pick_accuracy, retrieval_top1, word_pick_questions

    clip = parts.clip
    held_out = parts.batch(next(captioned_scenes.batches(config.seed, config.eval.count, stream="eval")))
    scenes = [captioned_scenes.draw_scene(config.seed, "eval", i) for i in range(config.eval.count)]
    picks = {kind: word_pick_questions(scenes, kind) for kind in ("shape", "colour")}
    encode = jax.jit(lambda p, x, ids: clip.apply({"params": p}, x, ids)[:2])
    encode_text = jax.jit(lambda p, ids: clip.apply({"params": p}, ids, method="get_text_features"))

    def evaluate(ema):
        image_embeds, text_embeds = encode(ema, held_out["pixel_values"], held_out["input_ids"])
        image_embeds = np.asarray(image_embeds)
        measured = retrieval_top1(image_embeds, np.asarray(text_embeds))
        for kind, (rows, captions, truth, count) in picks.items():
            variants = np.asarray(encode_text(ema, tokenize(parts.tokenizer, captions))).reshape(len(rows), count, -1)
            measured[f"{kind}_pick"] = pick_accuracy(image_embeds[rows], variants, truth)
        return measured

    return evaluate


# name -> (builder, the tasks whose Parts it reads)
EVALUATORS = {
    "keyword_localisation": (keyword_localisation, ("ip2p",)),
    "word_localisation": (word_localisation, ("text_to_image",)),
    "retrieval": (retrieval, ("clip",)),
}


def from_config(config, parts: Parts) -> Evaluate | None:
    """The evaluator ``config.eval.name`` names, built; ``None`` without an ``eval`` group or with ``eval.count``
    0. An unknown name, or one for another task, is a ``ValueError``."""
    if not config.get("eval") or not config.eval.get("count"):
        return None
    name = config.eval.get("name", "")
    if name not in EVALUATORS:
        raise ValueError(f"unknown evaluator eval.name={name!r} (one of {', '.join(EVALUATORS)})")
    builder, tasks = EVALUATORS[name]
    if config.task not in tasks:
        raise ValueError(f"evaluator {name!r} measures the {' / '.join(tasks)} task, not {config.task!r}")
    return builder(config, parts)
