"""``evaluate.py`` against known answers: its real code path (data loading, batching, ``edit_batch``, judging,
aggregation, the table, the JSON record and the grid) run with fake pipelines whose edits are known exactly.

The fakes replace ``InstructPix2PixPipeline.from_pretrained``; they look each input picture up in ShapesEdit's small
test splits drawn by the generator itself (``shapes_edit.draw``, not through TFDS), check that the call carries that
example's instruction (IP2P) or its sub-instructions with their keywords (FoI), and answer with the ground-truth edit,
the input, or an edit chosen per method. The figures evaluate.py must then report are known without its judge: the
ground truth carries out every instruction and changes nothing outside the regions (test examples never leak), a
picture moved by ``c`` levels outside the regions has an outside change of exactly ``c`` and a PSNR of
``20 log10(255 / c)``, and the true regions at the mask resolution have an IoU of 1.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import evaluate
from ip2p_jax.data import shapes_edit
from ip2p_jax.data.shapes import EDIT_KINDS
from ip2p_jax.foi import FoIConfig, mask_size
from ip2p_jax.pipeline import InstructPix2PixPipeline

SMALL = next(config for config in shapes_edit.ShapesEdit.BUILDER_CONFIGS if config.name == "small")
LIMIT, BATCH, SEED, STEPS = 6, 4, 5, 3  # two batches per split (4 + 2): seeds SEED and SEED + 1
LATENT = (16, 16)  # the fake model's latent of a 64 px picture (a VAE that downsamples 4x, as the shipped model's)
MODEL_FOI = {"mask_downsample": 2}  # the fake model's foi_config.json: masks at 8 x 8
FOI_METHODS = ("foi", "foi_no_modulation", "foi_no_decoupled_guidance")


def _examples() -> dict[bytes, tuple[str, int, object]]:
    """Every example of the small config's test splits, by its input picture's bytes."""
    table = {}
    for split in evaluate.DEFAULT_SPLITS:
        for index in range(SMALL.num_test):
            example = shapes_edit.draw(SMALL, split, index)
            table[example.input_image.tobytes()] = (split, index, example)
    assert len(table) == len(evaluate.DEFAULT_SPLITS) * SMALL.num_test, "two examples share an input picture"
    return table


EXAMPLES = _examples()
SMALL_INDEX = {key: index for key, (_, index, _) in EXAMPLES.items()}


def example(split: str, index: int):
    return shapes_edit.draw(SMALL, split, index)


def true_masks(example, size: tuple[int, int]) -> np.ndarray:
    """``(K, h, w)`` float32: each region at the mask resolution, a cell inside when at least half its pixels are."""
    regions = np.asarray(example.regions)
    k, height, width = regions.shape
    cells = regions.reshape(k, size[0], height // size[0], size[1], width // size[1]).mean(axis=(2, 4))
    return (cells >= 0.5).astype(np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a > 0, b > 0).sum()
    return 1.0 if union == 0 else float(np.logical_and(a > 0, b > 0).sum() / union)


def moved_outside(picture: np.ndarray, example, levels: int) -> np.ndarray:
    """``picture`` with every value outside the example's regions moved by exactly ``levels`` (down where it is
    bright, up where it is dark, so nothing clips)."""
    out = picture.astype(np.float64)
    outside = ~np.asarray(example.mask)
    out[outside] = np.where(out[outside] > 127, out[outside] - levels, out[outside] + levels)
    return out


class FakePipeline:
    """Answers ``evaluate.edit_batch``'s calls with ``policy(method, example, mask_size) -> (picture, masks)``:
    a ``(64, 64, 3)`` picture in levels of 255 and, for FoI, ``(K, h, w)`` masks. Records every call."""

    def __init__(self, policy):
        self.policy = policy
        self.calls = []

    def __call__(self, image, prompt=None, *, strength=None, instructions=None, foi=None, **common):
        found = [EXAMPLES[np.asarray(picture).tobytes()] for picture in image]
        examples = [e for _, _, e in found]
        if instructions is None:
            assert foi is None and strength in (1.0, 0.8), (foi, strength)
            method = "ip2p" if strength == 1.0 else "ip2p_strength_0.8"
            assert list(prompt) == [e.instruction for e in examples]  # each picture with its own instruction
        else:
            assert prompt is None and strength is None and isinstance(foi, FoIConfig)
            method = "foi"
            if not foi.modulation:
                method = "foi_no_modulation"
            elif not foi.decoupled_guidance:
                method = "foi_no_decoupled_guidance"
            expected = [[(edit.instruction, edit.keyword) for edit in e.edits] for e in examples]
            assert [list(map(tuple, subs)) for subs in instructions] == expected
        self.calls.append(dict(method=method, examples=[(s, i) for s, i, _ in found], foi=foi, **common))
        size = mask_size(LATENT, foi.mask_downsample) if foi else None
        answers = [self.policy(method, e, size) for e in examples]
        images = np.stack([picture for picture, _ in answers]) / 255.0
        masks = None if foi is None else [{"latent": m} for _, m in answers]
        return SimpleNamespace(images=images, masks=masks)


def run_evaluate(tmp_path_factory, data_dir: str, policy, *extra: str) -> tuple[dict, FakePipeline, object]:
    """``evaluate.main`` over both small test splits with a fake pipeline; returns (results.json, fake, out dir)."""
    model = tmp_path_factory.mktemp("fake-model")
    (model / "foi_config.json").write_text(json.dumps(MODEL_FOI))
    out = tmp_path_factory.mktemp("evaluation")
    fake = FakePipeline(policy)

    def from_pretrained(cls, path, **kwargs):
        assert str(path) == str(model)
        return fake

    argv = ["--model", str(model), "--config.data.dataset=shapes_edit/small", f"--config.data.data_dir={data_dir}"]
    argv += ["--out", str(out), f"--config.data.limit={LIMIT}", f"--config.sample.batch={BATCH}"]
    argv += [f"--config.sample.seed={SEED}", f"--config.sample.steps={STEPS}", *extra]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InstructPix2PixPipeline, "from_pretrained", classmethod(from_pretrained))
        assert evaluate.main(argv) == 0
    return json.loads((out / "results.json").read_text()), fake, out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir where evaluate.py builds ShapesEdit's small config on first use."""
    return str(tmp_path_factory.mktemp("tfds"))


