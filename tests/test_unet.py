"""The Flax UNet against diffusers' ``UNet2DConditionModel`` (PyTorch) on tiny random models."""

import functools
import inspect
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_UNETS, make_unet, max_relative_error

from ip2p_jax.models.attention import AttentionControl, RecordCrossAttention, mean_of_layers
from ip2p_jax.models.unet import UNetConfig
from ip2p_jax.weights import load_unet

TOLERANCE = 1e-4
# Latent sizes per config: sd2 runs an odd size, so its upsamplers must hit the skips' sizes (5 -> 3 -> 5 ...).
SIZES = {"sd1": (16, 16), "sd2": (10, 14), "sd_4ch": (8, 12)}


class CaptureCrossAttention:
    """A diffusers attention processor that computes attention step by step and keeps the head-averaged
    cross-attention probabilities, ``(B, Q, K)``, under the layer's name."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)
        if is_cross:
            batch = hidden_states.shape[0]
            self.store[self.name] = probs.reshape(batch, attn.heads, *probs.shape[1:]).mean(1).numpy()
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def inputs(name, batch=2, tokens=5):
    cfg = TINY_UNETS[name]
    height, width = SIZES[name]
    rng = np.random.RandomState(0)
    sample = rng.randn(batch, height, width, cfg["in_channels"]).astype(np.float32)
    context = rng.randn(batch, tokens, cfg["cross_attention_dim"]).astype(np.float32)
    timesteps = np.array([981.0, 1.0][:batch], np.float32)
    return sample, timesteps, context


@functools.cache
def loaded_unet(name):
    """(name, reference torch model, our module, params, jitted apply) for one tiny config, built once."""
    reference = make_unet(name)
    folder = Path(tempfile.mkdtemp(prefix=f"unet-{name}-"))
    reference.save_pretrained(folder / "unet")
    module, params = load_unet(folder)
    return name, reference, module, params, jax.jit(module.apply)


@pytest.fixture(scope="module", params=sorted(TINY_UNETS))
def unet_case(request):
    return loaded_unet(request.param)


def run_reference(reference, sample, timesteps, context):
    with torch.no_grad():
        out = reference(torch.tensor(sample.transpose(0, 3, 1, 2)), torch.tensor(timesteps), torch.tensor(context))
    return out.sample.numpy().transpose(0, 2, 3, 1)


def test_unet_matches_diffusers(unet_case):
    name, reference, _, params, apply = unet_case
    sample, timesteps, context = inputs(name)
    eps, aux = apply({"params": params}, sample, timesteps, context)
    assert aux == {}
    error = max_relative_error(eps, run_reference(reference, sample, timesteps, context))
    print(f"UNet {name} at {SIZES[name]}: max abs diff / max abs ref = {error:.2e}")
    assert error <= TOLERANCE


def test_recorded_cross_attention_matches_diffusers(unet_case):
    name, reference, _, params, apply = unet_case
    sample, timesteps, context = inputs(name)
    store = {}
    processors = {
        key: CaptureCrossAttention(store, key.removesuffix(".processor")) for key in reference.attn_processors
    }
    original = reference.attn_processors
    reference.set_attn_processor(processors)
    try:
        expected_eps = run_reference(reference, sample, timesteps, context)
    finally:
        reference.set_attn_processor(original)
    eps, aux = apply({"params": params}, sample, timesteps, context, control=RecordCrossAttention())
    assert max_relative_error(eps, expected_eps) <= TOLERANCE
    assert sorted(aux) == sorted(store) and len(aux) > 0
    for layer, maps in aux.items():
        batch, height, width, tokens = maps.shape
        error = max_relative_error(maps.reshape(batch, height * width, tokens), store[layer])
        assert error <= TOLERANCE, (layer, error)


def test_record_selects_layers_by_size():
    name, _, _, params, apply = loaded_unet("sd2")
    sample, timesteps, context = inputs(name)
    _, all_maps = apply({"params": params}, sample, timesteps, context, control=RecordCrossAttention())
    sizes = sorted({maps.shape[1:3] for maps in all_maps.values()})
    chosen = sizes[0]
    _, aux = apply({"params": params}, sample, timesteps, context, control=RecordCrossAttention(sizes=(chosen,)))
    assert sorted(aux) == sorted(k for k, v in all_maps.items() if v.shape[1:3] == chosen)
    averaged = mean_of_layers(aux)
    assert averaged.shape == (sample.shape[0], *chosen, context.shape[1])
    np.testing.assert_allclose(averaged.sum(-1), 1.0, rtol=1e-5)  # probabilities over tokens


def test_base_control_is_the_plain_model():
    name, _, _, params, apply = loaded_unet("sd1")
    sample, timesteps, context = inputs(name)
    plain, _ = apply({"params": params}, sample, timesteps, context)
    controlled, aux = apply({"params": params}, sample, timesteps, context, control=AttentionControl())
    assert aux == {}
    np.testing.assert_array_equal(plain, controlled)


def test_known_settings_cover_diffusers():
    """Every UNet2DConditionModel argument is either implemented or rejected by name; none is silently ignored."""
    from diffusers import UNet2DConditionModel

    names = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    assert names - UNetConfig.known_settings() == set()


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift' is not implemented"),
        ({"only_cross_attention": [False, True, False]}, "only_cross_attention"),
        ({"num_attention_heads": 8}, "num_attention_heads=8 is not implemented"),
        (
            {
                "down_block_types": ["SimpleCrossAttnDownBlock2D"],
                "up_block_types": ["UpBlock2D"],
                "block_out_channels": [32],
                "attention_head_dim": 8,
                "cross_attention_dim": 32,
            },
            "SimpleCrossAttnDownBlock2D",
        ),
        ({"made_up_setting": 1}, "unknown settings ['made_up_setting']"),
    ],
)
def test_unsupported_settings_are_errors(setting, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        UNetConfig.from_diffusers(setting)


def test_bfloat16_compute_stays_close():
    """The compute dtype is a setting: bfloat16 runs with float32 params and stays near the float32 output."""
    name, _, module, params, apply = loaded_unet("sd1")
    sample, timesteps, context = inputs(name)
    reference, _ = apply({"params": params}, sample, timesteps, context)
    bf16 = module.clone(dtype=jnp.bfloat16)
    eps, _ = jax.jit(bf16.apply)({"params": params}, sample, timesteps, context)
    assert eps.dtype == jnp.float32
    assert max_relative_error(eps, reference) < 0.05
