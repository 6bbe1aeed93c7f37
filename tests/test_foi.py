"""FoI's formulas on small hand-made arrays with hand-computed answers, and the instruction spec."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import CLIPTokenizer

from ip2p_jax import foi
from ip2p_jax.foi import FoIConfig, InstructionError, SubInstruction, mask_size
from ip2p_jax.guidance import dual_guidance
from ip2p_jax.models.unet import level_size


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def tokens_of(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


# ---------------------------------------------------------------------------------------------- instruction spec


def test_spans_owners_and_keywords(tokenizer):
    subs = [SubInstruction("make the circle blue", "circle", 2.0), SubInstruction("turn the sky red", "sky")]
    t = foi.instruction_tokens(tokenizer, subs, slots=3)
    words = tokens_of(tokenizer, t.ids)
    assert words[:11] == ["<|startoftext|>", "make</w>", "the</w>", "circle</w>", "blue</w>", ",</w>"] + [
        "turn</w>",
        "the</w>",
        "sky</w>",
        "red</w>",
        "<|endoftext|>",
    ]
    owner = t.owner.argmax(-1) + (t.owner.sum(-1) - 1)  # -1 for unowned
    np.testing.assert_array_equal(owner[:11], [-1, 0, 0, 0, 0, -1, 1, 1, 1, 1, -1])
    assert t.owner[11:].sum() == 0  # padding is unowned
    np.testing.assert_array_equal(np.nonzero(t.keyword_weights[0])[0], [3])
    np.testing.assert_array_equal(np.nonzero(t.keyword_weights[1])[0], [8])
    assert t.keyword_weights[2].sum() == 0 and list(t.valid) == [True, True, False]
    np.testing.assert_array_equal(t.token_alpha[:6], [0, 2, 2, 2, 2, 0])
    assert t.ids.shape == (77,)


def test_multi_token_keyword_is_averaged_and_first_occurrence_counts(tokenizer):
    # "dog" is not a whole word of the tiny vocabulary: it tokenises into several pieces.
    t = foi.instruction_tokens(tokenizer, [SubInstruction("turn the red dog into a red cat", "red dog")])
    weights = t.keyword_weights[0]
    chosen = tokens_of(tokenizer, t.ids[weights > 0])
    assert "".join(chosen).replace("</w>", "") == "reddog"
    np.testing.assert_allclose(weights[weights > 0], 1 / len(chosen))
    t = foi.instruction_tokens(tokenizer, [SubInstruction("make red red", "red")])
    np.testing.assert_array_equal(np.nonzero(t.keyword_weights[0])[0], [2])  # the first "red"


def test_keyword_match_ignores_case_and_punctuation(tokenizer):
    t = foi.instruction_tokens(tokenizer, [SubInstruction("Make the Circle blue!", "circle")])
    assert tokens_of(tokenizer, t.ids[t.keyword_weights[0] > 0]) == ["circle</w>"]


def test_missing_keyword_uses_all_tokens(tokenizer):
    t = foi.instruction_tokens(tokenizer, [SubInstruction("make it red")])
    np.testing.assert_allclose(t.keyword_weights[0][1:4], 1 / 3)
    assert t.keyword_weights[0].sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "subs,message",
    [
        ([SubInstruction("make the sky blue", "cat")], "keyword 'cat' does not occur in sub-instruction 0"),
        ([SubInstruction("make the sky blue", "bl")], "keyword 'bl' does not occur"),
        ([SubInstruction("make it red"), SubInstruction("  ")], "sub-instruction 1 is empty"),
        (
            [SubInstruction("make it red", alpha=math.nan)],
            r"sub-instruction 0 \('make it red'\): alpha must be a finite",
        ),
        ([SubInstruction("make it red", alpha=math.inf)], r"alpha must be a finite number >= 0, got inf"),
        ([SubInstruction("a"), SubInstruction("make it red", alpha=-0.5)], r"sub-instruction 1 .* >= 0, got -0.5"),
        ([SubInstruction("make it red", alpha="1")], r"alpha must be a finite number >= 0, got '1'"),
        ([], "at least one sub-instruction"),
        ([SubInstruction("make the sky blue " * 12), SubInstruction("red " * 30)], "CLIP reads 77"),
    ],
)
def test_instruction_errors(tokenizer, subs, message):
    with pytest.raises(InstructionError, match=message):
        foi.instruction_tokens(tokenizer, subs)


# ---------------------------------------------------------------------------------------------- 4.1 masks

K1 = math.exp(-2.0) / (1 + 2 * math.exp(-2.0))  # 1-D Gaussian, sigma 0.5, at distance 1 (normalised)
K0 = 1 / (1 + 2 * math.exp(-2.0))  # ... at distance 0


def test_gaussian_filter_of_a_delta():
    delta = jnp.zeros((1, 5, 5)).at[0, 2, 2].set(1.0)
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] = np.outer([K1, K0, K1], [K1, K0, K1])
    np.testing.assert_allclose(np.asarray(foi.gaussian_filter(delta))[0], expected, rtol=1e-6, atol=1e-7)
    # At a corner, reflect padding mirrors the neighbour: out[0, 0] sees the delta at (0, 0) only through the
    # centre tap, out[0, 1] through the right tap and its mirror.
    corner = jnp.zeros((1, 3, 3)).at[0, 0, 0].set(1.0)
    out = np.asarray(foi.gaussian_filter(corner))[0]
    assert out[0, 0] == pytest.approx(K0 * K0, rel=1e-6)
    assert out[0, 1] == pytest.approx(K0 * K1, rel=1e-6)
    assert out[1, 1] == pytest.approx(K1 * K1, rel=1e-6)


def test_sharpen_squares_then_min_max():
    a = jnp.asarray([[[0.2, 0.6], [1.0, 0.4]]])
    # gamma 1: squares 0.04, 0.36, 1, 0.16 -> min-max (x - 0.04) / 0.96
    np.testing.assert_allclose(np.asarray(foi.sharpen(a, 1))[0], [[0.0, 0.32 / 0.96], [1.0, 0.12 / 0.96]], rtol=1e-6)
    once = np.asarray([[0.0, 0.32 / 0.96], [1.0, 0.12 / 0.96]])
    np.testing.assert_allclose(np.asarray(foi.sharpen(a, 2))[0], once**2, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(foi.sharpen(jnp.full((1, 2, 2), 0.3), 3)), 0.0)


def test_planted_blob_is_recovered():
    rng = np.random.RandomState(0)
    maps = rng.uniform(0.0, 0.02, (1, 8, 8, 5)).astype(np.float32)
    blob = np.zeros((8, 8), bool)
    blob[2:5, 3:7] = True
    maps[0, :, :, 3] += 0.3 * blob
    weights = np.zeros((1, 2, 5), np.float32)
    weights[0, 0, 3] = 1.0
    args = (jnp.asarray(maps), jnp.asarray(weights), jnp.asarray([[True, False]]), jnp.asarray([0.5]))
    # After the filter a flat blob's border cells keep K0 + K1 = 0.89 of its height (corners 0.80), the cells
    # outside at most K1 = 0.11. gamma rounds raise that to the power 2 ** gamma: with gamma 1 the border stays
    # above tau = 0.5 (0.80 ** 2 = 0.64) and the outside falls below, so the blob comes back exactly ...
    masks = foi.extract_masks(*args, gamma=1)
    np.testing.assert_array_equal(np.asarray(masks[0, 0]).astype(bool), blob)
    assert np.asarray(masks[0, 1]).sum() == 0  # the padded slot
    # ... with the paper's gamma 3 the border falls below (0.89 ** 8 = 0.40): the blob's interior remains.
    interior = np.zeros((8, 8), bool)
    interior[3, 4:6] = True
    np.testing.assert_array_equal(np.asarray(foi.extract_masks(*args, gamma=3)[0, 0]).astype(bool), interior)


def test_resize_and_union():
    masks = jnp.asarray([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    big = np.asarray(foi.resize_masks(masks, (4, 4)))
    np.testing.assert_array_equal(big[0, 0], np.kron([[1, 0], [0, 0]], np.ones((2, 2))))
    np.testing.assert_array_equal(np.asarray(foi.union_mask(masks))[0], [[1, 0], [0, 1]])


def test_enlarging_is_bilinear_then_half():
    # 2 -> 5 along one axis: output cell x samples the input at (x + 0.5) * 2 / 5 - 0.5 = -0.3, 0.1, 0.5, 0.9, 1.3,
    # i.e. input cell 1's weight (clamped at the edges) is 0, 0.1, 0.5, 0.9, 1; >= 0.5 keeps the last three.
    masks = jnp.asarray([[[[0.0, 1.0]]]])  # (1, 1, 1, 2)
    np.testing.assert_array_equal(np.asarray(foi.resize_masks(masks, (1, 5)))[0, 0], [[0, 0, 1, 1, 1]])


def test_a_small_mask_survives_shrinking():
    # A 2 x 2 blob at rows 5-6, columns 9-10 of a 16 x 16 mask. In an 8 x 8 layer cell (y, x) covers rows
    # [2y, 2y + 2) and columns [2x, 2x + 2): the blob touches rows 2 and 3 and columns 4 and 5. Bilinear sampling
    # would read it at half-pixel centres 4.5, 6.5 / 8.5, 10.5 and give 0.5 * 0.5 = 0.25 < 0.5 everywhere.
    masks = np.zeros((1, 1, 16, 16), np.float32)
    masks[0, 0, 5:7, 9:11] = 1.0
    small = np.asarray(foi.resize_masks(jnp.asarray(masks), (8, 8)))[0, 0]
    expected = np.zeros((8, 8))
    expected[2:4, 4:6] = 1.0
    np.testing.assert_array_equal(small, expected)


def test_shrinking_by_a_ratio_that_is_not_whole():
    # 19 -> 10 rows: output row y covers [1.9 y, 1.9 (y + 1)). Input row 0 lies in output row 0 only, row 1
    # ([1, 2)) overlaps output rows 0 and 1, row 9 ([9, 10)) rows 4 ([7.6, 9.5)) and 5 ([9.5, 11.4)), row 18 row 9.
    masks = np.zeros((1, 1, 19, 3), np.float32)
    masks[0, 0, [0, 1, 9, 18], 1] = 1.0
    out = np.asarray(foi.resize_masks(jnp.asarray(masks), (10, 3)))[0, 0]
    np.testing.assert_array_equal(out[:, 1], [1, 1, 0, 0, 1, 1, 0, 0, 0, 1])
    assert out[:, [0, 2]].sum() == 0
    # Touching a border is no overlap: input row 2 ([2, 3)) lies in output row 1 ([1.9, 3.8)) only.
    masks = np.zeros((1, 1, 19, 1), np.float32)
    masks[0, 0, 2] = 1.0
    np.testing.assert_array_equal(np.asarray(foi.resize_masks(jnp.asarray(masks), (10, 1)))[0, 0, :, 0], np.eye(10)[1])


def test_one_axis_shrinks_while_the_other_enlarges():
    # 4 x 2 -> 2 x 4 with only cell (1, 0) inside: rows 4 -> 2 pool it into output row 0; columns 2 -> 4 sample
    # at -0.25, 0.25, 0.75, 1.25, i.e. column 0's weight 1, 0.75, 0.25, 0: >= 0.5 keeps the first two.
    masks = np.zeros((1, 1, 4, 2), np.float32)
    masks[0, 0, 1, 0] = 1.0
    out = np.asarray(foi.resize_masks(jnp.asarray(masks), (2, 4)))[0, 0]
    np.testing.assert_array_equal(out, [[1, 1, 0, 0], [0, 0, 0, 0]])


# ---------------------------------------------------------------------------------------------- 4.2 modulation


def test_xi():
    assert float(foi.xi(jnp.float32(1000.0), 1000)) == pytest.approx(0.05)
    assert float(foi.xi(jnp.float32(500.0), 1000)) == pytest.approx(0.05 / 16)


def test_token_masks_use_the_owner_or_the_union():
    masks = jnp.asarray([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (B=1, K=2, Q=3)
    owner = jnp.asarray([[[0, 0], [1, 0], [0, 1], [0, 0]]], jnp.float32)  # tokens 0 and 3 unowned
    expected = [[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0]]  # rows: queries; union = [1, 1, 0]
    np.testing.assert_array_equal(np.asarray(foi.token_masks(masks, owner))[0], expected)


def test_modulated_probs_by_hand():
    x = jnp.asarray([[[[0.0, math.log(3.0)]]]])  # softmax -> [0.25, 0.75]
    y = jnp.asarray([[[[math.log(4.0), 0.0]]]])  # softmax -> [0.8, 0.2]
    ones, zeros = jnp.ones((1, 1, 2)), jnp.zeros((1, 1, 2))
    inside, outside = foi.modulated_probs(x, y, ones, jnp.zeros((1, 2)), jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(inside + outside).ravel(), [0.25, 0.75], rtol=1e-6)
    # alpha 1, xi 1: dX = max - X = [ln 3, 0], so X + dX = [ln 3, ln 3] -> [0.5, 0.5]
    inside, _ = foi.modulated_probs(x, y, ones, jnp.ones((1, 2)), jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(inside).ravel(), [0.5, 0.5], rtol=1e-6)
    inside, outside = foi.modulated_probs(x, y, zeros, jnp.ones((1, 2)), jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(inside + outside).ravel(), [0.8, 0.2], rtol=1e-6)
    # a mask on token 1 only: rows are not renormalised
    inside, outside = foi.modulated_probs(x, y, jnp.asarray([[[0.0, 1.0]]]), jnp.zeros((1, 2)), jnp.float32(0.0))
    np.testing.assert_allclose(np.asarray(inside + outside).ravel(), [0.8, 0.75], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- 4.3 guidance


def test_decoupled_guidance_with_full_and_empty_masks():
    rng = np.random.RandomState(0)
    eps = jnp.asarray(rng.randn(3, 2, 4, 4, 4), jnp.float32)
    plain = dual_guidance(eps, 7.5, 1.5)
    np.testing.assert_array_equal(np.asarray(dual_guidance(eps, 7.5, 1.5, jnp.ones((2, 4, 4, 1)))), plain)
    e_full, e_img, e_none = np.asarray(eps)
    np.testing.assert_allclose(
        np.asarray(dual_guidance(eps, 7.5, 1.5, jnp.zeros((2, 4, 4, 1)))),
        e_none + 1.5 * (e_img - e_none),
        rtol=1e-6,
    )
    np.testing.assert_allclose(np.asarray(plain), e_none + 1.5 * (e_img - e_none) + 7.5 * (e_full - e_img), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- sizes and settings


def test_levels_round_up_as_the_unet_does():
    # A 600 x 400 image with Stable Diffusion's VAE: a 50 x 75 latent; each stride-2 convolution gives ceil(n / 2).
    assert [level_size((50, 75), level) for level in range(4)] == [(50, 75), (25, 38), (13, 19), (7, 10)]
    assert mask_size((50, 75), 4) == (13, 19) and mask_size((7, 9), 2) == (4, 5) and mask_size((7, 9), 1) == (7, 9)
    with pytest.raises(ValueError, match="mask_downsample must be a power of two >= 1, got 3"):
        mask_size((8, 8), 3)


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(strength=0.0), r"strength must be in \(0, 1\], got 0.0"),
        (dict(strength=1.5), r"strength must be in \(0, 1\], got 1.5"),
        (dict(gamma=-1), "gamma must be an integer >= 0, got -1"),
        (dict(gamma=2.5), "gamma must be an integer >= 0, got 2.5"),
        (dict(tau=2), r"tau must be in \[0, 1\], or a \(low, high\) range with 0 <= low <= high <= 1, got 2"),
        (dict(tau=-0.1), r"tau must be in \[0, 1\]"),
        (dict(tau=math.nan), r"tau must be in \[0, 1\].*got nan"),
        (dict(tau=(0.7, 0.4)), r"tau must be a \(low, high\) range with 0 <= low <= high <= 1, got \(0.7, 0.4\)"),
        (dict(tau=(0.4, 1.2)), r"tau must be a \(low, high\) range"),
        (dict(tau=(0.4,)), r"tau must be a \(low, high\) range"),
        (dict(filter_size=4), "filter_size must be a positive odd integer, got 4"),
        (dict(filter_size=0), "filter_size must be a positive odd integer, got 0"),
        (dict(filter_sigma=0.0), "filter_sigma must be a finite number > 0, got 0.0"),
        (dict(filter_sigma=math.inf), "filter_sigma must be a finite number > 0, got inf"),
        (dict(mask_downsample=3), "mask_downsample must be a power of two >= 1, got 3"),
        (dict(mask_downsample=0), "mask_downsample must be a power of two >= 1, got 0"),
        (dict(mask_step=-1), "mask_step must be an integer >= 0, got -1"),
        (dict(modulation_stop=1.1), r"modulation_stop must be in \[0, 1\], got 1.1"),
        (dict(decoupled_fraction=-0.25), r"decoupled_fraction must be in \[0, 1\], got -0.25"),
        (dict(modulation="no"), "modulation must be True or False, got 'no'"),
        (dict(outside_values="mine"), "outside_values must be 'own' or 'image_only', got 'mine'"),
    ],
)
def test_invalid_settings_are_errors_that_name_the_setting(setting, message):
    with pytest.raises(ValueError, match=message):
        FoIConfig(**setting)


def test_settings_are_stored_as_python_numbers():
    config = FoIConfig(tau=[0.4, 0.7], gamma=np.int64(2), filter_sigma=np.float32(0.5), mask_downsample=np.int32(2))
    assert config.tau == (0.4, 0.7) and type(config.gamma) is int and type(config.mask_downsample) is int
    assert config.mask_level == 1 and FoIConfig(mask_downsample=1).mask_level == 0
    assert hash(config) == hash(FoIConfig(tau=(0.4, 0.7), gamma=2, mask_downsample=2))  # a sampler cache key
    assert FoIConfig(tau=1).tau == 1.0 and FoIConfig(tau=(0.0, 1.0)).tau == (0.0, 1.0)  # the ends are allowed


def test_a_model_folder_with_an_invalid_setting_is_named(tmp_path):
    (tmp_path / "foi_config.json").write_text('{"tau": 2}')
    with pytest.raises(ValueError, match=r"foi_config.json: tau must be in \[0, 1\]"):
        FoIConfig.for_model(tmp_path, tau=0.5)
