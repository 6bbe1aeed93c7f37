"""CLIP metrics: known answers on constructed embeddings, and the model-level scores against PyTorch."""

import numpy as np
import pytest
import torch
from conftest import max_relative_error, perturb_
from transformers import CLIPConfig, CLIPModel

from ip2p_jax.evaluation.clip_metrics import (
    cosine_similarity,
    directional_similarity,
    edit_similarities,
    image_similarity,
    pick_score,
    pick_scores,
    text_image_similarity,
)
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.weights import load_clip, load_tokenizer

E1, E2, E3 = np.eye(3, dtype=np.float32)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (E1, 5 * E1, 1.0),  # parallel, whatever the lengths
        (E1, E2, 0.0),  # orthogonal
        (E1 + E2, -3 * (E1 + E2), -1.0),  # opposite
        (E1, E1 + E2, 2**-0.5),  # 45 degrees
    ],
)
def test_similarities_of_constructed_embeddings(a, b, expected):
    for similarity in (cosine_similarity, text_image_similarity, image_similarity):
        np.testing.assert_allclose(similarity(a, b), expected, atol=1e-6)


def test_directional_similarity_by_hand():
    # Unit image change (-1, 1, 0), unit text change (-1, 0, 1): cosine 1 / (sqrt 2 * sqrt 2) = 0.5. The text
    # embeddings' lengths (3 and 0.5) must not matter: each embedding is normalised before the difference.
    np.testing.assert_allclose(directional_similarity(E1, E2, 3 * E1, 0.5 * E3), 0.5, atol=1e-6)
    # The image changed exactly as the caption did, or exactly against it.
    np.testing.assert_allclose(directional_similarity(E1, E2, E1, 2 * E2), 1.0, atol=1e-6)
    np.testing.assert_allclose(directional_similarity(E1, E2, E2, E1), -1.0, atol=1e-6)
    # An edit that changed nothing scores 0 (torch's eps), not NaN.
    assert directional_similarity(E1, E1, E1, E2) == 0.0
    # Batched: (B, P) inputs give (B,).
    batch = directional_similarity(np.stack([E1, E1]), np.stack([E2, E2]), np.stack([E1, E2]), np.stack([E2, E1]))
    np.testing.assert_allclose(batch, [1.0, -1.0], atol=1e-6)


def test_pick_score_scales_the_cosine():
    logit_scale = np.log(100.0).astype(np.float32)
    np.testing.assert_allclose(pick_score(E1, 2 * E1, logit_scale), 100.0, rtol=1e-6)
    np.testing.assert_allclose(pick_score(E1, E2, logit_scale), 0.0, atol=1e-6)
    # One prompt against three candidate images.
    images = np.stack([E1, E1 + E2, -E1])
    np.testing.assert_allclose(pick_score(images, E1[None], logit_scale), [100.0, 100 * 2**-0.5, -100.0], rtol=1e-5)


def test_cosine_similarity_equals_torch():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5, 8)).astype(np.float32)
    a[1] = 0.0  # torch clamps each norm at eps
    a[2] *= 1e-9
    expected = torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=-1).numpy()
    np.testing.assert_allclose(cosine_similarity(a, b), expected, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, vocab_size):
    """A tiny random transformers CLIPModel and our ``(module, params)`` loaded from its saved folder."""
    torch.manual_seed(0)
    text = dict(vocab_size=vocab_size, eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2)
    shape = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config={**text, **shape}, vision_config=dict(image_size=16, patch_size=8, **shape), projection_dim=8
    )
    reference = perturb_(CLIPModel(config), 0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    reference.save_pretrained(folder)
    return reference, *load_clip(folder)


def _reference_embeddings(reference, pixels_bhwc, ids):
    """The IP2P reference's encode_image / encode_text on transformers' CLIP: unit-length embeddings."""
    with torch.no_grad():
        image = reference.get_image_features(torch.tensor(pixels_bhwc).permute(0, 3, 1, 2)).pooler_output
        text = reference.get_text_features(torch.tensor(ids, dtype=torch.long)).pooler_output
    return image / image.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True)


def test_model_scores_equal_the_reference(tiny_clip, tokenizer_dir):
    reference, module, params = tiny_clip
    pixels_0, pixels_1 = np.random.default_rng(1).standard_normal((2, 2, 16, 16, 3)).astype(np.float32)
    tokenizer = load_tokenizer(tokenizer_dir, subfolder="")
    ids_0 = tokenize(tokenizer, ["a photo of a cat", "a red square"])
    ids_1 = tokenize(tokenizer, ["a photo of a blue cat", "a green circle"])

    ours = edit_similarities(module, params, pixels_0, pixels_1, ids_0, ids_1)
    (image_0, text_0), (image_1, text_1) = (
        _reference_embeddings(reference, pixels_0, ids_0),
        _reference_embeddings(reference, pixels_1, ids_1),
    )
    cos = torch.nn.functional.cosine_similarity
    expected = {
        "clip_sim_0": cos(image_0, text_0),
        "clip_sim_1": cos(image_1, text_1),
        "clip_sim_dir": cos(image_1 - image_0, text_1 - text_0),
        "clip_sim_image": cos(image_0, image_1),
    }
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name].shape == (2,)
        error = max_relative_error(ours[name], value.numpy())
        print(f"{name}: {error:.2e}")
        assert error <= 1e-4, name

    # PickScore as its model card computes it: logit_scale.exp() * text @ image.T.
    pixels = np.concatenate([pixels_0, pixels_1])
    ids = np.concatenate([ids_0, ids_1])
    image, text = _reference_embeddings(reference, pixels, ids)
    expected_pick = (reference.logit_scale.exp() * (image * text).sum(-1)).detach().numpy()
    assert max_relative_error(pick_scores(module, params, pixels, ids), expected_pick) <= 1e-4