def ground_truth(method, example, size):
    return example.edited_image, None if size is None else true_masks(example, size)


def unedited(method, example, size):
    return example.input_image, None if size is None else np.zeros((len(example.edits), *size), np.float32)


# What each method's fake edit is: (base picture, levels moved outside the regions, masks).
PER_METHOD = {
    "ip2p": ("input", 1, None),
    "ip2p_strength_0.8": ("truth", 2, None),
    "foi": ("truth", 0, "true"),
    "foi_no_modulation": ("input", 3, "reversed"),
    "foi_no_decoupled_guidance": ("first", 4, "empty"),  # the first instruction carried out, the others not
}


def per_method(method, example, size):
    base, levels, masks = PER_METHOD[method]
    picture = {"truth": example.edited_image, "input": example.input_image}.get(base)
    if base == "first":
        picture = example.input_image.copy()
        picture[example.regions[0]] = example.edited_image[example.regions[0]]
    picture = moved_outside(picture, example, levels)
    if masks is None:
        return picture, None
    truth = true_masks(example, size)
    return picture, {"true": truth, "reversed": truth[::-1], "empty": np.zeros_like(truth)}[masks]


@pytest.fixture(scope="module")
def truth_run(tmp_path_factory, data_dir):
    return run_evaluate(tmp_path_factory, data_dir, ground_truth, "--config.foi.gamma=1")


@pytest.fixture(scope="module")
def unedited_run(tmp_path_factory, data_dir):
    return run_evaluate(tmp_path_factory, data_dir, unedited)


@pytest.fixture(scope="module")
def per_method_run(tmp_path_factory, data_dir):
    return run_evaluate(tmp_path_factory, data_dir, per_method)


