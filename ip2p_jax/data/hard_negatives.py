"""Hard negative captions: a scene's caption with one word changed so that it no longer describes the scene.

A CLIP trained with in-batch negatives alone never has to read a shape word: in a batch of scenes the colours and
counts already tell the captions apart, so the shape words stay at chance (docs/shapes.md, stage 4). Each caption
is therefore also contrasted with copies of itself in which one shape, object colour or background colour is
replaced, so that only that word separates the truth from the lie (NegCLIP's one-word negatives, Yuksekgonul et al.
2023, made exact here because the scene is known).

Whether a caption describes a scene is decided by its *claims*, read from the words the captions of
``shapes.caption`` and ``captioned_scenes.varied_caption`` use:

* a shape word claims an object of that shape exists, of the colour written before it ("a red circle") or, in an
  imperative its picture obeys, after it ("make the circle red"); "remove the circle" claims there is none;
* the word ``background`` claims the background's colour (written before it, or after "make the background"), and
  its stripes where "striped" is written.

A caption describes the scene when every claim holds; changing one word changes one claim, so a one-word change is a
hard negative exactly when its claim turns false. Replacements keep the article right ("a red" never becomes "a
orange"), so that grammar gives no negative away; nor does the text in two other ways, since a scene has at most one
object of each shape: a shape is never changed into one the caption already names ("a red square and a blue
square" is false of every scene, whatever the picture), nor inside "turn the circle into a circle" (whose two words
always agree in a true caption). A negative the text alone gives away teaches the image tower nothing; the first
CLIP trained without this rule stayed near chance at telling shapes apart (docs/shapes.md).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ip2p_jax.data import shapes

HARD_NEGATIVE_KINDS = ("shape", "colour", "background")  # which word a negative changes


@dataclasses.dataclass(frozen=True)
class Word:
    """One word of a caption: its text and character span ``[start, end)``."""

    text: str
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Claim:
    """What a shape word or the word ``background`` says of the scene.

    Attributes:
      kind: ``"object"`` (an object of ``shape`` exists, of ``colour`` if given), ``"absent"`` (no object of
        ``shape``: "remove the circle") or ``"background"`` (its colour, and stripes if ``striped``).
      words: indices (into the caption's words) of the words the claim is read from: the shape or ``background``
        word, and its colour word if any.
    """

    kind: str
    shape: str | None
    colour: str | None
    striped: bool
    words: tuple[int, ...]

    def holds(self, scene: shapes.Scene) -> bool:
        """Whether the scene makes the claim true."""
        if self.kind == "background":
            return (self.colour in (None, scene.background)) and (scene.textured or not self.striped)
        present = any(o.shape == self.shape and self.colour in (None, o.colour) for o in scene.objects)
        return present if self.kind == "object" else not present


def words(text: str) -> list[Word]:
    """The caption's words (letters only; commas and spaces separate them)."""
    return [Word(m.group(), m.start(), m.end()) for m in re.finditer(r"[a-z]+", text)]


def claims(text: str) -> list[Claim]:
    """Every claim of a caption (module docstring), in the order of their words."""
    ws = [w.text for w in words(text)]
    found = []
    for i, word in enumerate(ws):
        after_make_the = ws[max(i - 2, 0) : i] == ["make", "the"]
        if word in shapes.SHAPES:
            if ws[max(i - 2, 0) : i] == ["remove", "the"]:
                found.append(Claim("absent", word, None, False, (i,)))
            elif after_make_the and i + 1 < len(ws) and ws[i + 1] in shapes.OBJECT_COLOURS:
                found.append(Claim("object", word, ws[i + 1], False, (i, i + 1)))
            elif i > 0 and ws[i - 1] in shapes.OBJECT_COLOURS:
                found.append(Claim("object", word, ws[i - 1], False, (i - 1, i)))
            else:
                found.append(Claim("object", word, None, False, (i,)))
        elif word == "background":
            if after_make_the and i + 1 < len(ws) and ws[i + 1] in shapes.BACKGROUND_COLOURS:
                found.append(Claim("background", None, ws[i + 1], False, (i + 1,)))
                continue
            striped = i > 0 and ws[i - 1] == "striped"
            j = i - 1 - striped
            colour = ws[j] if j >= 0 and ws[j] in shapes.BACKGROUND_COLOURS else None
            found.append(Claim("background", None, colour, striped, (j,) if colour else ()))
    return found


def describes(scene: shapes.Scene, text: str) -> bool:
    """Whether every claim of the caption holds in the scene."""
    return all(claim.holds(scene) for claim in claims(text))


def _in_turn_clause(ws: list[str], i: int) -> bool:
    """Whether word ``i`` is a shape of "turn the X into a X"."""
    return ws[max(i - 2, 0) : i] == ["turn", "the"] or (i >= 2 and ws[i - 2] == "into" and ws[i - 1] in ("a", "an"))


def _article_fits(previous: str | None, word: str) -> bool:
    """Whether ``a`` / ``an`` before ``word`` (if that is the previous word) stays right."""
    if previous not in ("a", "an"):
        return True
    return previous == ("an" if word[0] in "aeiou" else "a")


def one_word_negatives(scene: shapes.Scene, text: str) -> dict[str, list[str]]:
    """Every one-word change of the caption that makes it false of the scene, by the kind of word changed
    (``HARD_NEGATIVE_KINDS``), in the order of the caption's words and then of the replacement words."""
    ws = words(text)
    named = {w.text for w in ws if w.text in shapes.SHAPES}
    found: dict[str, list[str]] = {kind: [] for kind in HARD_NEGATIVE_KINDS}
    for claim in claims(text):
        for i in claim.words:
            word = ws[i].text
            if word in shapes.SHAPES:
                if _in_turn_clause([w.text for w in ws], i):
                    continue
                kind, replacements = "shape", tuple(shape for shape in shapes.SHAPES if shape not in named)
            elif claim.kind == "background":
                kind, replacements = "background", tuple(shapes.BACKGROUND_COLOURS)
            else:
                kind, replacements = "colour", tuple(shapes.OBJECT_COLOURS)
            previous = ws[i - 1].text if i > 0 else None
            for new in replacements:
                if new == word or not _article_fits(previous, new):
                    continue
                changed = dataclasses.replace(
                    claim,
                    shape=new if kind == "shape" else claim.shape,
                    colour=new if kind != "shape" else claim.colour,
                )
                if not changed.holds(scene):
                    found[kind].append(text[: ws[i].start] + new + text[ws[i].end :])
    return found


def draw_hard_negatives(
    scene: shapes.Scene, text: str, rng: np.random.Generator, count: int, kinds: tuple[str, ...] = HARD_NEGATIVE_KINDS
) -> list[str]:
    """Up to ``count`` distinct one-word negatives of the caption, the kinds in ``kinds``'s order of preference:
    all of the first kind's (in random order) before any of the second's, and so on. Fewer when the caption has
    fewer (a caption naming only "the background" has none)."""
    unknown = set(kinds) - set(HARD_NEGATIVE_KINDS)
    if unknown:
        raise ValueError(f"unknown hard negative kinds {sorted(unknown)}; expected some of {HARD_NEGATIVE_KINDS}")
    found = one_word_negatives(scene, text)
    chosen: list[str] = []
    for kind in kinds:
        candidates = found[kind]
        chosen += [candidates[i] for i in rng.permutation(len(candidates))]
    return chosen[:count]


def word_variants(scene: shapes.Scene, order, kind: str) -> list[tuple[int, list[str]]]:
    """For each object, the scene's full caption (objects in ``order``) with that object's shape (``kind="shape"``)
    or colour (``"colour"``) set to each of the possible values, re-rendered so that the article fits:
    ``[(index of the true caption, captions)]`` in scene order. The "pick" of a CLIP is how often it scores the
    true caption highest (chance: one in ``len(captions)``)."""
    values = {"shape": shapes.SHAPES, "colour": tuple(shapes.OBJECT_COLOURS)}[kind]
    variants = []
    for index, obj in enumerate(scene.objects):
        texts = []
        for value in values:
            changed = dataclasses.replace(obj, **{kind: value})
            objects = (*scene.objects[:index], changed, *scene.objects[index + 1 :])
            texts.append(shapes.caption(dataclasses.replace(scene, objects=objects), order).text)
        variants.append((values.index(getattr(obj, kind)), texts))
    return variants
