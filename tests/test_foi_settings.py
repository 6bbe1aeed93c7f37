"""FoI's settings pinned by reference computations on the tiny model.

Each test runs ``make_foi_sampler`` for a few steps with one setting changed and compares its latents and masks with
the same steps computed here by hand, from the paper's reading in ``docs/foi.md``: the three guidance branches run
as plain UNet calls (the maps of the mask step recorded with ``RecordCrossAttention``, the masks cut with
``foi.extract_masks``), the modulation as an attention control written here from the formulas (not
``FoIModulation``), the guidance formula with and without the union mask written out, the Euler ancestral steps
taken with the scheduler's tested step function and each step's noise drawn from the key as the sampler documents.

Every test also checks that it has teeth: the hand computation with the setting ignored (or switched) differs from
the one with it by far more than the tolerance, so a sampler that ignored the setting would fail. The tolerance is
the one of ``tests/test_foi_sampling.py`` (1e-5 relative to the largest value).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from ip2p_jax import foi
from ip2p_jax.foi import FoIConfig, FoIInputs, make_foi_sampler
from ip2p_jax.models.attention import AttentionControl, RecordCrossAttention, attention_scores, mean_of_layers
from ip2p_jax.parallel import data_mesh
from ip2p_jax.pipeline import InstructPix2PixPipeline
from ip2p_jax.sampling import SamplerInputs, SamplerSettings

LATENT = (16, 16)  # the tiny UNet's cross-attention runs at 16 x 16, 8 x 8 and 4 x 4 (mid block)
MASKS = (8, 8)  # mask_downsample 2
STEPS, STRENGTH = 5, 0.8  # 4 steps run (schedule indices 1..4), the fewest that leave every window room to differ
STEPS_RUN = 4
BASE = FoIConfig(mask_downsample=2)  # the paper's settings, masks at 8 x 8
SCALES = (7.5, 1.5)  # s_T, s_I
INSTRUCTIONS = [
    [("make the sky blue", "sky"), ("turn the cat red", "cat")],
    [("turn the dog green", "dog"), ("add a hat", "hat", 2.0)],
]
RTOL = 1e-5  # tests/test_foi_sampling.py's tolerance: relative to the largest value


# ---------------------------------------------------------------------------------------------- the computation by hand


def resize_by_hand(masks_bkhw: jax.Array, size: tuple[int, int]) -> jax.Array:
    """0 / 1 masks to a layer's size: a whole-ratio enlargement repeats cells (bilinear + ``>= 0.5`` does exactly that
    at 2x and 4x), a whole-ratio shrinking keeps a cell when any of its sub-cells is inside (docs/foi.md)."""
    (h, w), (height, width) = masks_bkhw.shape[2:], size
    if height >= h:
        assert height % h == 0 and width % w == 0
        return jnp.repeat(jnp.repeat(masks_bkhw, height // h, axis=2), width // w, axis=3)
    assert h % height == 0 and w % width == 0
    return masks_bkhw.reshape(*masks_bkhw.shape[:2], height, h // height, width, w // width).max(axis=(3, 5))


class ModulationByHand(AttentionControl):
    """Paper 4.2 as docs/foi.md states it, written out for this test (independent of ``foi.FoIModulation``).

    For the text+image branch (first third of the batch): ``softmax(X + dX) * M @ V_own + softmax(Y) * (1 - M) @ V_out``
    with ``dX = alpha_tok * xi * (max_k X - X)``, ``Y`` the image-only branch's scores, ``M[q, t]`` the mask of the
    sub-instruction owning token ``t`` (the union for unowned tokens), ``V_out`` the branch's own values or the
    image-only branch's. The other two branches are the plain model.
    """

    masks: jax.Array  # (B, K, 8, 8)
    owner: jax.Array  # (B, T, K)
    token_alpha: jax.Array  # (B, T)
    xi_t: jax.Array
    outside_values: str = struct.field(pytree_node=False, default="own")

    def replaces_output(self, layer):
        return True

    def output(self, q_bqnd, k_bknd, v_bknd, layer):
        scores_bnqk = attention_scores(q_bqnd, k_bknd)
        batch, slots = self.masks.shape[:2]

        def probs_times_values(probs_bnqk, v):
            return jnp.einsum("bnqk,bknd->bqnd", probs_bnqk, v).reshape(probs_bnqk.shape[0], probs_bnqk.shape[2], -1)

        plain = probs_times_values(jax.nn.softmax(scores_bnqk, axis=-1), v_bknd)
        layer_masks = resize_by_hand(self.masks, layer.size).reshape(batch, slots, -1)  # (B, K, Q)
        union = jnp.clip(layer_masks.sum(axis=1), 0, 1)  # (B, Q)
        owned = self.owner.sum(axis=-1) > 0  # (B, T)
        by_owner = jnp.einsum("bkq,btk->bqt", layer_masks, self.owner)
        mask = jnp.where(owned[:, None, :], by_owner, union[:, :, None])[:, None]  # (B, 1, Q, T)
        x, y = scores_bnqk[:batch], scores_bnqk[batch : 2 * batch]
        boost = self.token_alpha[:, None, None, :] * self.xi_t * (x.max(axis=-1, keepdims=True) - x)
        v_own = v_bknd[:batch]
        v_out = v_own if self.outside_values == "own" else v_bknd[batch : 2 * batch]
        text = probs_times_values(jax.nn.softmax(x + boost, axis=-1) * mask, v_own)
        text = text + probs_times_values(jax.nn.softmax(y, axis=-1) * (1 - mask), v_out)
        return jnp.concatenate([text, plain[batch:]]), None


@dataclasses.dataclass
class Case:
    """Everything one edit of the batch needs, shared by the sampler and the hand computation."""

    pipe: InstructPix2PixPipeline
    inputs: SamplerInputs
    foi_inputs: FoIInputs
    branches: Callable  # jitted (params, sample_bhwc, timestep, control) -> ((3, B, h, w, 4), aux)
    samplers: dict


def _make_case(pipe: InstructPix2PixPipeline, tokenizer) -> Case:
    batch = len(INSTRUCTIONS)
    tokens = [foi.instruction_tokens(tokenizer, [foi.SubInstruction(*s) for s in subs]) for subs in INSTRUCTIONS]
    encode = jax.jit(lambda p, ids: pipe.text_encoder.apply({"params": p}, ids))
    context = encode(pipe.params["text_encoder"], jnp.stack([t.ids for t in tokens]))
    null_ids = jnp.asarray(tokenizer([""], padding="max_length", max_length=77).input_ids, jnp.int32)
    null = jnp.broadcast_to(encode(pipe.params["text_encoder"], null_ids), context.shape)
    rng = np.random.RandomState(0)
    image_latents = jnp.asarray(rng.randn(batch, *LATENT, 4), jnp.float32)
    inputs = SamplerInputs(
        image_latents=image_latents,
        context=context,
        null_context=null,
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
    )

    @jax.jit
    def branches(params, sample, timestep, control):
        """The guidance batch ``[text+image, image only, none]`` (DESIGN.md) in one plain UNet call."""
        x = jnp.concatenate([sample] * 3)
        image = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)])
        contexts = jnp.concatenate([context, null, null])
        eps, aux = pipe.unet.apply({"params": params}, jnp.concatenate([x, image], -1), timestep, contexts, control)
        return eps.reshape(3, batch, *eps.shape[1:]), aux

    return Case(pipe, inputs, foi_inputs, branches, {})


def by_hand(case: Case, cfg: FoIConfig) -> tuple[np.ndarray, np.ndarray]:
    """The FoI edit of ``case`` under ``cfg``, step by step: ``(latents (B, 16, 16, 4), masks (B, K, 8, 8))``."""
    pipe, inputs = case.pipe, case.inputs
    scheduler = pipe.scheduler
    schedule = scheduler.schedule(STEPS)
    first = STEPS - STEPS_RUN
    params = pipe.params["unet"]
    s_text, s_image = SCALES
    # Paper 5.1's start: the scaled image latent noised to the first step run (Euler: plus sigma times the noise).
    sample = pipe.vae.config.scaling_factor * inputs.image_latents + schedule.sigmas[first] * inputs.latents
    masks = None
    for run in range(STEPS_RUN):
        index = first + run
        timestep = schedule.timesteps[index]
        control = None  # plain IP2P steps before the mask step, and modulated steps past modulation_stop
        if run == cfg.mask_step:
            control = RecordCrossAttention(sizes=(MASKS,))
        elif run > cfg.mask_step and cfg.modulation and run < cfg.modulation_stop * STEPS_RUN:
            control = ModulationByHand(
                masks=masks,
                owner=case.foi_inputs.owner,
                token_alpha=case.foi_inputs.token_alpha,
                xi_t=0.05 * (timestep / 1000.0) ** 4,
                outside_values=cfg.outside_values,
            )
        eps, aux = case.branches(params, scheduler.scale_model_input(schedule, index, sample), timestep, control)
        if run == cfg.mask_step:  # maps of the text+image branch, averaged over the 8 x 8 layers
            taus = jnp.stack([hand_tau(key, cfg.tau) for key in inputs.keys])
            masks = foi.extract_masks(
                mean_of_layers(aux)[: len(taus)],
                case.foi_inputs.keyword_weights,
                case.foi_inputs.valid,
                taus,
                cfg.gamma,
                cfg.filter_size,
                cfg.filter_sigma,
            )
        e_full, e_image, e_none = eps
        text_term = s_text * (e_full - e_image)
        if masks is not None and cfg.decoupled_guidance and run < cfg.decoupled_fraction * STEPS_RUN:
            union = jnp.clip(masks.sum(axis=1), 0, 1)  # (B, 8, 8) -> the 16 x 16 latent, each cell repeated
            text_term = text_term * jnp.repeat(jnp.repeat(union, 2, axis=1), 2, axis=2)[..., None]
        guided = e_none + s_image * (e_image - e_none) + text_term
        noise = jnp.stack(
            [
                jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, 1), index), sample.shape[1:])
                for k in inputs.keys
            ]
        )
        sample, _ = scheduler.step(schedule, index, sample, guided, noise)
    return np.asarray(sample), np.asarray(masks)


def hand_tau(key: jax.Array, tau) -> jax.Array:
    """An image's threshold: the value, or uniform in ``(low, high)`` from ``fold_in(key, 2)`` (the sampler's
    documented stream for tau)."""
    if isinstance(tau, float):
        return jnp.float32(tau)
    return jax.random.uniform(jax.random.fold_in(key, 2), (), jnp.float32, tau[0], tau[1])


def by_sampler(case: Case, cfg: FoIConfig) -> tuple[np.ndarray, np.ndarray]:
    """``make_foi_sampler``'s latents and masks for ``cfg`` (one compilation per config, kept for the module)."""
    if cfg not in case.samplers:
        settings = SamplerSettings(
            case.pipe.scheduler, STEPS, STRENGTH, scaling_factor=case.pipe.vae.config.scaling_factor
        )
        assert settings.num_steps_run == STEPS_RUN
        apply = lambda p, x, t, c, control: case.pipe.unet.apply({"params": p}, x, t, c, control)  # noqa: E731
        sampler = make_foi_sampler(apply, settings, cfg, data_mesh(jax.devices()[:1]), LATENT)
        latents, masks, _ = sampler(case.pipe.params["unet"], case.inputs, case.foi_inputs)
        case.samplers[cfg] = (np.asarray(latents), np.asarray(masks))
    return case.samplers[cfg]


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def assert_differs(one: np.ndarray, other: np.ndarray, what: str) -> None:
    """The test's teeth: two hand computations differ by at least 100 times the tolerance."""
    difference = np.abs(one - other).max() / np.abs(one).max()
    assert difference > 100 * RTOL, f"{what}: the hand computations differ by only {difference:.1e}"


