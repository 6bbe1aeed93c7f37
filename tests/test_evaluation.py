"""The ShapesEdit edit metrics on hand-made cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ip2p_jax.data import shapes
from ip2p_jax.evaluation import shapes_edit as evaluation

CIRCLE = shapes.ShapeObject("circle", "red", 20, 20, 10)
SCENE = shapes.Scene("gray", False, (CIRCLE, shapes.ShapeObject("square", "green", 46, 46, 9)))
EXAMPLE = shapes.make_example(SCENE, [shapes.Edit("recolour", "circle", "blue")])


def test_a_perfect_edit():
    output = EXAMPLE.edited_image
    assert evaluation.region_agreement(output, EXAMPLE.edited_image, EXAMPLE.mask) == 1.0
    assert evaluation.edit_success(output, EXAMPLE.edited_image, EXAMPLE.mask)
    assert evaluation.outside_change(output, EXAMPLE.input_image, EXAMPLE.mask) == 0.0
    assert evaluation.outside_psnr(output, EXAMPLE.input_image, EXAMPLE.mask) == math.inf


def test_no_edit_fails_and_changes_nothing():
    output = EXAMPLE.input_image
    assert evaluation.region_agreement(output, EXAMPLE.edited_image, EXAMPLE.mask) == 0.0
    assert not evaluation.edit_success(output, EXAMPLE.edited_image, EXAMPLE.mask)
    assert evaluation.outside_change(output, EXAMPLE.input_image, EXAMPLE.mask) == 0.0


def test_a_partial_edit_is_judged_by_the_share_of_the_region():
    # Recolour only the top rows of the circle: the share of its pixels that are blue decides.
    region = EXAMPLE.mask
    rows = np.nonzero(region.any(axis=1))[0]
    for top_rows, succeeds in ((3, False), (len(rows) - 2, True)):
        output = EXAMPLE.input_image.copy()
        painted = region & (np.arange(64)[:, None] < rows[0] + top_rows)
        output[painted] = shapes.OBJECT_COLOURS["blue"]
        share = painted.sum() / region.sum()
        assert evaluation.region_agreement(output, EXAMPLE.edited_image, region) == pytest.approx(share)
        assert evaluation.edit_success(output, EXAMPLE.edited_image, region) == succeeds == (share >= 0.7)


def test_an_edit_that_leaks():
    # The edit is right, and everything else is 20 levels brighter (no pixel clips: gray, green, red are < 235).
    output = EXAMPLE.edited_image.astype(np.int32)
    output[~EXAMPLE.mask] += 20
    assert evaluation.edit_success(output, EXAMPLE.edited_image, EXAMPLE.mask)
    assert evaluation.outside_change(output, EXAMPLE.input_image, EXAMPLE.mask) == pytest.approx(20.0)
    assert evaluation.outside_psnr(output, EXAMPLE.input_image, EXAMPLE.mask) == pytest.approx(
        10 * np.log10(255**2 / 400)
    )


def test_mask_iou_at_the_mask_resolution():
    region = np.zeros((64, 64), bool)
    region[0:32, 0:32] = True  # the top-left quarter
    assert evaluation.downsample_mask(region, (4, 4)).sum() == 4
    exact = np.zeros((4, 4), bool)
    exact[:2, :2] = True
    assert evaluation.mask_iou(exact, region) == 1.0
    shifted = np.zeros((4, 4), bool)
    shifted[:2, 1:3] = True  # overlaps 2 of 4 cells, union 6
    assert evaluation.mask_iou(shifted, region) == pytest.approx(2 / 6)
    assert evaluation.mask_iou(np.zeros((4, 4), bool), np.zeros((64, 64), bool)) == 1.0
    # A cell counts when at least half of it is inside.
    half = np.zeros((64, 64), bool)
    half[0:8, 0:16] = True
    np.testing.assert_array_equal(evaluation.downsample_mask(half, (4, 4))[0], [True, False, False, False])
    with pytest.raises(ValueError, match="does not divide"):
        evaluation.downsample_mask(region, (5, 5))


def test_generated_scene_colours_judges_what_a_picture_contains():
    """A scene's own rendering has everything; repainting an object or the background is caught."""
    from ip2p_jax.data.shapes import BACKGROUND_COLOURS, OBJECT_COLOURS, Scene, ShapeObject
    from ip2p_jax.evaluation.shapes_edit import generated_scene_colours

    scene = Scene("white", True, (ShapeObject("circle", "red", 16, 16, 10), ShapeObject("square", "blue", 44, 44, 9)))
    image = scene.render()
    assert generated_scene_colours(image, scene) == {
        "objects_found": 1.0,
        "all_objects": True,
        "extra_colours": 0,
        "background": True,
    }
    moved = np.roll(image, (5, -7), axis=(0, 1))  # positions are free
    assert generated_scene_colours(moved, scene)["all_objects"]
    repainted = image.copy()
    repainted[scene.objects[0].mask()] = OBJECT_COLOURS["green"]  # the red circle is now green
    judged = generated_scene_colours(repainted, scene)
    assert judged["objects_found"] == 0.5 and not judged["all_objects"] and judged["extra_colours"] == 1
    dark = image.copy()
    dark[~scene.object_masks().any(axis=0)] = BACKGROUND_COLOURS["black"]
    assert not generated_scene_colours(dark, scene)["background"]
    speck = image.copy()
    speck[:3, 60:] = OBJECT_COLOURS["orange"]  # 12 pixels: too few to be an object
    assert generated_scene_colours(speck, scene)["extra_colours"] == 0


