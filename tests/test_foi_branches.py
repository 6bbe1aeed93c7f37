"""FoI with one text branch per sub-instruction (``FoIConfig.text_branches = "per_instruction"``, ours) and FoI with
masks given (``pipe(..., masks=)``), on the tiny model.

The per-instruction step is pinned by a computation by hand, as ``tests/test_foi_settings.py`` pins the paper's
settings: the guidance batch ``[text+image 1..K, image only, none]`` as one plain UNet call, each slot's mask cut from
its own branch's maps with ``foi.extract_masks``, each branch modulated by its own mask with an attention control
written here from the formulas, and the guidance ``e_none + s_I (e_img - e_none) + sum_k M_k s_T (e_k - e_img)``
written out.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_foi_settings import (
    LATENT,
    MASKS,
    SCALES,
    STEPS,
    STEPS_RUN,
    STRENGTH,
    assert_close,
    assert_differs,
    hand_tau,
    resize_by_hand,
)

from ip2p_jax import foi
from ip2p_jax.foi import FoIConfig, FoIInputs, make_foi_sampler
from ip2p_jax.models.attention import AttentionControl, RecordCrossAttention, attention_scores, mean_of_layers
from ip2p_jax.parallel import data_mesh
from ip2p_jax.pipeline import InstructPix2PixPipeline
from ip2p_jax.sampling import SamplerInputs, SamplerSettings

SIZE = 32  # pixels -> 16 x 16 latents
FOI = FoIConfig(mask_downsample=2)  # masks at 8 x 8
PER_INSTRUCTION = dataclasses.replace(FOI, text_branches="per_instruction")
CALL = dict(num_inference_steps=5, output_type="np", progress=False)
INSTRUCTIONS = [  # the second image has one sub-instruction: its second slot is padding
    [("make the sky blue", "sky"), ("turn the cat red", "cat", 2.0)],
    [("turn the dog green", "dog")],
]


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return InstructPix2PixPipeline.from_pretrained(pipeline_dir)


@pytest.fixture(scope="module")
def pipe_vae8x(pipeline_dir_vae8x):
    return InstructPix2PixPipeline.from_pretrained(pipeline_dir_vae8x)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.RandomState(3).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- by hand


class BranchModulationByHand(AttentionControl):
    """Paper 4.2 in every text+image branch ``k`` of ``[text+image 1..K, image only, none]``, each with its own
    mask ``M_k`` for all of its tokens: ``softmax(X_k + dX_k) * M_k @ V_k + softmax(Y) * (1 - M_k) @ V_k`` with
    ``dX_k = alpha_tok * xi * (max X_k - X_k)`` (``alpha_tok`` its sub-instruction's alpha on its text's tokens),
    ``Y`` the image-only branch's scores; the last two branches plain."""

    masks: jax.Array  # (B, K, 8, 8)
    token_alpha: jax.Array  # (B, K, T)
    xi_t: jax.Array

    def replaces_output(self, layer):
        return True

    def output(self, q_bqnd, k_bknd, v_bknd, layer):
        scores = attention_scores(q_bqnd, k_bknd)
        batch, slots = self.masks.shape[:2]

        def times_values(probs, v):
            return jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(probs.shape[0], probs.shape[2], -1)

        plain = times_values(jax.nn.softmax(scores, axis=-1), v_bknd)
        layer_masks = resize_by_hand(self.masks, layer.size).reshape(batch, slots, -1)  # (B, K, Q)
        y = scores[slots * batch : (slots + 1) * batch]
        outputs = []
        for k in range(slots):
            rows = slice(k * batch, (k + 1) * batch)
            x, mask = scores[rows], layer_masks[:, k][:, None, :, None]  # (B, 1, Q, 1): every token
            boost = self.token_alpha[:, k][:, None, None, :] * self.xi_t * (x.max(axis=-1, keepdims=True) - x)
            inside = times_values(jax.nn.softmax(x + boost, axis=-1) * mask, v_bknd[rows])
            outputs.append(inside + times_values(jax.nn.softmax(y, axis=-1) * (1 - mask), v_bknd[rows]))
        return jnp.concatenate([*outputs, plain[slots * batch :]]), None


@dataclasses.dataclass
class Case:
    pipe: InstructPix2PixPipeline
    inputs: SamplerInputs
    foi_inputs: FoIInputs
    contexts: jax.Array  # (B, K, 77, D)


