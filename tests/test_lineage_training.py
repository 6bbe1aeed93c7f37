"""The miniature lineage's training tasks: CLIP (contrastive), text-to-image with the grounding objective, and word
localisation as FoI's masks see it."""

from __future__ import annotations

import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.evaluation.localisation import localisation, noised_maps
from ip2p_jax.models.attention import AttentionControl
from ip2p_jax.training.clip import contrastive_loss, retrieval_top1
from ip2p_jax.training.grounding import grounding_losses, region_shares


def test_contrastive_loss_by_hand():
    images = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
    texts = jnp.asarray([[3.0, 0.0], [1.0, 1.0]])
    scale = np.log(10.0)
    loss, accuracy = contrastive_loss(images, texts, jnp.float32(scale))
    cos = np.array([[1.0, np.sqrt(0.5)], [0.0, np.sqrt(0.5)]])  # (images, captions)
    logits = 10.0 * cos

    def cross_entropy(rows):
        return np.mean([np.log(np.exp(r).sum()) - r[i] for i, r in enumerate(rows)])

    np.testing.assert_allclose(float(loss), (cross_entropy(logits) + cross_entropy(logits.T)) / 2, rtol=1e-6)
    assert float(accuracy) == 1.0
    # logit_scale is clipped at log(100), as CLIP's.
    clipped, _ = contrastive_loss(images, texts, jnp.float32(10.0))
    np.testing.assert_allclose(float(clipped), float(contrastive_loss(images, texts, jnp.float32(np.log(100)))[0]))
    assert retrieval_top1(np.eye(3), np.eye(3)[[0, 2, 1]]) == {"caption_to_image": 1 / 3, "image_to_caption": 1 / 3}


@pytest.mark.parametrize("hard_negatives", [0, 3])
def test_clip_step_learns_a_batch(tmp_path, hard_negatives):
    """A few contrastive steps on one batch of captioned scenes, plain, and with hard negatives and the word-presence
    term: the loss falls (both terms) and the temperature trains. Token ids trimmed of padding (``trim_padding``)
    give the same text embeddings."""
    from ip2p_jax.data import captioned_scenes
    from ip2p_jax.data.shapes import WORDS
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training.clip import CLIPSettings, clip_step, trim_padding
    from ip2p_jax.training.new_model import write_new_clip
    from ip2p_jax.training.state import create_train_state, make_optimizer
    from ip2p_jax.weights import load_clip, load_tokenizer

    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(text, image_size=64, patch_size=16)
    folder = write_new_clip(tmp_path / "clip", text=text, vision=vision, projection_dim=8, words=WORDS, seed=0)
    clip, params = load_clip(folder)
    tokenizer = load_tokenizer(folder, subfolder="")
    rows = next(captioned_scenes.batches(0, 8, style="instructions", hard_negative_count=hard_negatives))
    ids = tokenize(tokenizer, list(rows["caption"]))
    trimmed = trim_padding(ids, clip.config.text.eos_token_id)
    assert trimmed.shape[1] in (16, 32, 48)
    features = lambda ids: clip.apply({"params": params}, ids, method="get_text_features")  # noqa: E731
    np.testing.assert_allclose(features(trimmed), features(ids), rtol=1e-5, atol=1e-6)
    batch = {"pixel_values": jnp.asarray(rows["image"]), "input_ids": jnp.asarray(trimmed)}  # any normalisation
    if hard_negatives:
        negatives = tokenize(tokenizer, list(rows["hard_negatives"].reshape(-1)))[:, : trimmed.shape[1]]
        batch["negative_input_ids"] = jnp.asarray(negatives.reshape(8, hard_negatives, -1))
        batch["negative_valid"] = jnp.asarray(rows["hard_negative_valid"])
    frozen, presence_weight = {}, 0.0
    if hard_negatives:
        presence_weight = 2.0
        words = tokenize(tokenizer, ["circle", "square", "triangle", "diamond"])
        frozen["presence_input_ids"] = jnp.asarray(trim_padding(words, clip.config.text.eos_token_id))
        batch["shapes_present"] = jnp.asarray(rows["shapes_present"])
    tx = make_optimizer(3e-3, weight_decay=0.0)
    settings = CLIPSettings(clip, tx, presence_weight=presence_weight)
    step = jax.jit(lambda state: clip_step(state, batch, None, frozen, settings))
    state = create_train_state(params, tx)
    history = []
    for _ in range(8):
        state, metrics = step(state)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], history
    if presence_weight:
        first = history[0]
        assert first["loss"] == pytest.approx(first["contrastive_loss"] + 2.0 * first["presence_loss"], rel=1e-6)
        # the least it can be: the entropy of each image's target (uniform over the shapes it holds)
        floor = float(np.mean(np.log(rows["shapes_present"].sum(axis=1))))
        excess = [h["presence_loss"] - floor for h in history]
        assert all(b < a for a, b in itertools.pairwise(excess)) and excess[-1] < 0.85 * excess[0], (floor, excess)
    assert float(metrics["logit_scale"]) != pytest.approx(2.6592)  # the temperature trains too


