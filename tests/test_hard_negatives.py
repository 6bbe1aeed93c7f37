"""Hard negative captions for the CLIP (ip2p_jax/data/hard_negatives.py) and the contrastive loss that uses them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.data import captioned_scenes, hard_negatives, shapes
from ip2p_jax.training.clip import contrastive_loss, pick_accuracy, word_pick_questions


def _scene(*objects, background="white", textured=False):
    return shapes.Scene(background, textured, tuple(shapes.ShapeObject(s, c, 32, 32, 10) for s, c in objects))


def _changed_words(a: str, b: str) -> list[tuple[str, str]]:
    words_a, words_b = a.replace(",", "").split(), b.replace(",", "").split()
    assert len(words_a) == len(words_b), (a, b)
    return [(x, y) for x, y in zip(words_a, words_b, strict=True) if x != y]


@pytest.mark.parametrize("style", captioned_scenes.CAPTION_STYLES)
def test_every_caption_describes_its_scene_and_no_hard_negative_does(style):
    """Over 400 scenes of each caption style: the claims read from each caption hold in its scene; every hard
    negative differs from its caption in exactly one word, of its kind, and has a claim that fails."""
    kinds_seen = set()
    for index in range(400):
        scene, _ = captioned_scenes.draw_scene(0, "train", index)
        caption = captioned_scenes.draw(0, "train", index, style).caption
        assert hard_negatives.describes(scene, caption), caption
        for kind, negatives in hard_negatives.one_word_negatives(scene, caption).items():
            assert len(set(negatives)) == len(negatives)
            for negative in negatives:
                [(old, new)] = _changed_words(caption, negative)
                allowed = {
                    "shape": shapes.SHAPES,
                    "colour": tuple(shapes.OBJECT_COLOURS),
                    "background": tuple(shapes.BACKGROUND_COLOURS),
                }[kind]
                assert old in allowed and new in allowed, (caption, negative)
                assert not hard_negatives.describes(scene, negative), (caption, negative)
                # The text alone never gives it away: no shape named twice, none changed in a "turn" clause.
                named = [w for w in negative.replace(",", "").split() if w in shapes.SHAPES]
                assert len(named) == len(set(named)) or "into" in negative, (caption, negative)
                if "into" in negative:
                    turn = negative.replace(",", "").split("turn the ")[1].split()
                    assert turn[0] == turn[3], (caption, negative)
                kinds_seen.add(kind)
    assert kinds_seen == set(hard_negatives.HARD_NEGATIVE_KINDS)


def test_known_answers():
    """A shape swap that still names a present object is no negative; the article stays right; "remove the X"
    turns false when X is present; a caption's claims fail as the scene says."""
    scene = _scene(("circle", "red"), ("square", "red"), background="gray")
    found = hard_negatives.one_word_negatives(scene, "the circle and make the background gray")
    assert found["shape"] == ["the triangle and make the background gray", "the diamond and make the background gray"]
    assert found["background"] == [
        "the circle and make the background white",
        "the circle and make the background black",
    ]
    assert found["colour"] == []
    found = hard_negatives.one_word_negatives(scene, "make the circle red")
    assert "make the square red" not in found["shape"] and "make the triangle red" in found["shape"]
    assert found["colour"] == [f"make the circle {c}" for c in shapes.OBJECT_COLOURS if c != "red"]
    # A shape the caption names already, or one in a turn clause, gives a negative away without the picture.
    given_away = hard_negatives.one_word_negatives(scene, "a red circle and a red diamond")
    assert given_away["shape"] == ["a red triangle and a red diamond", "a red circle and a red triangle"]
    assert hard_negatives.one_word_negatives(scene, "turn the circle into a circle")["shape"] == []
    found = hard_negatives.one_word_negatives(scene, "an orange triangle")  # (false already: only the article)
    assert found["colour"] == []  # no other object colour takes "an"
    found = hard_negatives.one_word_negatives(scene, "remove the diamond, a red square")
    assert found["shape"][0] == "remove the circle, a red square"
    assert "remove the square, a red square" not in found["shape"]  # false of any scene: named twice
    assert not hard_negatives.describes(scene, "a red circle on a gray striped background")
    assert hard_negatives.describes(_scene(background="gray", textured=True), "the gray background")
    assert not hard_negatives.describes(scene, "a green circle") and hard_negatives.describes(scene, "a circle")
    rng = np.random.default_rng(0)
    drawn = hard_negatives.draw_hard_negatives(scene, "a red circle on a gray background", rng, 4, ("shape",))
    assert len(drawn) == 2 and set(drawn) == {
        "a red triangle on a gray background",
        "a red diamond on a gray background",
    }
    assert hard_negatives.draw_hard_negatives(scene, "the background", rng, 4) == []
    with pytest.raises(ValueError, match="unknown hard negative kinds"):
        hard_negatives.draw_hard_negatives(scene, "a circle", rng, 4, ("size",))


