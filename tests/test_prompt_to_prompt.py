"""Prompt-to-Prompt: token alignments, the control's formulas, and the properties of the jitted pair sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IP2P_SCHEDULER_CONFIG, make_text_encoder, make_unet

from ip2p_jax.generation.prompt_to_prompt import (
    AlignmentError,
    PromptToPrompt,
    align_prompts,
    global_alignment,
    refinement_alignment,
    shares_attention,
    word_swap_alignment,
)
from ip2p_jax.generation.text_to_image import (
    PromptToPromptInputs,
    PromptToPromptSettings,
    TextToImageInputs,
    TextToImageSettings,
    make_prompt_to_prompt_sampler,
    make_text_to_image_sampler,
)
from ip2p_jax.models.attention import (
    AttentionControl,
    Compose,
    LayerInfo,
    RecordCrossAttention,
    attention_scores,
    combine_values,
)
from ip2p_jax.parallel import data_mesh
from ip2p_jax.schedulers import Scheduler
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.weights import load_text_encoder, load_tokenizer, load_unet

T = 77


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir, subfolder="")


def expected_tail(mapper, alphas, source_end, target_end):
    """The end token and padding aligned in order; target positions past the source's last one keep their maps."""
    for target in range(target_end, T):
        source = source_end + target - target_end
        if source < T:
            assert mapper[source, target] == 1.0 and alphas[target] == 1.0, target
        else:
            assert alphas[target] == 0.0, target


# ---------------------------------------------------------------------------------------------- alignment


def test_word_swap_of_one_token_words_is_the_identity(tokenizer):
    alignment = word_swap_alignment(tokenizer, "a photo of a cat", "a photo of a dog")
    np.testing.assert_array_equal(alignment.mapper, np.eye(T, dtype=np.float32))
    np.testing.assert_array_equal(alignment.alphas, np.ones(T, np.float32))
    assert align_prompts(tokenizer, "a photo of a cat", "a photo of a dog").kind == "word_swap"


def test_word_swap_spreads_a_word_over_more_tokens_and_keeps_mass(tokenizer):
    # "xyzzy" is not in the tiny vocabulary: one token per character, 5 in all.
    ids = tokenizer("a xyzzy").input_ids
    assert len(ids) == 2 + 1 + 5
    forward = word_swap_alignment(tokenizer, "a cat", "a xyzzy")
    assert forward.mapper[0, 0] == forward.mapper[1, 1] == 1.0
    np.testing.assert_allclose(forward.mapper[2, 2:7], 0.2)  # "cat" feeds each of the 5 tokens a fifth
    assert forward.mapper[2].sum() == pytest.approx(1.0)
    expected_tail(forward.mapper, forward.alphas, 3, 7)
    assert forward.mapper[:, :7].sum() == pytest.approx(3.0)  # start, "a", "cat": each mapped once

    backward = word_swap_alignment(tokenizer, "a xyzzy", "a cat")
    np.testing.assert_array_equal(backward.mapper[2:7, 2], 1.0)  # the 5 source tokens all feed "cat"
    expected_tail(backward.mapper, backward.alphas, 7, 3)
    assert backward.alphas[73:].tolist() == [0.0] * 4  # past the source's last position: own maps


def test_word_swap_needs_as_many_words(tokenizer):
    with pytest.raises(AlignmentError, match="as many words"):
        word_swap_alignment(tokenizer, "a cat", "a red cat")
    assert align_prompts(tokenizer, "a cat", "a red cat").kind == "refine"
    with pytest.raises(AlignmentError, match="tokens; CLIP reads 77"):
        align_prompts(tokenizer, "a cat", "a " + "xyzzy " * 20)
    with pytest.raises(ValueError, match="alignment must be one of"):
        align_prompts(tokenizer, "a cat", "a dog", mode="swap")


def test_refinement_keeps_aligned_tokens_and_frees_new_ones(tokenizer):
    # start, a, red, cat, end against start, a, cat, end: "red" is new.
    added = refinement_alignment(tokenizer, "a cat", "a red cat")
    for target, source in [(0, 0), (1, 1), (3, 2), (4, 3)]:
        assert added.mapper[source, target] == 1.0 and added.alphas[target] == 1.0
    assert added.mapper[:, 2].sum() == 0.0 and added.alphas[2] == 0.0
    expected_tail(added.mapper, added.alphas, 4, 5)

    removed = refinement_alignment(tokenizer, "a red cat", "a cat")
    for target, source in [(0, 0), (1, 1), (2, 3), (3, 4)]:
        assert removed.mapper[source, target] == 1.0
    assert removed.mapper[2].sum() == 0.0  # "red" feeds nothing
    expected_tail(removed.mapper, removed.alphas, 5, 4)
    np.testing.assert_array_equal(removed.mapper.sum(axis=0)[:73], 1.0)