def evaluated(fake: FakePipeline, split: str) -> list:
    """The examples evaluate.py judged in ``split``, in its order (TFDS's, not the index order), as the fake saw
    them; every method saw the same ones in the same order."""
    seen = {}
    for call in fake.calls:
        if call["examples"][0][0] == split:
            seen.setdefault(call["method"], []).extend(index for _, index in call["examples"])
    orders = {tuple(order) for order in seen.values()}
    assert len(orders) == 1 and set(seen) == set(evaluate.METHODS), seen
    (order,) = orders
    assert len(order) == LIMIT
    return [example(split, index) for index in order]


def test_the_ground_truth_scores_perfectly(truth_run):
    """The ground-truth edit with the true masks at FoI's mask resolution: 100 % success per instruction and for
    every example, no change outside the regions (PSNR infinite), mask IoU 1 for every sub-instruction."""
    record, fake, _ = truth_run
    for split in evaluate.DEFAULT_SPLITS:
        for method in evaluate.METHODS:
            summary = record["results"][split][method]
            assert summary["examples"] == LIMIT
            assert summary["edit_success"] == 1.0 and summary["all_success"] == 1.0, (split, method)
            assert summary["outside_change"] == 0.0 and summary["outside_psnr"] == math.inf, (split, method)
            assert summary.get("mask_iou") == (1.0 if method in FOI_METHODS else None), (split, method)
            for figures, e in zip(record["per_example"][split][method], evaluated(fake, split), strict=True):
                assert figures["success"] == [True] * len(e.edits)
                if method in FOI_METHODS:
                    assert figures["mask_iou"] == [1.0] * len(e.edits)


def test_the_calls_carry_the_settings(truth_run, data_dir):
    """Each method is called on the split's first ``--limit`` examples in TFDS's order, once per batch of ``--batch``,
    batch ``b`` with seed ``--seed + b``, ``--steps`` and the default guidance scales; every FoI method gets the
    model's foi_config.json with the ``--foi`` override, the ablations with their switch off; IP2P at strength 1 and
    at FoI's strength (checked by the fake)."""
    import tensorflow_datasets as tfds

    record, fake, _ = truth_run
    expected = []
    for split in evaluate.DEFAULT_SPLITS:
        dataset = tfds.builder("shapes_edit/small", data_dir=data_dir).as_dataset(split=split, shuffle_files=False)
        order = [(split, SMALL_INDEX[e["input_image"].tobytes()]) for e in tfds.as_numpy(dataset.take(LIMIT))]
        for method in evaluate.METHODS:
            expected += [(method, order[:BATCH], SEED), (method, order[BATCH:], SEED + 1)]
    assert [(c["method"], c["examples"], c["seed"]) for c in fake.calls] == expected
    for call in fake.calls:
        assert (call["num_inference_steps"], call["guidance_scale"], call["image_guidance_scale"]) == (STEPS, 7.5, 1.5)
        if call["method"] in FOI_METHODS:
            switches = {
                "foi_no_modulation": dict(modulation=False),
                "foi_no_decoupled_guidance": dict(decoupled_guidance=False),
            }.get(call["method"], {})
            assert call["foi"] == FoIConfig(**MODEL_FOI, gamma=1, **switches)
    assert record["settings"]["foi"] == {**record["settings"]["foi"], **MODEL_FOI, "gamma": 1}


def test_the_unedited_input_carries_out_nothing(unedited_run):
    """The input returned unchanged with empty masks: every recolouring and removal fails, nothing changes outside
    the regions, and an empty mask has IoU 0 with every region that covers a cell. (Reshapes: below.)"""
    record, fake, _ = unedited_run
    for split in evaluate.DEFAULT_SPLITS:
        for method in evaluate.METHODS:
            summary = record["results"][split][method]
            assert summary["outside_change"] == 0.0 and summary["outside_psnr"] == math.inf
            for figures, e in zip(record["per_example"][split][method], evaluated(fake, split), strict=True):
                kinds = [edit.kind for edit in e.edits]
                assert not any(s for s, kind in zip(figures["success"], kinds, strict=True) if kind != "reshape")
                if method in FOI_METHODS:
                    truth = true_masks(e, mask_size(LATENT, MODEL_FOI["mask_downsample"]))
                    assert figures["mask_iou"] == [0.0 if t.any() else 1.0 for t in truth]
        assert record["results"][split]["ip2p"]["edit_success"] < 0.5


