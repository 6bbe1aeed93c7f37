"""The pretraining stream of ShapesEdit: captioned scenes of every (shape, colour) combination, with the pixels
each noun names.

Stable Diffusion saw every kind of picture before InstructPix2Pix's narrow edit data; here the CLIP and the
text-to-image model of the miniature lineage (docs/shapes.md) see scenes of 1 to 4 objects in any combination,
the four held out of the edit pairs included. The stream is endless and procedural: element ``n`` is a pure
function of ``(seed, stream, n)``, so a run resumes at any position and every host draws its own elements of each
global batch. The ``eval`` stream never meets the ``train`` stream's seeds: its scenes are held out.

Each element carries, for the grounding objective, up to ``GROUNDED = 5`` words with their regions: each
object's shape word with the object's mask, and the word ``background`` with every pixel outside the objects.

Captions come in two styles. ``"full"``: one template naming every object and the background ("a red circle and a
blue square on a gray background"). ``"varied"``: a quarter of the captions full, the rest name a random subset of
the scene in clauses of varied grammar that use the instructions' words truthfully ("the circle", "make the square
blue" of a blue square, "turn the circle into a circle", "the gray background"), so that a shape word meets the
contexts an instruction puts it in: no colour before it, a verb before it, and no other object named beside it.
Only ``remove`` has no truthful clause there. ``"instructions"``: a varied caption that, in a share of the scenes
missing some shape, also says to remove one that is absent ("remove the diamond, the circle and a gray background":
the picture obeys it), so that every word of the edits is trained. A word not mentioned, or removed, is not
grounded.

A batch may carry, per caption, hard negatives (``hard_negatives.py``): the caption with one word changed so that
it no longer describes the scene, for the CLIP's contrastive loss.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np

from ip2p_jax.data import hard_negatives, shapes

STREAM_SEEDS = {"train": 3, "eval": 4}  # apart from shapes_edit's split seeds (0, 1, 2)
GROUNDED = len(shapes.SHAPES) + 1  # the shape word of each object (at most one per shape) and "background"
CAPTION_STYLES = ("full", "varied", "instructions")
VARIED_FULL_SHARE = 0.25  # of "varied" captions, the share that keep the full template
VARIED_MENTION_PROBABILITY = 0.6  # each object's (and the background's) chance to be named in a varied caption
REMOVE_PROBABILITY = 0.3  # of "instructions" captions of scenes missing a shape, the share that remove one


@dataclasses.dataclass(frozen=True)
class CaptionedScene:
    """One element of the stream.

    Attributes:
      image: ``(64, 64, 3)`` uint8.
      caption: its caption, objects in a random order.
      word_spans: ``(GROUNDED, 2)`` int32 character spans of the grounded words; ``(-1, -1)`` pads.
      word_masks: ``(GROUNDED, 64, 64)`` bool, the pixels each grounded word names (all False where padded).
      shapes_present: ``(len(shapes.SHAPES),)`` bool, which shapes the scene holds (named in the caption or not).
    """

    image: np.ndarray
    caption: str
    word_spans: np.ndarray
    word_masks: np.ndarray
    shapes_present: np.ndarray


def _object_clause(obj: shapes.ShapeObject, form: int) -> tuple[str, int]:
    """One clause naming ``obj`` in varied grammar, and the start of its shape word in the clause."""
    shape, colour = obj.shape, obj.colour
    clause = (
        shapes.with_article(f"{colour} {shape}"),
        f"the {colour} {shape}",
        f"the {shape}",
        shapes.with_article(shape),
        f"make the {shape} {colour}",  # an imperative its picture obeys
        f"turn the {shape} into {shapes.with_article(shape)}",
    )[form]
    return clause, len("make the ") if form >= 4 else len(clause) - len(shape)  # the verbs are 4 letters


def _background_clause(scene: shapes.Scene, form: int) -> str:
    """One clause naming the background (the word ``background`` ends it, but for the imperative)."""
    colour = f"{scene.background}{' striped' if scene.textured else ''}"
    return (
        shapes.with_article(f"{colour} background"),
        f"the {colour} background",
        "the background",
        f"make the background {scene.background}",
    )[form]


def varied_caption(scene: shapes.Scene, rng: np.random.Generator) -> shapes.Caption:
    """A ``"varied"`` caption of ``scene`` (module docstring); objects not named have ``None`` spans, as has the
    background when it is not named."""
    if rng.random() < VARIED_FULL_SHARE:
        return shapes.caption(scene, [int(i) for i in rng.permutation(len(scene.objects))])
    named = [i for i in range(len(scene.objects)) if rng.random() < VARIED_MENTION_PROBABILITY]
    with_background = rng.random() < VARIED_MENTION_PROBABILITY
    if not named and not with_background:
        named = [int(rng.integers(len(scene.objects)))] if scene.objects else []
        with_background = not scene.objects
    mentions = [*named, *(["background"] if with_background else [])]
    mentions = [mentions[i] for i in rng.permutation(len(mentions))]
    text, spans, background_span = "", [None] * len(scene.objects), None
    for position, mention in enumerate(mentions):
        if position:
            text += " and " if position == len(mentions) - 1 else ", "
        if mention == "background":
            clause = _background_clause(scene, int(rng.integers(4)))
            start = clause.index("background")
            background_span = (len(text) + start, len(text) + start + len("background"))
        else:
            obj = scene.objects[mention]
            clause, start = _object_clause(obj, int(rng.integers(6)))
            spans[mention] = (len(text) + start, len(text) + start + len(obj.shape))
        text += clause
    return shapes.Caption(text, tuple(spans), background_span)


def with_removal(scene: shapes.Scene, described: shapes.Caption, rng: np.random.Generator) -> shapes.Caption:
    """``described`` with, at ``REMOVE_PROBABILITY``, the clause "remove the {shape}" for a shape the scene lacks,
    before or after the rest (the ``"instructions"`` style); unchanged when the scene has every shape."""
    absent = [shape for shape in shapes.SHAPES if shape not in {o.shape for o in scene.objects}]
    if not absent or rng.random() >= REMOVE_PROBABILITY:
        return described
    clause = f"remove the {absent[int(rng.integers(len(absent)))]}"
    if rng.random() < 0.5:
        return shapes.Caption(f"{described.text}, {clause}", described.shape_spans, described.background_span)
    shift = len(clause) + 2

    def moved(span):
        return None if span is None else (span[0] + shift, span[1] + shift)

    spans = tuple(moved(span) for span in described.shape_spans)
    return shapes.Caption(f"{clause}, {described.text}", spans, moved(described.background_span))


def captioned_scene(scene: shapes.Scene, order=None, described: shapes.Caption | None = None) -> CaptionedScene:
    """``scene`` with its caption (``described``, or the full one with objects in ``order``) and grounded words;
    a word the caption does not name (a ``None`` span) is padding."""
    described = shapes.caption(scene, order) if described is None else described
    spans = np.full((GROUNDED, 2), -1, np.int32)
    masks = np.zeros((GROUNDED, shapes.SIZE, shapes.SIZE), bool)
    object_masks = scene.object_masks()
    for index, span in enumerate(described.shape_spans):
        if span is not None:
            spans[index], masks[index] = span, object_masks[index]
    if described.background_span is not None:
        spans[-1], masks[-1] = described.background_span, ~object_masks.any(axis=0)
    present = np.array([any(obj.shape == shape for obj in scene.objects) for shape in shapes.SHAPES])
    return CaptionedScene(scene.render(), described.text, spans, masks, present)


def draw_scene(seed: int, stream: str, index: int) -> tuple[shapes.Scene, list[int]]:
    """The scene of element ``index`` of ``stream`` (``"train"`` or ``"eval"``), 1 to 4 objects in any combination,
    and its caption's object order."""
    rng = np.random.default_rng([seed, STREAM_SEEDS[stream], index])
    scene = shapes.random_scene(rng, min_objects=1)
    return scene, [int(i) for i in rng.permutation(len(scene.objects))]


