"""ShapesEdit: procedural scenes of flat shapes and instruction edits with exact ground truth.

A scene is 64 x 64 RGB: a plain or striped background and 2 to 4 non-overlapping objects, each a shape (circle,
square, triangle, diamond; at most one of each, so "the circle" names one object) in one of six colours. An edit
is one of

* ``recolour``: "make the circle blue"; its region is the object;
* ``reshape``: "turn the square into a diamond" (same colour, centre and size); its region is old + new shape;
* ``remove``: "remove the triangle"; its region is the object, which becomes background;
* ``background``: "make the background black"; its region is every pixel outside the objects.

Every scene has a caption naming its objects and background ("a red circle and an orange triangle on a white
striped background", objects in random order), and every example its input and edited captions.

Every pixel outside an edit's region is equal in the input and the edited picture, except in *leaky* examples
(training only), whose edited picture also shifts everything outside the region slightly: towards the instructed
colour, or brighter / darker. That reproduces the over-editing that InstructPix2Pix learns from its generated
training pairs, which Focus on Your Instruction is meant to undo.

Some (shape, colour) combinations are held out: no object of the training split ever has one, in its input or its
edited picture; every test example has one. Pixels are judged by ``classify_pixels``: the nearest palette colour.
Everything here is NumPy and a pure function of its random generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond")
OBJECT_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
BACKGROUND_COLOURS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (30, 30, 30)}
PALETTE = {**OBJECT_COLOURS, **BACKGROUND_COLOURS}
HELD_OUT = frozenset({("triangle", "blue"), ("circle", "yellow"), ("square", "purple"), ("diamond", "red")})
EDIT_KINDS = ("recolour", "reshape", "remove", "background")
CAPTION_WORDS = ("an", "on", "and", "striped")  # captions' words beyond the instructions'
WORDS = ("make", "the", "turn", "into", "a", "remove", "background", *SHAPES, *PALETTE, *CAPTION_WORDS)  # vocabulary

RADIUS = (8, 12)  # an object's half-size in pixels
STRIPE_PERIOD, STRIPE_AMPLITUDE = 12, 18  # textured backgrounds: diagonal sinusoidal stripes


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object: ``shape`` and ``colour`` names, centre ``(cx, cy)`` and half-size ``radius`` in pixels."""

    shape: str
    colour: str
    cx: int
    cy: int
    radius: int

    def mask(self) -> np.ndarray:
        """``(SIZE, SIZE)`` bool: the pixels whose centres lie in the shape."""
        y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
        dx, dy, r = x - self.cx, y - self.cy, self.radius
        if self.shape == "circle":
            return dx**2 + dy**2 <= r**2
        if self.shape == "square":
            return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
        if self.shape == "triangle":  # upright, apex at the top
            return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        if self.shape == "diamond":
            return np.abs(dx) + np.abs(dy) <= r
        raise ValueError(f"unknown shape {self.shape!r}")


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background (colour name, plain or striped) and non-overlapping objects."""

    background: str
    textured: bool
    objects: tuple[ShapeObject, ...]

    def object_index(self, shape: str) -> int:
        return [o.shape for o in self.objects].index(shape)

    def render(self) -> np.ndarray:
        """``(SIZE, SIZE, 3)`` uint8."""
        image = np.empty((SIZE, SIZE, 3), np.float64)
        image[:] = BACKGROUND_COLOURS[self.background]
        if self.textured:
            y, x = np.mgrid[0:SIZE, 0:SIZE]
            image += STRIPE_AMPLITUDE * np.sin(2 * np.pi * (x + y) / STRIPE_PERIOD)[..., None]
        for obj in self.objects:
            image[obj.mask()] = OBJECT_COLOURS[obj.colour]
        return np.clip(np.round(image), 0, 255).astype(np.uint8)

    def object_masks(self) -> np.ndarray:
        """``(N, SIZE, SIZE)`` bool, one per object."""
        return np.stack([obj.mask() for obj in self.objects]) if self.objects else np.zeros((0, SIZE, SIZE), bool)


@dataclasses.dataclass(frozen=True)
class Edit:
    """One instruction: ``kind`` (``EDIT_KINDS``), the ``shape`` it names ("" for the background) and its
    ``value`` (the new colour, the new shape, or "" for a removal)."""

    kind: str
    shape: str
    value: str

    @property
    def instruction(self) -> str:
        if self.kind == "recolour":
            return f"make the {self.shape} {self.value}"
        if self.kind == "reshape":
            return f"turn the {self.shape} into a {self.value}"
        if self.kind == "remove":
            return f"remove the {self.shape}"
        return f"make the background {self.value}"

    @property
    def keyword(self) -> str:
        """The word naming the region to edit (FoI's keyword)."""
        return "background" if self.kind == "background" else self.shape


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after ``edit``."""
    if edit.kind == "background":
        return dataclasses.replace(scene, background=edit.value)
    index = scene.object_index(edit.shape)
    objects = list(scene.objects)
    if edit.kind == "remove":
        del objects[index]
    else:
        field = "colour" if edit.kind == "recolour" else "shape"
        objects[index] = dataclasses.replace(objects[index], **{field: edit.value})
    return dataclasses.replace(scene, objects=tuple(objects))


def edit_region(scene: Scene, edit: Edit) -> np.ndarray:
    """``(SIZE, SIZE)`` bool: the pixels ``edit`` is allowed to change in ``scene``."""
    if edit.kind == "background":
        return ~scene.object_masks().any(axis=0)
    obj = scene.objects[scene.object_index(edit.shape)]
    region = obj.mask()
    if edit.kind == "reshape":
        region = region | dataclasses.replace(obj, shape=edit.value).mask()
    return region


def combinations(scene: Scene) -> set[tuple[str, str]]:
    return {(obj.shape, obj.colour) for obj in scene.objects}


# ---------------------------------------------------------------------------------------------- captions


@dataclasses.dataclass(frozen=True)
class Caption:
    """A scene's caption and where its nouns are, for grounding words on pixels.

    Attributes:
      text: e.g. ``"a red circle, a green square and an orange triangle on a white striped background"``.
      shape_spans: per object of the scene (scene order, not caption order), the character span ``[start, end)``
        of its shape word; ``None`` for an object a varied caption (``captioned_scenes.py``) does not name.
      background_span: the character span of the word ``background`` (``None`` where it is not named).
    """

    text: str
    shape_spans: tuple[tuple[int, int] | None, ...]
    background_span: tuple[int, int] | None


def with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def caption(scene: Scene, order: Sequence[int] | None = None) -> Caption:
    """The caption naming ``scene``'s objects (in ``order``, indices into ``scene.objects``; default scene order)
    and its background: "a red circle and a blue square on a gray background"; with no object, "a gray background".
    """
    order = range(len(scene.objects)) if order is None else order
    if sorted(order) != list(range(len(scene.objects))):
        raise ValueError(f"order {list(order)} is not a permutation of the scene's {len(scene.objects)} objects")
    text, spans = "", {}
    for position, index in enumerate(order):
        if position:
            text += " and " if position == len(scene.objects) - 1 else ", "
        obj = scene.objects[index]
        text += with_article(f"{obj.colour} {obj.shape}")
        spans[index] = (len(text) - len(obj.shape), len(text))
    background = with_article(f"{scene.background}{' striped' if scene.textured else ''} background")
    text += f" on {background}" if scene.objects else background
    span = (len(text) - len("background"), len(text))
    return Caption(text, tuple(spans[i] for i in range(len(scene.objects))), span)


def edited_object_indices(scene: Scene, edits: Sequence[Edit]) -> list[int]:
    """For each object of the scene after ``edits``, the index of the object of ``scene`` it was (``apply_edit``
    replaces objects in place and deletes removed ones)."""
    current, indices = scene, list(range(len(scene.objects)))
    for edit in edits:
        if edit.kind == "remove":
            del indices[current.object_index(edit.shape)]
        current = apply_edit(current, edit)
    return indices


def caption_pair(example: Example, rng: np.random.Generator) -> tuple[str, str]:
    """The example's input and edited captions (the paper's triple is ``(input caption, instruction, edited
    caption)``): the objects in one random order, kept in the edited caption, removed objects left out. A leak
    is not captioned."""
    scene = example.scene
    order = [int(i) for i in rng.permutation(len(scene.objects))]
    edited = scene
    for edit in example.edits:
        edited = apply_edit(edited, edit)
    survivors = edited_object_indices(scene, example.edits)
    edited_order = [survivors.index(i) for i in order if i in survivors]
    return caption(scene, order).text, caption(edited, edited_order).text


# ---------------------------------------------------------------------------------------------- random draws


def random_scene(rng: np.random.Generator, min_objects: int = 2, max_objects: int = 4) -> Scene:
    """2 to 4 objects of distinct shapes, random colours, sizes and places; bounding boxes at least 2 px apart."""
    while True:
        count = int(rng.integers(min_objects, max_objects + 1))
        shapes = rng.choice(SHAPES, size=count, replace=False)
        objects: list[ShapeObject] = []
        for shape in shapes:
            for _ in range(50):
                radius = int(rng.integers(RADIUS[0], RADIUS[1] + 1))
                cx, cy = (int(v) for v in rng.integers(radius + 1, SIZE - radius - 1, size=2))
                if all(max(abs(cx - o.cx), abs(cy - o.cy)) >= radius + o.radius + 2 for o in objects):
                    colour = str(rng.choice(list(OBJECT_COLOURS)))
                    objects.append(ShapeObject(str(shape), colour, cx, cy, radius))
                    break
        if len(objects) == count:
            background = str(rng.choice(list(BACKGROUND_COLOURS)))
            return Scene(background, bool(rng.random() < 0.5), tuple(objects))


def random_edit(
    rng: np.random.Generator, scene: Scene, exclude: Sequence[str] = (), objects_only: bool = False
) -> Edit:
    """A random edit of ``scene`` that names none of the shapes in ``exclude``."""
    kinds = EDIT_KINDS[:3] if objects_only else EDIT_KINDS
    kind = str(rng.choice(kinds))
    if kind == "background":
        return Edit(kind, "", str(rng.choice([c for c in BACKGROUND_COLOURS if c != scene.background])))
    candidates = [o for o in scene.objects if o.shape not in exclude]
    obj = candidates[int(rng.integers(len(candidates)))]
    if kind == "recolour":
        return Edit(kind, obj.shape, str(rng.choice([c for c in OBJECT_COLOURS if c != obj.colour])))
    if kind == "reshape":
        free = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
        if not free:  # every shape is taken: recolour instead
            return Edit("recolour", obj.shape, str(rng.choice([c for c in OBJECT_COLOURS if c != obj.colour])))
        return Edit(kind, obj.shape, str(rng.choice(free)))
    return Edit(kind, obj.shape, "")


@dataclasses.dataclass(frozen=True)
class Example:
    """One ShapesEdit example; images ``(SIZE, SIZE, 3)`` uint8, masks bool.

    Attributes:
      edits: the instructions, applied together.
      input_image, edited_image: before and after.
      regions: ``(K, SIZE, SIZE)`` each edit's region.
      mask: ``(SIZE, SIZE)`` the union of the regions (the ground truth of what may change).
      object_masks: ``(N, SIZE, SIZE)`` the input's objects, with ``scene`` describing them.
      leak: "" or how the edited picture also changes outside the mask ("tint" / "brightness").
    """

    scene: Scene
    edits: tuple[Edit, ...]
    input_image: np.ndarray
    edited_image: np.ndarray
    regions: np.ndarray
    mask: np.ndarray
    object_masks: np.ndarray
    leak: str = ""

    @property
    def instruction(self) -> str:
        """The instructions joined by ", " (FoI's composite prompt)."""
        return ", ".join(edit.instruction for edit in self.edits)


def make_example(scene: Scene, edits: Sequence[Edit], leak: str = "", rng: np.random.Generator | None = None):
    """Applies ``edits`` (on different objects) to ``scene``; a ``leak`` ("tint" / "brightness") shifts the edited
    picture outside the mask by an amount drawn from ``rng``."""
    edited_scene = scene
    for edit in edits:
        edited_scene = apply_edit(edited_scene, edit)
    regions = np.stack([edit_region(scene, edit) for edit in edits])
    mask = regions.any(axis=0)
    edited = edited_scene.render()
    if leak:
        edited = _leak(edited, mask, edits[0], leak, rng)
    return Example(scene, tuple(edits), scene.render(), edited, regions, mask, scene.object_masks(), leak)


def _leak(image: np.ndarray, mask: np.ndarray, edit: Edit, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Shifts ``image`` outside ``mask``: a 12-25 % blend towards the instruction's colour ("tint", a random
    object colour when the instruction names none) or 15-30 levels up or down ("brightness")."""
    out = image.astype(np.float64)
    if kind == "tint":
        colour = PALETTE.get(edit.value) or OBJECT_COLOURS[str(rng.choice(list(OBJECT_COLOURS)))]
        weight = rng.uniform(0.12, 0.25)
        out[~mask] = (1 - weight) * out[~mask] + weight * np.asarray(colour, np.float64)
    elif kind == "brightness":
        out[~mask] += rng.choice([-1.0, 1.0]) * rng.uniform(15, 30)
    else:
        raise ValueError(f"unknown leak {kind!r}")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_example(rng: np.random.Generator, split: str, leak_fraction: float = 0.0) -> Example:
    """One example of ``split``: ``"train"`` (one instruction, no held-out combination, a ``leak_fraction`` of
    leaky targets), ``"test_single"`` (one instruction) or ``"test_multi"`` (2 or 3 instructions on different
    objects); test examples always hold a held-out combination and never leak."""
    if split not in ("train", "test_single", "test_multi"):
        raise ValueError(f"unknown split {split!r}")
    while True:
        if split == "test_multi":
            count = int(rng.integers(2, 4))
            scene = random_scene(rng, min_objects=count)
            edits: list[Edit] = []
            so_far = scene  # drawn on the scene edited so far, so that no two objects end up one shape
            for _ in range(count):
                named = [shape for e in edits for shape in (e.shape, e.value)]
                edits.append(random_edit(rng, so_far, exclude=named, objects_only=True))
                so_far = apply_edit(so_far, edits[-1])
        else:
            scene = random_scene(rng)
            edits = [random_edit(rng, scene)]
        edited_scene = scene
        for edit in edits:
            edited_scene = apply_edit(edited_scene, edit)
        held_out = (combinations(scene) | combinations(edited_scene)) & HELD_OUT
        if (split == "train") == (not held_out):
            break
    leak = ""
    if split == "train" and rng.random() < leak_fraction:
        leak = str(rng.choice(["tint", "brightness"]))
    return make_example(scene, edits, leak, rng)


# ---------------------------------------------------------------------------------------------- judging pixels


def classify_pixels(images: np.ndarray) -> np.ndarray:
    """The nearest ``PALETTE`` colour of every pixel: ``(..., 3)`` uint8 or float in [0, 255] -> ``(...)`` int
    indices into ``list(PALETTE)``. Stripes (18 levels) and slight leaks stay with their colour."""
    palette = np.asarray(list(PALETTE.values()), np.float64)
    distances = ((np.asarray(images, np.float64)[..., None, :] - palette) ** 2).sum(-1)
    return distances.argmin(-1)