@pytest.mark.parametrize("mode", ["word_swap", "refine"])
def test_identical_prompts_align_to_the_identity(tokenizer, mode):
    alignment = align_prompts(tokenizer, "turn the dog into a red cat", "turn the dog into a red cat", mode)
    np.testing.assert_array_equal(alignment.mapper, np.eye(T, dtype=np.float32))
    np.testing.assert_array_equal(alignment.alphas, np.ones(T, np.float32))


def test_global_alignment_prefers_matches_and_breaks_ties_as_p2p():
    assert global_alignment([1, 2, 3], [1, 2, 3]) == [0, 1, 2]
    assert global_alignment([1, 2, 3], [1, 9, 2, 3]) == [0, -1, 1, 2]
    # A substitution is never a diagonal move (mismatch -1 < two free gaps): the new token is an insertion.
    assert global_alignment([1, 5, 3], [1, 6, 3]) == [0, -1, 2]
    # Two equally good alignments of a repeated token: the traceback takes a gap before a diagonal move (as P2P's),
    # so the first copies align with each other.
    assert global_alignment([7, 7], [7]) == [0]
    assert global_alignment([7], [7, 7]) == [0, -1]


def test_steps_that_share_follow_the_reference_rule():
    p = jnp.array([0.0, 0.25, 0.5, 1.0])
    shared = np.array([shares_attention(i, 5, p) for i in range(5)])  # i / 4 < p
    np.testing.assert_array_equal(shared.sum(axis=0), [0, 1, 2, 4])
    assert not shared[:, 0].any() and shared[:4, 3].all() and not shared[4, 3]


# ---------------------------------------------------------------------------------------------- the control


