"""Flax params -> diffusers / transformers folders: every tensor back under its PyTorch name and layout."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_UNETS, make_text_encoder, make_unet, make_vae
from safetensors.numpy import load_file

from ip2p_jax.weights import load_text_encoder, load_unet, load_vae
from ip2p_jax.weights.convert import torch_key
from ip2p_jax.weights.export import save_text_encoder, save_unet, save_vae


def test_torch_key_inverts_flax_names():
    assert torch_key(("down_blocks_0", "resnets_1", "conv1", "kernel")) == "down_blocks.0.resnets.1.conv1.weight"
    assert torch_key(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"
    assert torch_key(("attn1", "to_out_0", "kernel")) == "attn1.to_out.0.weight"
    assert torch_key(("norm", "scale")) == "norm.weight"


@pytest.mark.parametrize("component", [*TINY_UNETS, "vae", "text_sd1", "text_sd2"])
def test_saved_weights_equal_the_reference_state_dict(component, vocab_size, tmp_path):
    """Load a PyTorch model's folder, save it back from the Flax params: same keys, shapes and values."""
    if component == "vae":
        model, load, save = make_vae(), load_vae, save_vae
    elif component.startswith("text"):
        model, load, save = make_text_encoder(component[5:], vocab_size), load_text_encoder, save_text_encoder
    else:
        model, load, save = make_unet(component), load_unet, save_unet
    model.save_pretrained(tmp_path / "reference")
    _, params = load(tmp_path / "reference", subfolder="")
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    folder = save(tmp_path / "ours", params, config)
    written = load_file(str(next(folder.glob("*.safetensors"))))
    expected = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    # And the written folder loads with the library that owns the format, nothing missing or left over.
    _, info = type(model).from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