def check(case: Case, cfg: FoIConfig) -> tuple[np.ndarray, np.ndarray]:
    """The sampler agrees with the hand computation for ``cfg``: masks exactly, latents at the tolerance."""
    latents, masks = by_sampler(case, cfg)
    expected_latents, expected_masks = by_hand(case, cfg)
    union = expected_masks.max(axis=1)
    assert (union.sum(axis=(1, 2)) > 0).all() and (union.min(axis=(1, 2)) == 0).all(), "masks must be partial"
    np.testing.assert_array_equal(masks, expected_masks)
    difference = np.abs(latents - expected_latents).max() / np.abs(expected_latents).max()
    print(f"{cfg}: sampler vs hand, max relative difference {difference:.1e}")
    assert_close(latents, expected_latents)
    return expected_latents, expected_masks


@pytest.fixture(scope="module")
def case(pipeline_dir) -> Case:
    pipe = InstructPix2PixPipeline.from_pretrained(pipeline_dir)
    return _make_case(pipe, pipe.tokenizer)


# ---------------------------------------------------------------------------------------------- tests


def test_decoupled_window_is_the_first_75_percent_of_the_steps_run(case):
    """Paper 4.3: the masked text term in steps run 0-2 of 4 (``r < 0.75 * 4``), the plain IP2P formula in step 3.
    Fails if the window is ignored (every step decoupled) or cut elsewhere (0.5: steps 0-1)."""
    assert BASE.decoupled_fraction == 0.75
    expected, _ = check(case, BASE)
    assert_differs(expected, by_hand(case, dataclasses.replace(BASE, decoupled_fraction=1.0))[0], "window vs all")
    assert_differs(expected, by_hand(case, dataclasses.replace(BASE, decoupled_fraction=0.5))[0], "0.75 vs 0.5")