def test_an_unedited_reshape_is_no_success(unedited_run):
    """The picture left as it was carries out no instruction, reshapes included: example 2 of the small test_single
    split turns a square into a circle of the same centre and size, the circle covers about 84 % of the square, and
    the unedited square agrees with the target on that much of the union; judge version 2 also asks that the
    square's own pixels become background. The record names the judge."""
    record, fake, _ = unedited_run
    assert record["settings"]["judge_version"] == 2
    for split in evaluate.DEFAULT_SPLITS:
        assert record["results"][split]["ip2p"]["edit_success"] == 0.0, split


def test_each_method_row_comes_from_its_own_edits(per_method_run):
    """Each method gets a different known edit: its row reports that edit's figures (outside change exactly the
    levels it moved, its PSNR, success 1 for the ground truth, 0 for every recolouring and removal of the input, the
    first instruction's success where only it is carried out; per instruction and per example aggregated as such)
    and its own masks: the true ones (IoU 1), the same in reverse order (the IoU of each region with another's mask,
    so each sub-instruction is judged against its own region) or none."""
    record, fake, _ = per_method_run
    size = mask_size(LATENT, MODEL_FOI["mask_downsample"])
    reversed_below_one = 0
    for split in evaluate.DEFAULT_SPLITS:
        for method, (base, levels, masks) in PER_METHOD.items():
            summary = record["results"][split][method]
            assert summary["outside_change"] == levels, (split, method)
            psnr = math.inf if levels == 0 else 20 * math.log10(255 / levels)
            assert summary["outside_psnr"] == pytest.approx(psnr, rel=1e-12), (split, method)
            if base == "truth":
                assert summary["edit_success"] == 1.0 and summary["all_success"] == 1.0, (split, method)
            for figures, e in zip(record["per_example"][split][method], evaluated(fake, split), strict=True):
                if base == "first":
                    assert figures["success"][0], (split, method)
                if base == "input":
                    kinds = [edit.kind for edit in e.edits]
                    assert not any(s for s, kind in zip(figures["success"], kinds, strict=True) if kind != "reshape")
                if masks is None:
                    assert "mask_iou" not in figures
                    continue
                truth = true_masks(e, size)
                predicted = {"true": truth, "reversed": truth[::-1], "empty": np.zeros_like(truth)}[masks]
                expected = [iou(p, t) for p, t in zip(predicted, truth, strict=True)]
                assert figures["mask_iou"] == pytest.approx(expected, rel=1e-12), (split, method)
                reversed_below_one += masks == "reversed" and min(expected) < 1.0
            per_example = record["per_example"][split][method]
            instructions = [s for f in per_example for s in f["success"]]
            assert summary["edit_success"] == pytest.approx(np.mean(instructions), rel=1e-12), (split, method)
            assert summary["all_success"] == pytest.approx(np.mean([all(f["success"]) for f in per_example]), rel=1e-12)
            if masks is not None:
                mean = np.mean([x for f in per_example for x in f["mask_iou"]])
                assert summary["mask_iou"] == pytest.approx(mean, rel=1e-12)
    assert reversed_below_one > 0, "no example where the order of the masks matters"
    partial = record["results"]["test_multi"]["foi_no_decoupled_guidance"]
    assert partial["edit_success"] > partial["all_success"], "per instruction and per example must differ here"


