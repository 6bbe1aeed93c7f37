"""The Flax VAE against diffusers' ``AutoencoderKL`` (PyTorch) on a tiny random model."""

import jax
import numpy as np
import pytest
import torch
from conftest import make_vae, max_relative_error

from ip2p_jax.models.vae import VAEConfig, sample_latent
from ip2p_jax.weights import load_vae
from ip2p_jax.weights.convert import rename_old_vae_attention

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vae_case(tmp_path_factory):
    reference = make_vae()
    folder = tmp_path_factory.mktemp("vae")
    reference.save_pretrained(folder / "vae")
    module, params = load_vae(folder)
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    return reference, module, params, encode, decode


def nchw(x):
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(x):
    return x.numpy().transpose(0, 2, 3, 1)


def test_encode_matches_diffusers(vae_case):
    reference, module, params, encode, _ = vae_case
    images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
    mean, logvar = encode(params, images)
    with torch.no_grad():
        dist = reference.encode(nchw(images)).latent_dist
    assert mean.shape == (2, 16, 12, 4)
    for name, ours, expected in (("mean", mean, dist.mean), ("logvar", logvar, dist.logvar)):
        error = max_relative_error(ours, nhwc(expected))
        print(f"VAE encode {name}: max abs diff / max abs ref = {error:.2e}")
        assert error <= TOLERANCE


def test_decode_matches_diffusers(vae_case):
    reference, _, params, _, decode = vae_case
    latents = np.random.RandomState(1).randn(2, 16, 12, 4).astype(np.float32)
    ours = decode(params, latents)
    with torch.no_grad():
        expected = nhwc(reference.decode(nchw(latents)).sample)
    error = max_relative_error(ours, expected)
    print(f"VAE decode: max abs diff / max abs ref = {error:.2e}")
    assert ours.shape == (2, 32, 24, 3) and error <= TOLERANCE


def test_scaling_factor_and_sampling(vae_case):
    _, module, params, encode, _ = vae_case
    assert module.config.scaling_factor == pytest.approx(0.18215)
    mean, logvar = encode(params, np.zeros((1, 32, 32, 3), np.float32))
    draws = jax.vmap(lambda k: sample_latent(mean, logvar, k))(jax.random.split(jax.random.key(0), 256))
    np.testing.assert_allclose(draws.mean(0), mean, atol=4 * float(np.exp(0.5 * logvar).max()) / 16)
    np.testing.assert_allclose(draws.std(0), np.exp(0.5 * logvar), rtol=0.25)


def test_old_attention_names_are_renamed():
    assert rename_old_vae_attention("encoder.mid_block.attentions.0.query.weight") == (
        "encoder.mid_block.attentions.0.to_q.weight"
    )
    assert rename_old_vae_attention("decoder.mid_block.attentions.0.proj_attn.bias") == (
        "decoder.mid_block.attentions.0.to_out.0.bias"
    )
    assert rename_old_vae_attention("encoder.conv_in.weight") == "encoder.conv_in.weight"


def test_old_attention_checkpoint_loads(tmp_path, vae_case):
    """A checkpoint with pre-0.14 attention names and 1x1-conv-shaped projections loads to the same params."""
    from safetensors.torch import save_file

    reference, _, params, _, _ = vae_case
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, tensor in reference.state_dict().items():
        for new, old in old_names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]
        state[key] = tensor.contiguous()
    (tmp_path / "vae").mkdir()
    save_file(state, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    reference.save_config(tmp_path / "vae")
    _, old_params = load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, old_params, params)


def test_unsupported_vae_settings_are_errors():
    with pytest.raises(ValueError, match="shift_factor=0.1 is not implemented"):
        VAEConfig.from_diffusers({"shift_factor": 0.1})
    with pytest.raises(ValueError, match="unknown settings"):
        VAEConfig.from_diffusers({"use_tiling_magic": True})


def test_known_settings_cover_diffusers():
    """Every AutoencoderKL argument is either implemented or rejected by name; none is silently ignored."""
    import inspect

    from diffusers import AutoencoderKL

    names = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    assert names - VAEConfig.known_settings() == set()
    assert VAEConfig.from_diffusers({}) == VAEConfig()  # diffusers' defaults