def test_word_presence_loss_by_hand():
    """Two images, two words: the first holds both words, the second only the second."""
    from ip2p_jax.training.clip import word_presence_loss

    images = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    words = jnp.asarray([[2.0, 0.0], [0.0, 3.0]])  # cosines: the identity
    present = jnp.asarray([[True, True], [False, True]])
    loss = word_presence_loss(images, words, jnp.float32(np.log(10.0)), present)
    log_softmax = 10.0 * np.eye(2) - np.log(np.exp(10.0) + 1.0)
    expected = (-(0.5 * log_softmax[0, 0] + 0.5 * log_softmax[0, 1]) - log_softmax[1, 1]) / 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def _planted(region_bghw: np.ndarray, size, tokens=8) -> np.ndarray:
    """Maps ``(B, h, w, T)`` whose token ``g + 1`` takes all the attention of the cells of word ``g``'s region."""
    shares = np.asarray(region_shares(jnp.asarray(region_bghw), size))
    batch, groups = shares.shape[:2]
    maps = np.zeros((batch, *size, tokens), np.float32)
    maps[..., 0] = 1.0 - shares.sum(axis=1)
    for g in range(groups):
        maps[..., g + 1] = shares[:, g]
    return maps


def _two_words():
    """One image, two words: a 6 x 6 px square (3 x 3 cells of 2 x 2 px at 8 x 8) and the rest."""
    regions = np.zeros((1, 2, 16, 16), bool)
    regions[0, 0, 4:10, 4:10] = True
    regions[0, 1] = ~regions[0, 0]
    weights = np.zeros((1, 2, 8), np.float32)
    weights[0, 0, 1] = weights[0, 1, 2] = 1.0
    return regions, weights, np.ones((1, 2), bool)


def test_grounding_losses_vanish_on_maps_inside_their_regions_and_not_otherwise():
    regions, weights, valid = _two_words()
    inside = {"layer": jnp.asarray(_planted(regions, (8, 8)))}
    terms = grounding_losses(inside, jnp.asarray(weights), jnp.asarray(regions), jnp.asarray(valid))
    assert float(terms["token"]) == pytest.approx(0.0, abs=1e-7)
    assert float(terms["pixel"]) == pytest.approx(0.0, abs=1e-5)
    shifted = {"layer": jnp.roll(inside["layer"], 3, axis=2)}  # the same maps, three cells to the right
    moved = grounding_losses(shifted, jnp.asarray(weights), jnp.asarray(regions), jnp.asarray(valid))
    assert float(moved["token"]) > 0.1 and float(moved["pixel"]) > 0.5
    # Words that do not count do not count.
    none = grounding_losses(shifted, jnp.asarray(weights), jnp.asarray(regions), jnp.zeros((1, 2), bool))
    assert float(none["token"]) == float(none["pixel"]) == 0.0
    # By hand: a uniform map has 9 of its 64 cells' mass inside the first word's region.
    uniform = {"layer": jnp.full((1, 8, 8, 8), 1 / 8)}
    first = grounding_losses(uniform, jnp.asarray(weights), jnp.asarray(regions), jnp.asarray([[True, False]]))
    np.testing.assert_allclose(float(first["token"]), (1 - 9 / 64) ** 2, rtol=1e-6)
    bce = -(9 * np.log(1 / 8) + 55 * np.log(7 / 8)) / 64
    np.testing.assert_allclose(float(first["pixel"]), bce, rtol=1e-5)


