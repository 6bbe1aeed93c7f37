"""The pretraining stream of ShapesEdit: captioned scenes of every (shape, colour) combination, with the pixels
each noun names.

Stable Diffusion saw every kind of picture before InstructPix2Pix's narrow edit data; here the CLIP and the
text-to-image model of the miniature lineage (docs/shapes.md) see scenes of 1 to 4 objects in any combination,
the four held out of the edit pairs included. The stream is endless and procedural: element ``n`` is a pure
function of ``(seed, stream, n)``, so a run resumes at any position and every host draws its own elements of each
global batch. The ``eval`` stream never meets the ``train`` stream's seeds: its scenes are held out.

Each element carries, for the grounding objective, up to ``GROUNDED = 5`` words with their regions: each
object's shape word with the object's mask, and the word ``background`` with every pixel outside the objects.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np

from ip2p_jax.data import shapes

STREAM_SEEDS = {"train": 3, "eval": 4}  # apart from shapes_edit's split seeds (0, 1, 2)
GROUNDED = len(shapes.SHAPES) + 1  # the shape word of each object (at most one per shape) and "background"


@dataclasses.dataclass(frozen=True)
class CaptionedScene:
    """One element of the stream.

    Attributes:
      image: ``(64, 64, 3)`` uint8.
      caption: its caption, objects in a random order.
      word_spans: ``(GROUNDED, 2)`` int32 character spans of the grounded words; ``(-1, -1)`` pads.
      word_masks: ``(GROUNDED, 64, 64)`` bool, the pixels each grounded word names (all False where padded).
    """

    image: np.ndarray
    caption: str
    word_spans: np.ndarray
    word_masks: np.ndarray


def captioned_scene(scene: shapes.Scene, order) -> CaptionedScene:
    """``scene`` with its caption (objects in ``order``) and grounded words."""
    described = shapes.caption(scene, order)
    spans = np.full((GROUNDED, 2), -1, np.int32)
    masks = np.zeros((GROUNDED, shapes.SIZE, shapes.SIZE), bool)
    object_masks = scene.object_masks()
    for index, span in enumerate(described.shape_spans):
        spans[index], masks[index] = span, object_masks[index]
    spans[-1], masks[-1] = described.background_span, ~object_masks.any(axis=0)
    return CaptionedScene(scene.render(), described.text, spans, masks)


def draw_scene(seed: int, stream: str, index: int) -> tuple[shapes.Scene, list[int]]:
    """The scene of element ``index`` of ``stream`` (``"train"`` or ``"eval"``), 1 to 4 objects in any combination,
    and its caption's object order."""
    rng = np.random.default_rng([seed, STREAM_SEEDS[stream], index])
    scene = shapes.random_scene(rng, min_objects=1)
    return scene, [int(i) for i in rng.permutation(len(scene.objects))]


def draw(seed: int, stream: str, index: int) -> CaptionedScene:
    """Element ``index`` of ``stream``: ``draw_scene``'s scene with its caption and grounded words."""
    return captioned_scene(*draw_scene(seed, stream, index))


def batch(elements: list[CaptionedScene]) -> dict[str, np.ndarray]:
    """Stacks elements: ``image`` ``(B, 64, 64, 3)`` float32 in [-1, 1], ``caption`` ``(B,)`` str, ``word_spans``
    ``(B, GROUNDED, 2)`` int32, ``word_masks`` ``(B, GROUNDED, 64, 64)`` bool."""
    return {
        "image": np.stack([e.image for e in elements]).astype(np.float32) / 127.5 - 1.0,
        "caption": np.array([e.caption for e in elements]),
        "word_spans": np.stack([e.word_spans for e in elements]),
        "word_masks": np.stack([e.word_masks for e in elements]),
    }


def batches(
    seed: int,
    batch_size: int,
    *,
    stream: str = "train",
    position: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of each global batch of ``batch_size`` elements, from batch ``position`` on, forever.

    Host ``p`` of ``P`` takes rows ``[p * b, (p + 1) * b)`` of each global batch (``b = batch_size / P``), so the
    global batch is the same on any number of hosts.
    """
    if batch_size % process_count:
        raise ValueError(f"a batch of {batch_size} does not split over {process_count} processes")
    rows = batch_size // process_count
    for step in itertools.count(position):
        first = step * batch_size + process_index * rows
        yield batch([draw(seed, stream, first + i) for i in range(rows)])