def test_generated_pair_judgement_tells_a_done_edit_from_an_undone_one():
    """Hand-made generated pairs: objects placed elsewhere than in the scene (a generator places them freely);
    the edit carried out, not carried out, or done on the wrong object; edits the pixels cannot judge."""
    from ip2p_jax.data.shapes import OBJECT_COLOURS, Edit, Scene, ShapeObject, apply_edit
    from ip2p_jax.evaluation.shapes_edit import generated_pair_judgement

    scene = Scene("gray", False, (ShapeObject("circle", "red", 16, 16, 10), ShapeObject("square", "blue", 44, 44, 9)))
    drawn = Scene("gray", False, (ShapeObject("circle", "red", 44, 20, 10), ShapeObject("square", "blue", 18, 46, 9)))
    for edit in (Edit("recolour", "circle", "green"), Edit("remove", "circle", ""), Edit("background", "", "white")):
        source, done = drawn.render(), apply_edit(drawn, edit).render()
        judged = generated_pair_judgement(source, done, scene, edit)
        assert judged["judged"] and judged["present"] and judged["correct"], (edit, judged)
        assert judged["agreement"] == 1.0
        undone = generated_pair_judgement(source, source, scene, edit)
        assert undone["present"] and not undone["correct"] and undone["agreement"] == 0.0, edit
    recolour = Edit("recolour", "circle", "green")
    source = drawn.render()
    assert generated_pair_judgement(source, source, scene, recolour)["outside_change"] == 0.0
    # The wrong object recoloured: the circle keeps its colour, and the change lands outside.
    wrong = source.copy()
    wrong[drawn.objects[1].mask()] = OBJECT_COLOURS["green"]
    judged = generated_pair_judgement(source, wrong, scene, recolour)
    assert not judged["correct"] and judged["outside_change"] > 5
    # The input picture lacks the object: not correct, whatever the edited picture shows.
    no_circle = Scene("gray", False, drawn.objects[1:]).render()
    judged = generated_pair_judgement(no_circle, apply_edit(drawn, recolour).render(), scene, recolour)
    assert not judged["present"] and not judged["correct"]
    # Not judged: a reshape, and an object whose colour another object shares.
    assert generated_pair_judgement(source, source, scene, Edit("reshape", "circle", "diamond")) == {"judged": False}
    twins = Scene("gray", False, (scene.objects[0], ShapeObject("square", "red", 44, 44, 9)))
    assert generated_pair_judgement(source, source, twins, recolour) == {"judged": False}


def test_a_reshape_needs_the_new_shape_and_the_old_one_gone():
    """Judge version 2: a square turned into a circle of the same centre and size (the circle covers most of the
    square). The unedited picture agrees on more than 70 % of the union of both shapes, yet fails: the square's own
    corners must become background. The circle drawn over the unchanged square fails too; the ground truth passes."""
    square = shapes.ShapeObject("square", "green", 32, 32, 12)
    example = shapes.make_example(shapes.Scene("gray", False, (square,)), [shapes.Edit("reshape", "square", "circle")])
    region, target = example.regions[0], example.edited_image
    assert evaluation.region_agreement(example.input_image, target, region) >= evaluation.SUCCESS_AGREEMENT
    assert not evaluation.edit_success(example.input_image, target, region)
    circle_over_square = example.input_image.copy()
    circle_over_square[shapes.ShapeObject("circle", "green", 32, 32, 12).mask()] = shapes.OBJECT_COLOURS["green"]
    assert not evaluation.edit_success(circle_over_square, target, region)
    assert evaluation.edit_success(target, target, region)