def test_control_replaces_the_edited_text_branch_maps_only(tokenizer):
    """The replaced probabilities, and a recorder composed after the control records them as used."""
    pairs, heads, queries, dim = 2, 2, 6, 4
    alignments = [refinement_alignment(tokenizer, "a cat", "a red cat"), word_swap_alignment(tokenizer, "a", "b")]
    control = PromptToPrompt(
        mapper=jnp.stack([a.mapper for a in alignments]),
        alphas=jnp.stack([a.alphas for a in alignments]),
        share=jnp.array([True, False]),
    )
    layer = LayerInfo("mid_block.attentions.0.transformer_blocks.0.attn2", "mid", 0, 1, (2, 3), heads)
    q = jax.random.normal(jax.random.key(0), (2 * 2 * pairs, queries, heads, dim))
    k, v = jax.random.normal(jax.random.key(1), (2, 2 * 2 * pairs, T, heads, dim))
    scores = attention_scores(q, k)
    probs, aux = control.probabilities(scores, jax.nn.softmax(scores, -1), layer)
    assert aux is None
    plain = jax.nn.softmax(scores, -1).reshape(2, 2, pairs, heads, queries, T)
    out, (_, recorded) = Compose(control, RecordCrossAttention()).attend(q, k, v, layer)
    np.testing.assert_array_equal(out, combine_values(probs, v))
    probs = probs.reshape(plain.shape)
    edited = np.asarray(probs[0, 1, 0])
    mapped = np.einsum("nqs,st->nqt", plain[0, 0, 0], alignments[0].mapper)
    alphas = alignments[0].alphas
    np.testing.assert_allclose(edited, mapped * alphas + plain[0, 1, 0] * (1 - alphas), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(edited[..., 3], plain[0, 0, 0, ..., 2], rtol=1e-6)  # "cat" <- "cat"
    np.testing.assert_array_equal(edited[..., 2], plain[0, 1, 0, ..., 2])  # "red": its own
    # Everything else is untouched: the input rows, the null-text branch, the pair that does not share.
    untouched = np.ones((2, 2, pairs), bool)
    untouched[0, 1, 0] = False
    np.testing.assert_array_equal(np.asarray(probs)[untouched], np.asarray(plain)[untouched])
    maps = np.swapaxes(np.asarray(recorded)[: 2 * pairs].reshape(2, pairs, 2, 3, T), 0, 1)  # the text branch
    assert maps.shape == (pairs, 2, 2, 3, T)
    np.testing.assert_allclose(maps[0, 1], edited.mean(0).reshape(2, 3, T), rtol=1e-6)
    np.testing.assert_allclose(maps[:, 0], plain[0, 0].mean(1).reshape(pairs, 2, 3, T), rtol=1e-6)


def test_compose_edge_cases():
    """A layer no part takes is the plain layer; two parts replacing one layer's output, and a Compose inside a
    Compose, are errors; a part that replaces the output leaves the others observing the plain probabilities."""
    heads, dim = 2, 4
    cross = LayerInfo("mid_block.attentions.0.transformer_blocks.0.attn2", "mid", 0, 1, (2, 3), heads)
    q = jax.random.normal(jax.random.key(0), (2, 6, heads, dim))
    k, v = jax.random.normal(jax.random.key(1), (2, 2, T, heads, dim))
    plain = combine_values(jax.nn.softmax(attention_scores(q, k), -1), v)
    out, aux = Compose(RecordCrossAttention(sizes=((4, 4),))).attend(q, k, v, cross)
    np.testing.assert_array_equal(out, plain)
    assert aux is None

    class Doubling(AttentionControl):
        def replaces_output(self, layer):
            return True

        def output(self, q_bqnd, k_bknd, v_bknd, layer):
            return 2 * combine_values(jax.nn.softmax(attention_scores(q_bqnd, k_bknd), -1), v_bknd), "doubled"

    out, (maps, doubled) = Compose(RecordCrossAttention(), Doubling()).attend(q, k, v, cross)
    np.testing.assert_allclose(out, 2 * plain, rtol=1e-6)
    assert doubled == "doubled" and maps.shape == (2, 2, 3, T)
    with pytest.raises(ValueError, match="more than one control replaces the output"):
        Compose(Doubling(), Doubling()).attend(q, k, v, cross)
    with pytest.raises(ValueError, match="not a part of another Compose"):
        Compose(Compose(Doubling()), RecordCrossAttention())


def test_control_injects_self_attention_queries_and_keys():
    pairs, queries, heads, dim = 2, 5, 2, 4
    control = PromptToPrompt(
        mapper=jnp.zeros((pairs, T, T)),
        alphas=jnp.zeros((pairs, T)),
        share=jnp.array([False, True]),
        cross_attention_sharing=False,
        self_attention_sharing=True,
        self_attention_max_size=4,
    )
    small = LayerInfo("mid_block.attentions.0.transformer_blocks.0.attn1", "mid", 0, 2, (2, 2), heads)
    large = LayerInfo("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "down", 0, 0, (4, 4), heads)
    assert control.controls(small) and not control.controls(large) and control.replaces_output(small)
    assert not PromptToPrompt(control.mapper, control.alphas, control.share).controls(small)
    q, k, v = jax.random.normal(jax.random.key(1), (3, 2 * 2 * pairs, queries, heads, dim))
    out, aux = control.attend(q, k, v, small)
    assert aux is None

    def attention(q, k, v):
        return combine_values(jax.nn.softmax(attention_scores(q[None], k[None]), -1), v[None])[0]

    rows = np.arange(2 * 2 * pairs).reshape(2, 2, pairs)
    for branch in range(2):
        for role in range(2):
            for pair in range(pairs):
                row = rows[branch, role, pair]
                source = rows[branch, 0, pair] if (role == 1 and pair == 1) else row
                expected = attention(q[source], k[source], v[row])
                np.testing.assert_allclose(out[row], expected, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------- the sampler

STEPS = 4
LATENT = (8, 8)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory, tokenizer_dir, vocab_size, tokenizer):
    """A tiny 4-channel SD UNet and text encoder, one compiled P2P sampler (recording every layer) and one plain
    text-to-image sampler, Euler ancestral (so the shared step noise matters)."""
    root = tmp_path_factory.mktemp("tiny-sd")
    make_unet("sd_4ch").save_pretrained(root / "unet")
    make_text_encoder("sd1", vocab_size).save_pretrained(root / "text_encoder")
    unet, unet_params = load_unet(root)
    text_encoder, text_params = load_text_encoder(root)
    encode = jax.jit(lambda ids: text_encoder.apply({"params": text_params}, ids))

    def apply(params, *args):
        return unet.apply({"params": params}, *args)

    settings = TextToImageSettings(Scheduler.from_config(IP2P_SCHEDULER_CONFIG), STEPS, LATENT)
    mesh = data_mesh(jax.devices()[:1])
    p2p = make_prompt_to_prompt_sampler(apply, settings, PromptToPromptSettings(record_sizes=()), mesh)
    t2i = make_text_to_image_sampler(apply, settings, mesh)
    return dict(params=unet_params, encode=encode, tokenizer=tokenizer, p2p=p2p, t2i=t2i)


def pair_inputs(model, pairs, p, mode="auto"):
    tokenizer, encode = model["tokenizer"], model["encode"]
    context = encode(tokenize(tokenizer, [prompt for pair in pairs for prompt in pair]))
    alignments = [align_prompts(tokenizer, *pair, mode=mode) for pair in pairs]
    null = encode(tokenize(tokenizer, [""]))
    return PromptToPromptInputs(
        context=context.reshape(len(pairs), 2, *context.shape[1:]),
        null_context=jnp.broadcast_to(null, (len(pairs), *null.shape[1:])),
        keys=jax.random.split(jax.random.key(3), len(pairs)),
        guidance_scale=jnp.asarray([7.5, 11.0][: len(pairs)]),
        p=jnp.asarray(p, jnp.float32),
        mapper=jnp.stack([a.mapper for a in alignments]),
        alphas=jnp.stack([a.alphas for a in alignments]),
    )


PAIRS = [("a photo of a cat", "a photo of a dog"), ("a red circle", "a red circle with a hat")]


def relative(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_p_zero_is_two_independent_generations(tiny_sd):
    inputs = pair_inputs(tiny_sd, PAIRS, [0.0, 0.0])
    latents, maps = tiny_sd["p2p"](tiny_sd["params"], inputs)
    assert latents.shape == (2, 2, *LATENT, 4) and maps
    # Each prompt alone, each image keyed by its pair's key: the same noise, nothing shared.
    independent = tiny_sd["t2i"](
        tiny_sd["params"],
        TextToImageInputs(
            context=inputs.context.reshape(4, *inputs.context.shape[2:]),
            null_context=jnp.repeat(inputs.null_context, 2, axis=0),
            keys=jnp.repeat(inputs.keys, 2),
            guidance_scale=jnp.repeat(inputs.guidance_scale, 2),
        ),
    )
    error = relative(latents.reshape(independent.shape), independent)
    print(f"p = 0 against independent generations: max abs diff / max abs {error:.1e}")
    assert error <= 1e-6
    assert relative(latents[:, 0], latents[:, 1]) > 0.1  # the prompts do differ


def test_p_one_with_identical_prompts_gives_identical_images(tiny_sd):
    # Different prompts in each pair of the batch: a control mixing pairs or branches would show.
    pairs = [("a photo of a cat", "a photo of a cat"), ("turn the dog blue", "turn the dog blue")]
    latents, _ = tiny_sd["p2p"](tiny_sd["params"], pair_inputs(tiny_sd, pairs, [1.0, 1.0]))
    difference = float(jnp.max(jnp.abs(latents[:, 0] - latents[:, 1])))
    print(f"p = 1, identical prompts: max abs difference between the pair's latents {difference:.1e}")
    assert difference <= 1e-6 * float(jnp.max(jnp.abs(latents)))
    assert relative(latents[0, 0], latents[1, 0]) > 0.1


def test_sharing_leaves_the_input_image_alone_and_moves_the_edited_one(tiny_sd):
    none, _ = tiny_sd["p2p"](tiny_sd["params"], pair_inputs(tiny_sd, PAIRS, [0.0, 0.0]))
    shared, _ = tiny_sd["p2p"](tiny_sd["params"], pair_inputs(tiny_sd, PAIRS, [1.0, 1.0]))
    np.testing.assert_array_equal(shared[:, 0], none[:, 0])
    # (Whether sharing draws the edited image towards the input one is a property of a trained model, not of a
    # random one: it is not asserted here.)
    moved = [relative(shared[i, 1], none[i, 1]) for i in range(2)]
    print(f"p = 1 against p = 0, edited image: relative change {moved[0]:.3f}, {moved[1]:.3f}")
    assert min(moved) > 1e-3


def test_recorded_maps_of_the_edited_prompt_are_the_injected_ones(tiny_sd):
    p = [0.5, 0.25]  # with 4 steps: pair 0 shares steps 0 and 1 (i / 3 < 0.5), pair 1 step 0
    inputs = pair_inputs(tiny_sd, PAIRS, p)
    _, maps = tiny_sd["p2p"](tiny_sd["params"], inputs)
    shared_steps = {0: [0, 1], 1: [0]}
    worst_shared, least_unshared = 0.0, np.inf
    for name, layer_maps in maps.items():
        assert layer_maps.shape[:3] == (STEPS, 2, 2) and layer_maps.shape[-1] == T, name
        for pair in range(2):
            mapper, alphas = np.asarray(inputs.mapper[pair]), np.asarray(inputs.alphas[pair])
            taken = alphas == 1.0  # edited tokens that take the input's maps (not a new word's)
            for step in range(STEPS):
                source = np.asarray(layer_maps[step, pair, 0])
                edited = np.asarray(layer_maps[step, pair, 1])
                injected = (source @ mapper)[..., taken]
                gap = float(np.max(np.abs(edited[..., taken] - injected)))
                if step in shared_steps[pair]:
                    worst_shared = max(worst_shared, gap)
                else:
                    least_unshared = min(least_unshared, gap)
    print(f"recorded edited maps vs injected: {worst_shared:.1e} while shared, >= {least_unshared:.1e} after")
    assert worst_shared <= 1e-6
    assert least_unshared >= 1e-3