def test_the_grid_shows_each_method_and_its_masks(per_method_run):
    """examples.png, per split, its first 4 examples: input | ground truth | FoI's masks (3 tiles, the true masks
    over the input in order, blank past the example's last) | the ip2p method's edit | the foi method's edit, 3x."""
    _, fake, out = per_method_run
    grid = np.asarray(Image.open(out / "examples.png"))[:: evaluate.ENLARGE, :: evaluate.ENLARGE].astype(np.float64)
    size = mask_size(LATENT, MODEL_FOI["mask_downsample"])
    row = 0
    for split in evaluate.DEFAULT_SPLITS:
        for e in evaluated(fake, split)[: evaluate.GRID_EXAMPLES]:
            tiles = [grid[row * 64 : (row + 1) * 64, j * 64 : (j + 1) * 64] for j in range(7)]
            masks = true_masks(e, size)
            expected = [e.input_image, e.edited_image]
            for k in range(3):
                if k < len(masks):
                    inside = np.kron(masks[k], np.ones((64 // size[0], 64 // size[1])))[..., None]
                    over = inside * (0.5 * e.input_image + 0.5 * np.array([255, 40, 40])) + (1 - inside) * 0.35 * (
                        e.input_image
                    )
                    expected.append(over)
                else:
                    expected.append(np.full((64, 64, 3), 255.0))
            expected += [per_method("ip2p", e, None)[0], per_method("foi", e, size)[0]]
            for j, (tile, want) in enumerate(zip(tiles, expected, strict=True)):
                np.testing.assert_array_equal(tile, np.clip(np.round(want), 0, 255), err_msg=f"{split} row {row} {j}")
            row += 1
    assert grid.shape[0] == row * 64


def test_the_table_lists_every_row(per_method_run):
    """results.md: one row per split and method with that row's figures."""
    record, _, out = per_method_run
    lines = (out / "results.md").read_text().splitlines()[2:]
    assert len(lines) == len(evaluate.DEFAULT_SPLITS) * len(evaluate.METHODS)
    for line, (split, method) in zip(
        lines, [(s, m) for s in evaluate.DEFAULT_SPLITS for m in evaluate.METHODS], strict=True
    ):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        summary = record["results"][split][method]
        assert cells[0] == f"{split} ({LIMIT})" and cells[1] == method
        assert cells[8] == f"{summary['outside_change']:.2f}" == f"{PER_METHOD[method][1]:.2f}"
        for kind, cell in zip(EDIT_KINDS, cells[4:8], strict=True):
            share = summary["success_by_kind"].get(kind)
            assert cell == ("-" if share is None else f"{100 * share:.0f} %"), (split, method, kind)


def test_success_by_kind_aggregates_each_kind(per_method_run):
    """Per kind of edit, the share of that kind's instructions carried out, from the per-example figures."""
    record, fake, _ = per_method_run
    for split in evaluate.DEFAULT_SPLITS:
        examples = evaluated(fake, split)
        for method in evaluate.METHODS:
            by_kind = {}
            for figures, e in zip(record["per_example"][split][method], examples, strict=True):
                assert figures["kinds"] == [edit.kind for edit in e.edits]
                for kind, success in zip(figures["kinds"], figures["success"], strict=True):
                    by_kind.setdefault(kind, []).append(success)
            expected = {kind: pytest.approx(np.mean(found), rel=1e-12) for kind, found in by_kind.items()}
            assert record["results"][split][method]["success_by_kind"] == expected, (split, method)


def test_the_fit_split_and_the_references(tmp_path_factory, data_dir):
    """``train_fit`` takes the training split's non-leaky examples; the references run no model: the ground truth
    carries out every instruction of every kind with no change outside (which a leaky example's target would fail),
    the input no recolouring or removal."""
    import tensorflow_datasets as tfds

    limit = 8  # all of the small test_single
    extra = [f"--config.data.limit={limit}", "--config.data.splits=train_fit,test_single"]
    record, fake, out = run_evaluate(
        tmp_path_factory, data_dir, ground_truth, *extra, "--config.methods=ground_truth,input"
    )
    train = tfds.builder("shapes_edit/small", data_dir=data_dir).as_dataset(split="train", shuffle_files=False)
    assert any(e["leak"] for e in tfds.as_numpy(train.take(limit))), "no leaky example to leave out"
    assert fake.calls == []
    for split in ("train_fit", "test_single"):
        truth, unedited = record["results"][split]["ground_truth"], record["results"][split]["input"]
        assert truth["examples"] == limit and truth["outside_change"] == 0.0, split
        assert set(truth["success_by_kind"].values()) == {1.0} and truth["edit_success"] == 1.0, split
        assert unedited["outside_change"] == 0.0
        assert all(unedited["success_by_kind"].get(kind, 0.0) == 0.0 for kind in ("recolour", "remove")), split
    assert "| train_fit (8) | ground_truth | 100.0 % |" in (out / "results.md").read_text()


def test_a_batch_smaller_than_the_grid(tmp_path_factory, data_dir):
    """A batch of 2 with more examples than that: the evaluation completes (the grid shows what it has)."""
    extra = ["--config.data.limit=3", "--config.sample.batch=2", "--config.methods=ip2p,foi"]
    extra += ["--config.data.splits=test_single"]
    record, _, out = run_evaluate(tmp_path_factory, data_dir, ground_truth, *extra)
    assert record["results"]["test_single"]["foi"]["examples"] == 3
    grid = np.asarray(Image.open(out / "examples.png"))
    assert grid.shape[0] == 2 * 64 * 3  # the first batch's two examples, 64 px enlarged 3x


class FakeMultiPipeline:
    """Answers the multi-instruction methods as a perfect editor would: each call's pictures are looked up among the
    small test splits' inputs and the pictures it has returned before, each instruction asked for is carried out
    exactly on its own region (in order: a sequential pass must start from the previous pass's picture), and FoI
    returns the true masks, after checking that masks given are the true regions. Records every call."""

    def __init__(self):
        self.known = {key: (example, 0) for key, (_, _, example) in EXAMPLES.items()}
        self.calls = []

    def __call__(self, image, prompt=None, *, strength=None, instructions=None, foi=None, masks=None, **common):
        found = [self.known[np.asarray(picture).tobytes()] for picture in image]
        texts = list(prompt) if instructions is None else [[text for text, _ in subs] for subs in instructions]
        self.calls.append(dict(texts=texts, foi=foi, masks=masks, strength=strength))
        size = mask_size(LATENT, foi.mask_downsample) if foi else None
        pictures, out_masks = [], []
        for position, ((example, done), picture) in enumerate(zip(found, image, strict=True)):
            asked = [texts[position]] if isinstance(texts[position], str) else texts[position]
            assert asked == [e.instruction for e in example.edits[done : done + len(asked)]], (asked, done)
            edited = np.asarray(picture).copy()
            for k in range(done, done + len(asked)):
                edited[example.regions[k]] = example.edited_image[example.regions[k]]
            if masks is not None:
                np.testing.assert_array_equal(masks[position], example.regions)
            self.known[edited.tobytes()] = (example, done + len(asked))
            pictures.append(edited)
            regions = example.regions[done : done + len(asked)]
            out_masks.append({"latent": true_masks(SimpleNamespace(regions=regions), size) if foi else None})
        return SimpleNamespace(images=np.stack(pictures) / 255.0, masks=out_masks if foi else None)


def test_the_multi_instruction_methods(tmp_path_factory, data_dir):
    """A perfect editor reaches 100 % with no change outside by every multi-instruction method: the true regions
    reach FoI as its masks, the per-instruction methods set ``text_branches``, and the sequential methods edit one
    instruction a pass, each pass from the last one's picture (test_multi has up to three)."""
    model = tmp_path_factory.mktemp("fake-model")
    (model / "foi_config.json").write_text(json.dumps(MODEL_FOI))
    out = tmp_path_factory.mktemp("evaluation")
    fake = FakeMultiPipeline()
    argv = ["--model", str(model), "--config.data.dataset=shapes_edit/small", f"--config.data.data_dir={data_dir}"]
    argv += ["--out", str(out), f"--config.data.limit={LIMIT}", f"--config.sample.batch={BATCH}"]
    argv += ["--config.data.splits=test_multi", "--config.methods=" + ",".join(evaluate.MULTI_METHODS)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InstructPix2PixPipeline, "from_pretrained", classmethod(lambda cls, path, **kw: fake))
        assert evaluate.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    for method in evaluate.MULTI_METHODS:
        summary = record["results"]["test_multi"][method]
        assert summary["all_success"] == 1.0 and summary["outside_change"] == 0.0, method
        if method.startswith("foi"):
            assert summary["mask_iou"] == 1.0, method
    per_instruction = [c for c in fake.calls if c["foi"] is not None and c["foi"].text_branches == "per_instruction"]
    assert len(per_instruction) == 2 * 2  # two methods, two batches
    assert sum(c["masks"] is not None for c in fake.calls) == 3 * 2  # the three true-mask methods
    ip2p_passes = [c for c in fake.calls if c["foi"] is None]
    model_foi = FoIConfig.for_model(model)
    assert model_foi.text_branches == "composite"  # so foi_composite's calls are the model's settings'
    composite = [c for c in fake.calls if c["foi"] == model_foi and c["masks"] is None]
    foi_passes = [c for c in composite if all(len(texts) == 1 for texts in c["texts"])]
    assert len(composite) - len(foi_passes) == 2  # foi_composite: two batches of several instructions each
    assert len(ip2p_passes) == len(foi_passes) >= 2 * 2  # at least two passes of each of the two batches
    assert any(len(c["texts"]) < BATCH for c in ip2p_passes[:-1]), "a pass that skips examples with fewer"
    assert max(len(e.edits) for e in (example("test_multi", i) for i in range(LIMIT))) == 3

    # methods.png: input | ground truth | the true regions over the input | each method's edit, in the order run
    # (a perfect editor's edits are the ground truth), for the first batch's first examples.
    methods = np.asarray(Image.open(out / "methods.png"))[:: evaluate.ENLARGE, :: evaluate.ENLARGE].astype(np.float64)
    shown = min(BATCH, evaluate.GRID_EXAMPLES)
    assert methods.shape == (shown * 64, (3 + len(evaluate.MULTI_METHODS)) * 64, 3)
    for row in range(shown):
        tiles = [methods[row * 64 : (row + 1) * 64, j * 64 : (j + 1) * 64] for j in range(methods.shape[1] // 64)]
        split, _, e = EXAMPLES[tiles[0].astype(np.uint8).tobytes()]  # the input picture names the example
        assert split == "test_multi"
        union = np.asarray(e.regions).max(axis=0)[..., None]
        over = union * (0.5 * e.input_image + 0.5 * np.array([255, 40, 40])) + (1 - union) * 0.35 * e.input_image
        np.testing.assert_array_equal(tiles[2], np.round(over))
        for j, tile in enumerate([tiles[1], *tiles[3:]]):
            np.testing.assert_array_equal(tile, e.edited_image, err_msg=f"row {row} tile {j}")


def test_an_interrupted_evaluation_keeps_the_methods_it_finished(tmp_path_factory, data_dir):
    """results.json and results.md are written after every method: stopped during FoI (here by Ctrl-C in its first
    batch), the evaluation still has IP2P's figures on disk."""

    def interrupted_at_foi(method, example, size):
        if method.startswith("foi"):
            raise KeyboardInterrupt
        return ground_truth(method, example, size)

    model = tmp_path_factory.mktemp("fake-model")
    out = tmp_path_factory.mktemp("interrupted")
    argv = ["--model", str(model), "--config.data.dataset=shapes_edit/small", f"--config.data.data_dir={data_dir}"]
    argv += ["--out", str(out), f"--config.data.limit={LIMIT}", f"--config.sample.batch={BATCH}"]
    argv += ["--config.methods=ip2p,foi", "--config.data.splits=test_single"]
    fake = FakePipeline(interrupted_at_foi)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InstructPix2PixPipeline, "from_pretrained", classmethod(lambda cls, path, **kw: fake))
        with pytest.raises(KeyboardInterrupt):
            evaluate.main(argv)
    record = json.loads((out / "results.json").read_text())
    assert list(record["results"]["test_single"]) == ["ip2p"]
    assert record["results"]["test_single"]["ip2p"]["all_success"] == 1.0
    assert "| ip2p |" in (out / "results.md").read_text() and not (out / "examples.png").exists()
