"""Judging edits against ShapesEdit's ground truth, from pixels (``evaluate.py`` runs them over the test splits).

* **Edit success** of one instruction: within its ground-truth region, for each palette colour
  (``shapes.classify_pixels``) of the ground-truth edited picture there, at least ``SUCCESS_AGREEMENT`` of the
  pixels of that colour have it in the edited output: the object has the instructed colour, a removed object's
  pixels are background, the background has its new colour, and for a reshape *both* the new shape's pixels have
  the object's colour and the old shape's own pixels have become background. (Judge version 1, before
  ``JUDGE_VERSION`` 2, took one agreement over the whole region, and an unedited picture passed the reshapes
  whose old and new shapes overlap by 70 % or more.)
* **Preservation**: outside the union of the regions, the output against the *input*: mean absolute change in
  levels of 255 (averaged over pixels and channels) and PSNR in dB.
* **Mask IoU** of a predicted mask (FoI's, at its own resolution) against a ground-truth region brought to that
  resolution (a cell is inside when at least half its pixels are).

* **Colours of a generated scene** (the text-to-image stage of the lineage, docs/shapes.md): a picture generated
  from a scene's caption has its objects anywhere, so only what it contains is judged: each captioned object's
  colour covers at least ``PRESENCE_FRACTION`` of the object's area (objects sharing a colour add up), object
  colours the caption does not name cover less than that share of its smallest object, and the most common
  background colour is the captioned one. Shapes are judged by a CLIP (``tools/text_to_image_fidelity.py``).
* **A generated pair** (data generation on the lineage, docs/datagen.md): both pictures come from captions, so the
  edited region is found in the generated input by colour: the pixels of the edited object's colour (a removal or
  recolouring; judged only when no other object of the scene shares that colour) or of the captioned background
  colour (a background edit). The object counts as present when that region covers ``PRESENCE_FRACTION`` of the
  real object's (or background's) area; the edit is carried out when, in the generated edited picture, at least
  ``SUCCESS_AGREEMENT`` of the region has the instructed colour (the background's for a removal). A reshape keeps
  the colour of blobs too rough for their shape to be read from pixels, so it is not judged. The change outside
  is measured outside the region grown by ``OUTSIDE_MARGIN`` pixels (generated edges blur).

Images are ``(H, W, 3)`` uint8 or float in [0, 255]; masks are bool.
"""

from __future__ import annotations

import numpy as np

from ip2p_jax.data.shapes import BACKGROUND_COLOURS, OBJECT_COLOURS, PALETTE, Edit, Scene, classify_pixels

SUCCESS_AGREEMENT = 0.7  # fixed before any model was evaluated
JUDGE_VERSION = 2  # of edit_success; recorded with every evaluation (1: one agreement over the region)
PRESENCE_FRACTION = 0.3  # fixed before any generated scene was judged
OUTSIDE_MARGIN = 2  # pixels; fixed before any generated pair was judged


