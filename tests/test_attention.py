"""Attention building blocks: the CPU tiled path against the fused one, and the control plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.models.attention import _query_tile, _tiled_attention


@pytest.mark.parametrize("length, keys", [(64, 64), (140, 140), (1024, 77), (97, 13)])
def test_tiled_attention_equals_fused(length, keys):
    rng = np.random.RandomState(length)
    q = jnp.asarray(rng.randn(2, length, 3, 8), jnp.float32)
    k = jnp.asarray(rng.randn(2, keys, 3, 8), jnp.float32)
    v = jnp.asarray(rng.randn(2, keys, 3, 8), jnp.float32)
    expected = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(jax.jit(_tiled_attention)(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_query_tile():
    assert _query_tile(4096) == 512 and _query_tile(1024) == 128 and _query_tile(256) == 64
    assert _query_tile(140) == 35  # divides, near max(64, T / 8)
    assert _query_tile(97) == 97  # a prime length: one tile