@pytest.fixture(scope="module")
def case(pipe) -> Case:
    tokens = [foi.branch_tokens(pipe.tokenizer, [foi.SubInstruction(*s) for s in subs], 2) for subs in INSTRUCTIONS]
    encode = jax.jit(lambda ids: pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids))
    ids = jnp.stack([t.ids for t in tokens])  # (B, K, 77)
    contexts = encode(ids.reshape(-1, 77)).reshape(*ids.shape, -1)
    null = encode(jnp.asarray(pipe.tokenizer([""], padding="max_length", max_length=77).input_ids, jnp.int32))
    batch = len(INSTRUCTIONS)
    rng = np.random.RandomState(0)
    inputs = SamplerInputs(
        image_latents=jnp.asarray(rng.randn(batch, *LATENT, 4), jnp.float32),
        context=contexts[:, 0],
        null_context=jnp.broadcast_to(null, contexts[:, 0].shape),
        keys=jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(batch)),
        guidance_scale=jnp.full((batch,), SCALES[0]),
        image_guidance_scale=jnp.full((batch,), SCALES[1]),
        latents=jnp.asarray(rng.randn(batch, *LATENT, 4), jnp.float32),
    )
    foi_inputs = FoIInputs(
        keyword_weights=jnp.stack([t.keyword_weights for t in tokens]),
        owner=jnp.stack([t.owner for t in tokens]),
        token_alpha=jnp.stack([t.token_alpha for t in tokens]),
        valid=jnp.stack([t.valid for t in tokens]),
        contexts=contexts,
    )
    return Case(pipe, inputs, foi_inputs, contexts)