def draw(seed: int, stream: str, index: int, style: str = "full") -> CaptionedScene:
    """Element ``index`` of ``stream``: ``draw_scene``'s scene with its caption in ``style`` (``CAPTION_STYLES``)
    and grounded words. Both styles draw the same scenes; the varied caption has its own random draws."""
    if style not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {style!r}; expected one of {CAPTION_STYLES}")
    scene, order = draw_scene(seed, stream, index)
    if style == "full":
        return captioned_scene(scene, order)
    rng = np.random.default_rng([seed, STREAM_SEEDS[stream], index, 1])
    described = varied_caption(scene, rng)
    if style == "instructions":
        described = with_removal(scene, described, rng)
    return captioned_scene(scene, described=described)


def draw_hard_negatives(
    seed: int, stream: str, index: int, element: CaptionedScene, count: int, kinds: tuple[str, ...]
) -> tuple[list[str], list[bool]]:
    """``count`` hard negatives of element ``index``'s caption (``hard_negatives.draw_hard_negatives``), padded
    with ``""`` where the caption has fewer, and which are real: ``(captions, valid)``. A pure function of
    ``(seed, stream, index)`` like the element."""
    scene, _ = draw_scene(seed, stream, index)
    rng = np.random.default_rng([seed, STREAM_SEEDS[stream], index, 2])
    negatives = hard_negatives.draw_hard_negatives(scene, element.caption, rng, count, kinds)
    return negatives + [""] * (count - len(negatives)), [True] * len(negatives) + [False] * (count - len(negatives))