class _PlantedAttention(AttentionControl):
    """A stand-in UNet's only cross-attention layer hands out planted probabilities."""

    maps: jax.Array

    def probabilities(self, scores_bnqk, probs_bnqk, layer):
        return self.maps.reshape(scores_bnqk.shape[0], 1, -1, self.maps.shape[-1]), None


def test_localisation_finds_planted_maps():
    from ip2p_jax.models.attention import LayerInfo

    regions, weights, valid = _two_words()
    planted = _planted(regions, (8, 8))
    layer = LayerInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn2", "up", 0, 0, (8, 8), 1)

    def unet_apply(params, sample, timesteps, context, record):
        # The recording control sees the layer's probabilities as the real UNet would hand them over.
        scores = jnp.zeros((1, 1, 64, 8))
        probs = _PlantedAttention(jnp.asarray(planted)).probabilities(scores, jax.nn.softmax(scores), layer)[0]
        _, aux = record.probabilities(jnp.log(jnp.maximum(probs, 1e-30)), probs, layer)
        return sample, {layer.name: aux}

    latents = jnp.zeros((1, 8, 8, 4))
    maps = noised_maps(unet_apply, None, latents, latents, 500, 0.5, jnp.zeros((1, 8, 4)), (8, 8))
    np.testing.assert_allclose(np.asarray(maps), planted, atol=1e-6)
    # gamma 1: FoI's Gaussian filter leaves a 3 x 3 block's corners at 0.79 of its centre, which the paper's
    # gamma = 3 (0.79 ** 8 = 0.15) would cut at tau 0.5.
    found = localisation(np.asarray(maps), weights, regions, valid, gamma=1, tau=0.5)
    np.testing.assert_array_equal(found["iou"], [[1.0, 1.0]])
    assert found["inside_over_mean"][0, 0] == pytest.approx(64 / 9)  # 1 inside, 9 of 64 cells
    assert found["inside_over_mean"][0, 1] == pytest.approx(64 / 55)
    shifted = localisation(np.roll(np.asarray(maps), 3, axis=2), weights, regions, valid, gamma=1, tau=0.5)
    assert shifted["iou"][0, 0] == 0.0
    with pytest.raises(ValueError, match="no cross-attention layer of size"):
        noised_maps(lambda *a: (latents, {}), None, latents, latents, 500, 0.5, None, (4, 4))


def _run(argv, **kwargs):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=900, **kwargs)


TINY_CLIP = [
    "--config.new_model.clip.text.hidden_size=16",
    "--config.new_model.clip.text.intermediate_size=32",
    "--config.new_model.clip.text.num_hidden_layers=1",
    "--config.new_model.clip.vision.hidden_size=16",
    "--config.new_model.clip.vision.intermediate_size=32",
    "--config.new_model.clip.vision.num_hidden_layers=1",
    "--config.new_model.clip.vision.patch_size=16",
    "--config.new_model.clip.projection_dim=8",
]