def test_decoupled_fraction_is_read(case):
    """``decoupled_fraction=0.25``: only the mask step (step run 0) has the masked text term."""
    cfg = dataclasses.replace(BASE, decoupled_fraction=0.25)
    expected, _ = check(case, cfg)
    assert_differs(expected, by_hand(case, BASE)[0], "0.25 vs 0.75")


def test_modulation_stop(case):
    """``modulation_stop=0.5``: step run 1 (the first after the mask step, ``1 < 0.5 * 4``) is modulated; steps 2-3
    run the plain attention while decoupled guidance goes on. Fails if the stop is ignored (modulated to the end)."""
    cfg = dataclasses.replace(BASE, modulation_stop=0.5)
    expected, _ = check(case, cfg)
    assert_differs(expected, by_hand(case, BASE)[0], "stop 0.5 vs 1")
    assert_differs(expected, by_hand(case, dataclasses.replace(BASE, modulation=False))[0], "stop 0.5 vs none")


@pytest.mark.parametrize("switch", ["modulation", "decoupled_guidance"])
def test_switches(case, switch):
    """``modulation=False``: masks and decoupled guidance, attention plain in every step; ``decoupled_guidance=False``:
    masks and modulation, the plain IP2P guidance in every step. Each fails if its switch is ignored."""
    cfg = dataclasses.replace(BASE, **{switch: False})
    expected, _ = check(case, cfg)
    assert_differs(expected, by_hand(case, BASE)[0], f"{switch} off vs on")


