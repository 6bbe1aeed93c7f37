"""The Flax CLIP text encoder and tokenizer against transformers (PyTorch) on tiny random models."""

import jax
import numpy as np
import pytest
import torch
from conftest import make_text_encoder, max_relative_error
from transformers import CLIPTokenizer

from ip2p_jax.tokenizer import tokenize
from ip2p_jax.weights import load_text_encoder, load_tokenizer

PROMPTS = ["make the cat blue", "turn it into a photo of a dog with a red hat", ""]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def token_ids(tokenizer_dir):
    return tokenize(load_tokenizer(tokenizer_dir, subfolder=""), PROMPTS)


def test_tokenizer_equals_transformers(tokenizer_dir, token_ids):
    reference = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    expected = reference(
        PROMPTS, padding="max_length", max_length=reference.model_max_length, truncation=True, return_tensors="np"
    ).input_ids
    assert token_ids.shape == (3, 77) and token_ids.dtype == np.int32
    np.testing.assert_array_equal(token_ids, expected)
    # The tiny vocabulary knows these words whole: start, 4 words, end, then padding.
    assert (token_ids[0, 6:] == reference.eos_token_id).all() and token_ids[0, 0] == reference.bos_token_id


def test_long_prompt_is_truncated_with_a_warning(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir, subfolder="")
    with pytest.warns(UserWarning, match="truncated"):
        ids = tokenize(tokenizer, ["cat " * 100])
    assert ids.shape == (1, 77) and ids[0, -1] == tokenizer.eos_token_id


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_text_encoder_matches_transformers(variant, tmp_path, vocab_size, token_ids):
    reference = make_text_encoder(variant, vocab_size)
    reference.save_pretrained(tmp_path / "text_encoder")
    module, params = load_text_encoder(tmp_path)
    ours = jax.jit(module.apply)({"params": params}, token_ids)
    with torch.no_grad():
        expected = reference(torch.tensor(token_ids, dtype=torch.long)).last_hidden_state.numpy()
    error = max_relative_error(ours, expected)
    print(f"text encoder {variant}: max abs diff / max abs ref = {error:.2e}")
    assert error <= TOLERANCE


def test_fp16_variant_is_read_and_upcast(tmp_path, vocab_size, token_ids):
    reference = make_text_encoder("sd1", vocab_size)
    reference.to(torch.float16).save_pretrained(tmp_path / "text_encoder", variant="fp16")
    assert (tmp_path / "text_encoder" / "model.fp16.safetensors").is_file()
    module, params = load_text_encoder(tmp_path, variant="fp16")
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    reference.float()  # the fp16-rounded weights, in float32
    ours = jax.jit(module.apply)({"params": params}, token_ids)
    with torch.no_grad():
        expected = reference(torch.tensor(token_ids, dtype=torch.long)).last_hidden_state.numpy()
    assert max_relative_error(ours, expected) <= TOLERANCE