def by_hand(case: Case, cfg: FoIConfig, per_branch_masks: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The per-instruction edit step by step (``per_branch_masks=False``: every text term in the union of the
    masks instead, the teeth of the test)."""
    pipe, inputs, foi_inputs = case.pipe, case.inputs, case.foi_inputs
    scheduler, params = pipe.scheduler, pipe.params["unet"]
    schedule = scheduler.schedule(STEPS)
    first = STEPS - STEPS_RUN
    batch, slots = foi_inputs.valid.shape
    s_text, s_image = SCALES
    image = inputs.image_latents
    contexts = jnp.concatenate([case.contexts[:, k] for k in range(slots)] + [inputs.null_context] * 2)
    images = jnp.concatenate([image] * (slots + 1) + [jnp.zeros_like(image)])
    valid = foi_inputs.valid.astype(jnp.float32)

    @jax.jit
    def branches(sample, timestep, control):
        x = jnp.concatenate([jnp.concatenate([sample] * (slots + 2)), images], -1)
        eps, aux = pipe.unet.apply({"params": params}, x, timestep, contexts, control)
        return eps.reshape(slots + 2, batch, *eps.shape[1:]), aux

    sample = pipe.vae.config.scaling_factor * image + schedule.sigmas[first] * inputs.latents
    masks = None
    for run in range(STEPS_RUN):
        index = first + run
        timestep = schedule.timesteps[index]
        control = RecordCrossAttention(sizes=(MASKS,)) if run == 0 else None
        if run > 0:
            control = BranchModulationByHand(masks, foi_inputs.token_alpha, 0.05 * (timestep / 1000.0) ** 4)
        eps, aux = branches(scheduler.scale_model_input(schedule, index, sample), timestep, control)
        if run == 0:  # slot k's keyword in branch k's maps
            maps = mean_of_layers(aux)
            taus = jnp.stack([hand_tau(key, cfg.tau) for key in inputs.keys])
            masks = jnp.stack(
                [
                    foi.extract_masks(
                        maps[k * batch : (k + 1) * batch],
                        foi_inputs.keyword_weights[:, k : k + 1],
                        foi_inputs.valid[:, k : k + 1],
                        taus,
                        cfg.gamma,
                        cfg.filter_size,
                        cfg.filter_sigma,
                    )[:, 0]
                    for k in range(slots)
                ],
                axis=1,
            )
        e_img, e_none = eps[slots], eps[slots + 1]
        guided = e_none + s_image * (e_img - e_none)
        for k in range(slots):
            weight = valid[:, k, None, None, None]
            if run < cfg.decoupled_fraction * STEPS_RUN:
                region = masks[:, k] if per_branch_masks else jnp.clip(masks.sum(axis=1), 0, 1)
                weight = weight * jnp.repeat(jnp.repeat(region, 2, axis=1), 2, axis=2)[..., None]
            guided = guided + weight * s_text * (eps[k] - e_img)
        noise = jnp.stack(
            [
                jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, 1), index), sample.shape[1:])
                for k in inputs.keys
            ]
        )
        sample, _ = scheduler.step(schedule, index, sample, guided, noise)
    return np.asarray(sample), np.asarray(masks)


def test_the_per_instruction_step_by_hand(case):
    """Two images, one with two sub-instructions and one with one (a padded slot): the sampler's masks equal the
    ones cut from each branch's own maps, its latents the hand computation's. Teeth: guiding every text term inside
    the union of the masks instead gives other latents."""
    settings = SamplerSettings(case.pipe.scheduler, STEPS, STRENGTH, scaling_factor=case.pipe.vae.config.scaling_factor)
    apply = lambda p, x, t, c, control: case.pipe.unet.apply({"params": p}, x, t, c, control)  # noqa: E731
    sampler = make_foi_sampler(apply, settings, PER_INSTRUCTION, data_mesh(jax.devices()[:1]), LATENT)
    latents, masks, maps = sampler(case.pipe.params["unet"], case.inputs, case.foi_inputs)
    expected_latents, expected_masks = by_hand(case, PER_INSTRUCTION)
    np.testing.assert_array_equal(np.asarray(masks), expected_masks)
    assert expected_masks[0].sum(axis=(1, 2)).min() > 0 and expected_masks[1, 1].sum() == 0  # the padded slot
    assert (expected_masks[0, 0] != expected_masks[0, 1]).any(), "the two sub-instructions' masks must differ"
    assert maps.shape == (2, 2, *MASKS)
    assert_close(np.asarray(latents), expected_latents)
    assert_differs(expected_latents, by_hand(case, PER_INSTRUCTION, per_branch_masks=False)[0], "own vs union")


def test_guidance_formula_with_one_branch_is_the_composite_formula():
    """``per_instruction_guidance`` with ``K = 1`` is ``dual_guidance`` with the mask, to the bit; with two branches
    each term is masked by its own mask."""
    from ip2p_jax.guidance import dual_guidance

    rng = np.random.RandomState(0)
    eps = jnp.asarray(rng.randn(3, 2, 4, 4, 4), jnp.float32)
    mask = jnp.asarray(rng.rand(2, 4, 4, 1) > 0.5, jnp.float32)
    one = foi.per_instruction_guidance(eps, 7.5, 1.5, mask[None])
    np.testing.assert_array_equal(np.asarray(one), np.asarray(dual_guidance(eps, 7.5, 1.5, mask)))
    eps2 = jnp.asarray(rng.randn(4, 2, 4, 4, 4), jnp.float32)
    masks = jnp.asarray(rng.rand(2, 2, 4, 4, 1) > 0.5, jnp.float32)
    expected = (
        eps2[3] + 1.5 * (eps2[2] - eps2[3]) + 7.5 * ((eps2[0] - eps2[2]) * masks[0] + (eps2[1] - eps2[2]) * masks[1])
    )
    np.testing.assert_allclose(foi.per_instruction_guidance(eps2, 7.5, 1.5, masks), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- through the pipeline


def test_one_sub_instruction_per_instruction_equals_composite(pipe, image):
    """With one sub-instruction, its own branch is the composite prompt's: the same masks and pictures."""
    subs = [("make the sky blue", "sky", 1.5)]
    composite = pipe(image, instructions=subs, foi=FOI, **CALL)
    per = pipe(image, instructions=subs, foi=PER_INSTRUCTION, **CALL)
    np.testing.assert_array_equal(per.masks[0]["latent"], composite.masks[0]["latent"])
    difference = np.abs(per.images - composite.images).max()
    print(f"per-instruction vs composite, one sub-instruction: max abs pixel difference {difference:.1e}")
    assert difference <= 1e-6


def test_given_full_masks_with_zero_alpha_equal_ip2p(pipe, image):
    """Masks given in place of FoI's own reach the sampler unchanged: all ones with alpha 0 is IP2P at FoI's
    strength (FoI's own masks at the default tau would be partial), and the masks returned are the ones given."""
    subs = [("make the sky blue", "sky", 0.0), ("turn the cat red", "cat", 0.0)]
    ones = np.ones((2, SIZE, SIZE), bool)
    edited = pipe(image, instructions=subs, foi=FOI, masks=[ones], **CALL)
    own = pipe(image, instructions=subs, foi=FOI, **CALL)
    assert own.masks[0]["latent"].min() == 0.0, "FoI's own masks must be partial for the test to see the given ones"
    plain = pipe(image, prompt="make the sky blue, turn the cat red", strength=0.8, **CALL)
    assert edited.masks[0]["latent"].min() == 1.0
    assert np.abs(edited.images - plain.images).max() <= 1e-5


def test_given_masks_are_brought_to_the_mask_resolution(pipe, image):
    """A painted square at the image's 32 x 32 becomes the cells of the 8 x 8 masks it touches; a per-instruction
    edit takes given masks as well."""
    painted = np.zeros((2, SIZE, SIZE), np.uint8)
    painted[0, 4:9, 4:9] = 1  # cells 1-2 of 8 (4 px each), touching cell 2 by one pixel
    painted[1, 20:32, 0:12] = 1
    subs = [("make the sky blue", "sky"), ("turn the cat red", "cat")]
    edited = pipe(image, instructions=subs, foi=PER_INSTRUCTION, masks=painted, **CALL)
    expected = np.zeros((2, 8, 8), np.float32)
    expected[0, 1:3, 1:3] = 1
    expected[1, 5:8, 0:3] = 1
    np.testing.assert_array_equal(edited.masks[0]["latent"], expected)


@pytest.mark.parametrize(
    "call,message",
    [
        (dict(masks=[np.ones((2, 56, 72), bool)]), r"expected shape \(1, 56, 72\)"),
        (dict(masks=[np.ones((1, 56, 70), bool)]), r"expected shape \(1, 56, 72\)"),
        (dict(masks=[np.full((1, 56, 72), 2, np.uint8)]), "values must be 0 or 1"),
        (dict(masks=[np.ones((1, 56, 72), bool)] * 2), "2 mask arrays for 1 images"),
        (dict(instructions=None, foi=None, prompt="make it red", masks=[np.ones((1, 56, 72))]), "masks= are FoI's"),
        (dict(foi=PER_INSTRUCTION, guidance_rescale=0.7), "guidance_rescale is not defined"),
        (
            dict(instructions=[("make it red", "blue")], foi=PER_INSTRUCTION),
            "'blue' does not occur in sub-instruction 0",
        ),
    ],
)
def test_bad_masks_and_branches_are_errors_before_anything_compiles(pipe_vae8x, monkeypatch, call, message):
    pipe = pipe_vae8x

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline encoded or compiled before finding the error")

    for name in ("encode_prompt", "encode_image", "_encode_ids", "sampler", "foi_sampler", "_compile"):
        monkeypatch.setattr(pipe, name, refuse)
    image = Image.fromarray(np.zeros((56, 72, 3), np.uint8))
    call = {"instructions": ["make it red"], "foi": FOI, **CALL, **call}
    with pytest.raises(ValueError, match=message):
        pipe(image, **call)


def test_text_branches_is_checked():
    with pytest.raises(ValueError, match=r"text_branches must be one of \('composite', 'per_instruction'\)"):
        FoIConfig(text_branches="each")


def test_noise_difference_maps_find_where_the_text_changes_the_prediction():
    """Each text branch differs from the image-only branch in its own 4 x 4 block of a 16 x 16 latent: per
    instruction, slot k's map at 8 x 8 is largest on its block's 2 x 2 cells; composite, every slot gets the one
    text branch's map."""
    rng = np.random.RandomState(0)
    base = rng.randn(1, 2, 16, 16, 4).astype(np.float32)
    outputs = np.repeat(base, 4, axis=0)  # [text 1, text 2, image only, none]
    outputs[0, :, 0:4, 0:4] += 3.0
    outputs[1, :, 8:12, 4:8] -= 3.0
    maps = np.asarray(foi.noise_difference_maps(jnp.asarray(outputs), 2, True, (8, 8)))
    assert maps.shape == (2, 2, 8, 8)
    for k, (rows, cols) in enumerate([(slice(0, 2), slice(0, 2)), (slice(4, 6), slice(2, 4))]):
        inside = maps[:, k, rows, cols]
        np.testing.assert_allclose(inside, 3.0, rtol=1e-6)
        outside = maps[:, k].copy()
        outside[:, rows, cols] = 0
        assert outside.max() < 3.0
    composite = np.asarray(foi.noise_difference_maps(jnp.asarray(outputs[[0, 2, 3]]), 2, False, (8, 8)))
    np.testing.assert_array_equal(composite[:, 0], composite[:, 1])
    np.testing.assert_array_equal(composite[:, 0], maps[:, 0])


@pytest.mark.parametrize("config", [FOI, PER_INSTRUCTION], ids=["composite", "per_instruction"])
def test_noise_difference_masks_in_both_modes(pipe, image, config):
    """The noise-difference source edits in both modes; its masks are 0 / 1 at the mask resolution, and not the
    attention's."""
    subs = [("make the sky blue", "sky"), ("turn the cat red", "cat")]
    noise = pipe(image, instructions=subs, foi=dataclasses.replace(config, mask_source="noise_difference"), **CALL)
    attention = pipe(image, instructions=subs, foi=config, **CALL)
    masks = noise.masks[0]["latent"]
    assert masks.shape == (2, 8, 8) and set(np.unique(masks)) <= {0.0, 1.0} and 0 < masks.sum() < masks.size
    assert (masks != attention.masks[0]["latent"]).any()
    if config.text_branches == "composite":
        np.testing.assert_array_equal(masks[0], masks[1])