def test_mask_step(case):
    """``mask_step=1``: step run 0 is plain IP2P (full text guidance, no control), the maps of step run 1 (its own
    sample and timestep) give the masks, the guidance of steps 1-2 is decoupled and steps 2-3 are modulated. Fails if
    the masks are built at step 0, or step 0 is decoupled."""
    cfg = dataclasses.replace(BASE, mask_step=1)
    expected, masks = check(case, cfg)
    expected_at_0, masks_at_0 = by_hand(case, BASE)
    assert (masks != masks_at_0).any(), "the masks of step runs 0 and 1 must differ for the test to see the step"
    assert_differs(expected, expected_at_0, "mask step 1 vs 0")


def test_tau_drawn_per_image_from_a_range(case):
    """``tau=(0.2, 0.8)``: each image thresholds at its own ``uniform(fold_in(key, 2), low, high)``. Fails if the
    range's low or high end or its middle is used, or one draw serves the whole batch."""
    cfg = dataclasses.replace(BASE, tau=(0.2, 0.8))
    taus = [float(hand_tau(key, cfg.tau)) for key in case.inputs.keys]
    print(f"drawn taus {taus}")
    expected, masks = check(case, cfg)
    for tau in (0.2, 0.5, 0.8):
        assert (by_hand(case, dataclasses.replace(BASE, tau=tau))[1] != masks).any(), f"tau {tau} gives these masks"
    for image, tau in enumerate(taus):  # the other image's draw would give other masks
        _, other = by_hand(case, dataclasses.replace(BASE, tau=taus[1 - image]))
        assert (other[image] != masks[image]).any(), f"image {image}'s masks do not depend on its own tau {tau}"


@pytest.mark.parametrize("outside_values", ["own", "image_only"])
def test_outside_values(case, outside_values):
    """Outside the mask the text+image branch takes the image-only branch's probabilities times its own values
    (``"own"``) or times the image-only branch's values (``"image_only"``). Fails if the setting is ignored."""
    cfg = dataclasses.replace(BASE, outside_values=outside_values)
    expected, _ = check(case, cfg)
    other = "image_only" if outside_values == "own" else "own"
    assert_differs(expected, by_hand(case, dataclasses.replace(BASE, outside_values=other))[0], "own vs image_only")