@pytest.mark.slow
def test_clip_and_text_to_image_train_export_and_load(tmp_path):
    """The lineage end to end on tiny models: a CLIP trains, exports a folder that transformers loads and that
    equals ours; a text-to-image model trains over its text tower with the grounding objective, measures word
    localisation and exports a folder that diffusers loads; InstructPix2Pix fine-tunes from it (4 -> 8 channels),
    measures the keyword's localisation and exports an editing folder."""
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline
    from transformers import CLIPModel

    from ip2p_jax.weights import load_clip, load_tokenizer

    clip_run = ["train.py", "--config", "configs/shapes_clip.py", "--workdir", tmp_path / "clip", *TINY_CLIP]
    small = [
        "--config.steps=6",
        "--config.data.global_batch_size=16",
        "--config.log_every=1",
        "--config.checkpoint.every=6",
    ]
    run = _run(
        [*clip_run, *small, "--config.sample.every=6", "--config.eval.count=8", "--config.optim.learning_rate=3e-3"]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "caption_to_image" in run.stderr and "shape_pick" in run.stderr and "colour_pick" in run.stderr
    export = _run(["export.py", "--workdir", tmp_path / "clip", "--out", tmp_path / "clip-model"])
    assert export.returncode == 0, export.stderr[-3000:]

    module, params = load_clip(tmp_path / "clip-model")
    tokenizer = load_tokenizer(tmp_path / "clip-model", subfolder="")
    ids = tokenizer(
        ["a red circle on a white background", "a blue square and a green diamond on a gray background"],
        padding="max_length",
        max_length=77,
        return_tensors="np",
    ).input_ids
    pixels = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    ours_image, ours_text, _ = module.apply({"params": params}, jnp.asarray(pixels), jnp.asarray(ids))
    reference = CLIPModel.from_pretrained(tmp_path / "clip-model").eval()
    with torch.no_grad():
        image = reference.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        text = reference.get_text_features(input_ids=torch.from_numpy(ids))
    for ours, theirs in ((ours_image, image), (ours_text, text)):
        theirs = getattr(theirs, "pooler_output", theirs).numpy()
        assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4 * np.abs(theirs).max()

    t2i = ["train.py", "--config", "configs/shapes_t2i.py", "--workdir", tmp_path / "t2i"]
    tiny_unet = [
        "--config.new_model.unet.block_out_channels=(16, 32, 32)",
        "--config.new_model.unet.norm_num_groups=8",
        "--config.new_model.unet.cross_attention_dim=16",
        f"--config.new_model.text_encoder={tmp_path / 'clip-model'}",
    ]
    evaluation = [
        "--config.sample.every=2",
        "--config.sample.count=2",
        "--config.sample.steps=2",
        "--config.eval.count=4",
        "--config.eval.timesteps=(500,)",
    ]
    run = _run([*t2i, *tiny_unet, *evaluation, "--config.steps=2", "--config.data.global_batch_size=2"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "shape_iou_t500" in run.stderr and "background_iou_t500" in run.stderr
    export = _run(["export.py", "--workdir", tmp_path / "t2i", "--out", tmp_path / "t2i-model"])
    assert export.returncode == 0, export.stderr[-3000:]
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "t2i-model", safety_checker=None)
    assert pipeline.unet.config.in_channels == 4 and pipeline.text_encoder.config.hidden_size == 16

    # InstructPix2Pix from it (4 -> 8 channels), measuring the keyword's localisation on the way.
    ip2p = ["train.py", "--config", "configs/shapes_ip2p.py", "--workdir", tmp_path / "ip2p"]
    data = ["--config.data.name=shapes_edit/small", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    evaluation = [
        "--config.sample.every=2",
        "--config.sample.count=2",
        "--config.sample.steps=2",
        "--config.eval.count=4",
        "--config.eval.timesteps=(800,)",
    ]
    model = [f"--config.model={tmp_path / 't2i-model'}", "--config.steps=2", "--config.data.global_batch_size=2"]
    run = _run([*ip2p, *data, *evaluation, *model])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "keyword_iou_t800" in run.stderr
    export = _run(["export.py", "--workdir", tmp_path / "ip2p", "--out", tmp_path / "ip2p-model"])
    assert export.returncode == 0, export.stderr[-3000:]
    edit = StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp_path / "ip2p-model", safety_checker=None)
    assert edit.unet.config.in_channels == 8