def region_agreement(output: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
    """The fraction of ``region``'s pixels whose palette colour in ``output`` is the one in ``target``."""
    if not region.any():
        raise ValueError("an empty region cannot be judged")
    return float(np.mean(classify_pixels(output[region]) == classify_pixels(target[region])))


def edit_success(output: np.ndarray, target: np.ndarray, region: np.ndarray) -> bool:
    """Whether ``output`` carries out the instruction whose ground truth is ``target`` in ``region``: each palette
    colour of ``target`` in the region agrees on at least ``SUCCESS_AGREEMENT`` of its pixels (one colour for a
    recolouring, a removal or a background; the object's and the background's for a reshape)."""
    if not region.any():
        raise ValueError("an empty region cannot be judged")
    wanted = classify_pixels(target[region])
    agrees = classify_pixels(output[region]) == wanted
    return all(np.mean(agrees[wanted == colour]) >= SUCCESS_AGREEMENT for colour in np.unique(wanted))


def outside_change(output: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference, in levels of 255, between ``output`` and ``source`` outside ``mask``."""
    outside = ~mask
    return float(np.mean(np.abs(output[outside].astype(np.float64) - source[outside].astype(np.float64))))


def outside_psnr(output: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, peak 255) of ``output`` against ``source`` outside ``mask``; ``inf`` when they are equal there."""
    outside = ~mask
    error = np.mean((output[outside].astype(np.float64) - source[outside].astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def downsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` bool -> ``size`` bool: a cell is inside when at least half of its pixels are (``H``, ``W``
    multiples of ``size``)."""
    height, width = mask.shape
    rows, cols = size
    if height % rows or width % cols:
        raise ValueError(f"a {height}x{width} mask does not divide into {rows}x{cols} cells")
    cells = mask.reshape(rows, height // rows, cols, width // cols).mean(axis=(1, 3))
    return cells >= 0.5


def mask_iou(predicted: np.ndarray, region: np.ndarray) -> float:
    """IoU of a predicted ``(h, w)`` mask with a ground-truth ``(H, W)`` region brought to ``(h, w)``; two empty
    masks agree (1.0)."""
    truth = downsample_mask(region, predicted.shape)
    predicted = predicted.astype(bool)
    union = np.logical_or(predicted, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, truth).sum() / union)


def generated_scene_colours(generated: np.ndarray, scene: Scene) -> dict[str, float | bool]:
    """Judges a picture generated from ``scene``'s caption by its colours (module docstring).

    Returns:
      ``objects_found``: the fraction of the scene's objects whose colour is present; ``all_objects``: whether every
      one is; ``extra_colours``: how many object colours the caption does not name are present; ``background``:
      whether the most common background colour is the scene's.
    """
    names = list(PALETTE)
    counts = np.bincount(classify_pixels(generated).ravel(), minlength=len(names))
    areas = scene.object_masks().sum(axis=(1, 2))
    named = {}
    for obj, area in zip(scene.objects, areas, strict=True):
        named[obj.colour] = named.get(obj.colour, 0) + int(area)
    found = {colour: counts[names.index(colour)] >= PRESENCE_FRACTION * area for colour, area in named.items()}
    objects_found = float(np.mean([found[obj.colour] for obj in scene.objects])) if scene.objects else 1.0
    smallest = PRESENCE_FRACTION * (areas.min() if len(areas) else 0)
    extra = sum(1 for c in OBJECT_COLOURS if c not in named and counts[names.index(c)] >= max(smallest, 1))
    backgrounds = [names.index(c) for c in BACKGROUND_COLOURS]
    background = names[backgrounds[int(np.argmax(counts[backgrounds]))]] == scene.background
    return {
        "objects_found": objects_found,
        "all_objects": objects_found == 1.0,
        "extra_colours": extra,
        "background": bool(background),
    }


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` in every direction (a square neighbourhood)."""
    height, width = mask.shape
    padded = np.pad(mask, pixels)
    grown = np.zeros_like(mask)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def generated_pair_judgement(image_0: np.ndarray, image_1: np.ndarray, scene: Scene, edit: Edit) -> dict:
    """Judges a generated pair (module docstring) made from the captions of ``scene`` and of ``scene`` after
    ``edit``.

    Returns:
      ``judged``: whether the pixels can judge this edit (not a reshape, no other object of the edited one's
      colour); and when judged: ``present`` (the region is found in the input picture), ``agreement`` (the share of
      the region with the instructed colour in the edited picture), ``correct`` (present and agreement at least
      ``SUCCESS_AGREEMENT``), ``outside_change`` (levels of 255 outside the grown region; ``nan`` without a region).
    """
    names = list(PALETTE)
    if edit.kind == "reshape":
        return {"judged": False}
    if edit.kind == "background":
        colour, target = scene.background, edit.value
        true_area = (~scene.object_masks().any(axis=0)).sum()
    else:
        obj = scene.objects[scene.object_index(edit.shape)]
        if sum(other.colour == obj.colour for other in scene.objects) > 1:
            return {"judged": False}
        colour, true_area = obj.colour, obj.mask().sum()
        target = edit.value if edit.kind == "recolour" else scene.background
    region = classify_pixels(image_0) == names.index(colour)
    present = bool(region.sum() >= PRESENCE_FRACTION * true_area)
    agreement = float(np.mean(classify_pixels(image_1[region]) == names.index(target))) if region.any() else 0.0
    outside = grow_mask(region, OUTSIDE_MARGIN)
    change = outside_change(image_1, image_0, outside) if (~outside).any() else float("nan")
    return {
        "judged": True,
        "present": present,
        "agreement": agreement,
        "correct": present and agreement >= SUCCESS_AGREEMENT,
        "outside_change": change,
    }
