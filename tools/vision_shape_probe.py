"""Can a CLIP's vision tower tell ShapesEdit's shapes apart? Two probes of "which shapes does this scene hold".

* ``--linear`` reads a trained CLIP folder's pooled image features (frozen) and fits a least-squares linear classifier
  per shape on ``--scenes`` (2,000) scenes of the training stream; it reports the accuracy on 500 held-out scenes
  beside the base rate (always answering the commoner of present / absent): what the tower already encodes.
* ``--train`` trains the same tower architecture from scratch (the CLIP folder's config, with ``--patch-size`` if
  given), supervised on shape presence (a linear head, binary cross-entropy, AdamW): whether the architecture can learn
  shapes at all, and how fast, without a contrastive loss in between. A tower that cannot learn them when told will
  not learn them from captions. With ``--save DIR`` it starts from the folder's own weights instead and writes the
  CLIP with the trained vision tower (text tower untouched, the head dropped) as a CLIP folder: a vision tower
  pretrained on shapes for the CLIP task to start from (``--config.model=DIR``).

    python tools/vision_shape_probe.py --linear --model models/shapes-clip
    python tools/vision_shape_probe.py --train --model models/shapes-clip --patch-size 4 --steps 400
    python tools/vision_shape_probe.py --train --model runs/clip/initial-model --steps 1200 --save runs/clip-vision
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes-clip"


def scenes(stream: str, start: int, count: int):
    """``(pixels (N, 64, 64, 3) in [-1, 1], presence (N, 4) float32 per shape)`` of the stream's scenes."""
    import numpy as np

    from ip2p_jax.data import captioned_scenes, shapes

    drawn = [captioned_scenes.draw_scene(0, stream, i)[0] for i in range(start, start + count)]
    pixels = np.stack([scene.render() for scene in drawn]).astype(np.float32) / 127.5 - 1.0
    presence = [[any(obj.shape == shape for obj in scene.objects) for shape in shapes.SHAPES] for scene in drawn]
    return pixels, np.asarray(presence, np.float32)


def clip_pixels(pixels):
    """[-1, 1] pictures at the tower's size as CLIP's processor normalises them."""
    import numpy as np

    from ip2p_jax.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return ((pixels + 1) / 2 - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)


def linear_probe(model: str, count: int = 2000, held_out: int = 500) -> tuple[list[float], list[float]]:
    """Held-out accuracy of a linear read-out per shape from the frozen pooled features (``count`` training scenes,
    ``held_out`` scenes of the eval stream), and the share of held-out scenes holding each shape."""
    import jax
    import numpy as np

    from ip2p_jax.weights import load_clip

    clip, params = load_clip(model)
    pooled = jax.jit(lambda x: clip.apply({"params": params}, x, method=lambda m, x: m.vision_model(x)[1]))

    def features(stream, count):
        pixels, presence = scenes(stream, 0, count)
        chunks = [np.asarray(pooled(clip_pixels(pixels[i : i + 200]))) for i in range(0, count, 200)]
        return np.concatenate(chunks), presence

    train_x, train_y = features("train", count)
    test_x, test_y = features("eval", held_out)
    design = np.c_[train_x, np.ones(len(train_x))]
    weights = np.linalg.solve(design.T @ design + 1e-2 * np.eye(design.shape[1]), design.T @ (2 * train_y - 1))
    predicted = np.c_[test_x, np.ones(len(test_x))] @ weights > 0
    return list((predicted == (test_y > 0.5)).mean(axis=0)), list(test_y.mean(axis=0))


def supervised(
    model: str, patch_size: int | None, learning_rate: float, steps: int, batch: int, every: int, save: str = ""
):
    """Trains the tower on shape presence, from scratch (from the folder's weights with ``save``, which writes the
    CLIP with the trained tower there at the end); yields ``(step, loss, held-out accuracy per shape)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from ip2p_jax.models.clip import CLIPModel
    from ip2p_jax.weights import load_clip

    clip, weights = load_clip(model)
    config = clip.config
    if patch_size is not None:
        config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, patch_size=patch_size))
    tower = CLIPModel(config)
    size = config.vision.image_size
    init = tower.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, 8), jnp.int32))["params"]
    base = weights if save else init  # only its vision tower trains
    head = {"w": jnp.zeros((config.vision.hidden_size, 4)), "b": jnp.zeros(4)}
    params = {"vision": base["vision_model"], "head": head}

    def logits(params, x):
        clip_params = {**base, "vision_model": params["vision"]}
        pooled = tower.apply({"params": clip_params}, x, method=lambda m, x: m.vision_model(x)[1])
        return pooled @ params["head"]["w"] + params["head"]["b"]

    def loss_fn(params, x, y):
        return optax.sigmoid_binary_cross_entropy(logits(params, x), y).mean()

    tx = optax.adamw(learning_rate, weight_decay=0.1)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    test_x, test_y = scenes("eval", 0, 200)
    test_x = clip_pixels(test_x)
    predict = jax.jit(logits)
    for number in range(steps):
        x, y = scenes("train", number * batch, batch)
        params, state, loss = step(params, state, clip_pixels(x), y)
        if (number + 1) % every == 0 or number + 1 == steps:
            accuracy = (np.asarray(predict(params, test_x)) > 0) == (test_y > 0.5)
            yield number + 1, float(loss), list(accuracy.mean(axis=0))
    if save:
        from ip2p_jax.weights.export import export_clip

        export_clip(save, jax.device_get({**base, "vision_model": params["vision"]}), source=model)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a CLIP folder (its weights or its config)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--linear", action="store_true", help="a linear read-out of the folder's frozen tower")
    mode.add_argument("--train", action="store_true", help="the folder's tower architecture trained from scratch")
    parser.add_argument("--patch-size", type=int, default=None, help="--train: another patch size")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--every", type=int, default=100, help="--train: held-out accuracy every N steps")
    parser.add_argument("--scenes", type=int, default=2000, help="--linear: training scenes of the read-out")
    parser.add_argument("--save", default="", help="--train: start from the folder's weights, write the CLIP here")
    args = parser.parse_args(argv)
    if args.save and (not args.train or args.patch_size is not None):
        parser.error("--save goes with --train and the folder's own architecture (no --patch-size)")
    if min(args.steps, args.batch, args.every, args.scenes) < 1 or (
        args.patch_size is not None and args.patch_size < 1
    ):
        parser.error("--steps, --batch, --every, --scenes and --patch-size must be at least 1")
    from ip2p_jax.data.shapes import SHAPES

    if args.linear:
        accuracy, base = linear_probe(args.model, args.scenes)
        for shape, a, b in zip(SHAPES, accuracy, base, strict=True):
            print(f"{shape}: held-out accuracy {a:.1%} (base rate {max(b, 1 - b):.1%})")
        return
    start = time.time()
    for step, loss, accuracy in supervised(
        args.model, args.patch_size, args.learning_rate, args.steps, args.batch, args.every, args.save
    ):
        shown = ", ".join(f"{shape} {a:.1%}" for shape, a in zip(SHAPES, accuracy, strict=True))
        print(f"step {step}: loss {loss:.3f}; held-out accuracy {shown} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