def test_batches_carry_padded_hard_negatives_the_same_on_any_number_of_hosts():
    batch = next(captioned_scenes.batches(0, 8, position=2, style="instructions", hard_negative_count=4))
    assert batch["hard_negatives"].shape == batch["hard_negative_valid"].shape == (8, 4)
    for caption, negatives, valid in zip(
        batch["caption"], batch["hard_negatives"], batch["hard_negative_valid"], strict=True
    ):
        assert all(len(_changed_words(caption, n)) == 1 for n in negatives[valid])
        assert all(n == "" for n in negatives[~valid])
    halves = [
        next(
            captioned_scenes.batches(
                0, 8, position=2, process_index=p, process_count=2, style="instructions", hard_negative_count=4
            )
        )
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([h["hard_negatives"] for h in halves]), batch["hard_negatives"])
    assert "hard_negatives" not in next(captioned_scenes.batches(0, 2))


def test_contrastive_loss_with_hard_negatives_by_hand():
    """Each image's own negatives join its row of image -> caption logits; padded ones never compete."""
    images = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
    texts = jnp.asarray([[3.0, 0.0], [1.0, 1.0]])
    negatives = jnp.asarray([[[1.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [5.0, 5.0]]])  # (images, 2, P)
    valid = jnp.asarray([[True, True], [True, False]])
    loss, accuracy = contrastive_loss(images, texts, jnp.float32(np.log(10.0)), negatives, valid)
    cos = np.array([[1.0, np.sqrt(0.5)], [0.0, np.sqrt(0.5)]])  # (images, captions)
    rows = [np.r_[cos[0], np.sqrt(0.5), 0.0], np.r_[cos[1], 0.0]]  # image 1's second negative is padding

    def cross_entropy(rows):
        return np.mean([np.log(np.exp(10 * np.asarray(r)).sum()) - 10 * r[i] for i, r in enumerate(rows)])

    np.testing.assert_allclose(float(loss), (cross_entropy(rows) + cross_entropy(cos.T)) / 2, rtol=1e-6)
    assert float(accuracy) == 1.0
    none_valid = contrastive_loss(images, texts, jnp.float32(np.log(10.0)), negatives, jnp.zeros((2, 2), bool))
    np.testing.assert_allclose(float(none_valid[0]), float(contrastive_loss(images, texts, np.log(10.0))[0]))


def test_word_pick_questions_and_accuracy():
    scene = _scene(("circle", "red"), ("square", "blue"))
    rows, captions, truth, count = word_pick_questions([(scene, [1, 0])], "shape")
    assert count == 4 and list(rows) == [0, 0] and list(truth) == [0, 1]
    assert captions[:4] == [f"a blue square and a red {s} on a white background" for s in shapes.SHAPES]
    _, captions, truth, count = word_pick_questions([(scene, [0, 1])], "colour")
    assert count == 6 and captions[5] == "an orange circle and a blue square on a white background"
    assert list(truth) == [0, 2]
    variants = np.zeros((2, 4, 2))
    variants[0, 0] = variants[1, 2] = [1.0, 0.0]  # the first question's truth scores highest, the second's not
    assert pick_accuracy(np.array([[1.0, 0.0], [1.0, 0.0]]), variants + 1e-3, np.array([0, 1])) == 0.5


def test_shape_word_similarity_known_answers():
    """The tool's cosine is 0 for an encoder whose output at a token is that token's one-hot vector, and 1 for one
    that ignores its input; a context whose slot is not a word of its own is an error."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from shape_word_similarity import shape_word_similarity

    from ip2p_jax.weights import load_tokenizer

    tokenizer = load_tokenizer("models/shapes-clip", subfolder="")
    one_hot = lambda ids: np.eye(len(tokenizer))[ids]  # noqa: E731
    assert shape_word_similarity(one_hot, tokenizer, "make the {} blue") == (0.0, 0.0)
    constant = lambda ids: np.ones((*ids.shape, 4))  # noqa: E731
    mean, largest = shape_word_similarity(constant, tokenizer, "remove the {}")
    assert mean == pytest.approx(1.0) and largest == pytest.approx(1.0)
    with pytest.raises(ValueError, match="a word of its own"):
        shape_word_similarity(one_hot, tokenizer, "make the {}s blue")


def test_vision_shape_probe_runs_both_probes(capsys, tmp_path):
    """tools/vision_shape_probe.py on the shipped CLIP: the linear read-out reports an accuracy per shape beside its
    base rate; the supervised probe trains a few steps and reports the held-out accuracy; with ``--save`` it starts
    from the folder's weights and writes a CLIP whose vision tower alone changed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import vision_shape_probe

    vision_shape_probe.main(["--linear", "--scenes", "200"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(shapes.SHAPES)
    assert all("held-out accuracy" in line and "base rate" in line for line in lines)
    vision_shape_probe.main(["--train", "--steps", "2", "--batch", "4", "--every", "1", "--patch-size", "16"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"]
    with pytest.raises(SystemExit):
        vision_shape_probe.main(["--train", "--steps", "0"])
    with pytest.raises(SystemExit):
        vision_shape_probe.main(["--linear", "--save", str(tmp_path / "x")])

    import numpy as np
    from flax import traverse_util

    from ip2p_jax.weights import load_clip

    vision_shape_probe.main(["--train", "--steps", "1", "--batch", "4", "--save", str(tmp_path / "clip")])
    capsys.readouterr()
    _, before = load_clip(vision_shape_probe.DEFAULT_MODEL)
    _, after = load_clip(tmp_path / "clip")
    before, after = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
    assert before.keys() == after.keys()
    changed = {path[0] for path in before if not np.array_equal(before[path], after[path])}
    assert changed == {"vision_model"}, changed