def batch(elements: list[CaptionedScene], negatives: list[tuple[list[str], list[bool]]] | None = None):
    """Stacks elements: ``image`` ``(B, 64, 64, 3)`` float32 in [-1, 1], ``caption`` ``(B,)`` str, ``word_spans``
    ``(B, GROUNDED, 2)`` int32, ``word_masks`` ``(B, GROUNDED, 64, 64)`` bool, ``shapes_present`` ``(B, S)`` bool
    (``S = len(shapes.SHAPES)``); with ``negatives`` (one
    ``draw_hard_negatives`` result per element) also ``hard_negatives`` ``(B, N)`` str and ``hard_negative_valid``
    ``(B, N)`` bool."""
    extra = {}
    if negatives is not None:
        extra = {
            "hard_negatives": np.array([texts for texts, _ in negatives], dtype=object).astype(str),
            "hard_negative_valid": np.array([valid for _, valid in negatives], bool),
        }
    return {
        **extra,
        "image": np.stack([e.image for e in elements]).astype(np.float32) / 127.5 - 1.0,
        "caption": np.array([e.caption for e in elements]),
        "word_spans": np.stack([e.word_spans for e in elements]),
        "word_masks": np.stack([e.word_masks for e in elements]),
        "shapes_present": np.stack([e.shapes_present for e in elements]),
    }


def batches(
    seed: int,
    batch_size: int,
    *,
    stream: str = "train",
    position: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    style: str = "full",
    hard_negative_count: int = 0,
    hard_negative_kinds: tuple[str, ...] = hard_negatives.HARD_NEGATIVE_KINDS,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of each global batch of ``batch_size`` elements, from batch ``position`` on, forever, with
    ``hard_negative_count`` hard negatives per caption (``draw_hard_negatives``) when above 0.

    Host ``p`` of ``P`` takes rows ``[p * b, (p + 1) * b)`` of each global batch (``b = batch_size / P``), so the
    global batch is the same on any number of hosts.
    """
    if batch_size % process_count:
        raise ValueError(f"a batch of {batch_size} does not split over {process_count} processes")
    rows = batch_size // process_count
    for step in itertools.count(position):
        first = step * batch_size + process_index * rows
        elements = [draw(seed, stream, first + i, style) for i in range(rows)]
        negatives = None
        if hard_negative_count:
            negatives = [
                draw_hard_negatives(seed, stream, first + i, element, hard_negative_count, hard_negative_kinds)
                for i, element in enumerate(elements)
            ]
        yield batch(elements, negatives)
