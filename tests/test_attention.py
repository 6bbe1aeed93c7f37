"""Attention building blocks: the kernels of each platform against the plain form (the TPU kernel in Pallas'
interpret mode), the backend setting, and the control plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.models.attention_kernels import (
    dot_product_attention,
    partitioned_backend,
    query_tile,
    resolve_backend,
    splash_attention,
    splash_block,
    tiled_attention,
)


@pytest.mark.parametrize("length, keys", [(64, 64), (140, 140), (1024, 77), (97, 13)])
def test_tiled_attention_equals_fused(length, keys):
    rng = np.random.RandomState(length)
    q = jnp.asarray(rng.randn(2, length, 3, 8), jnp.float32)
    k = jnp.asarray(rng.randn(2, keys, 3, 8), jnp.float32)
    v = jnp.asarray(rng.randn(2, keys, 3, 8), jnp.float32)
    expected = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(jax.jit(tiled_attention)(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_query_tile():
    assert query_tile(4096) == 512 and query_tile(1024) == 128 and query_tile(256) == 64
    assert query_tile(140) == 35  # divides, near max(64, T / 8)
    assert query_tile(97) == 97  # a prime length: one tile


def qkv(seed: int, length: int, keys: int, heads: int, dim: int):
    rng = np.random.RandomState(seed)
    return [jnp.asarray(rng.randn(2, n, heads, dim), jnp.float32) for n in (length, keys, keys)]


# Lengths that fill the kernel's blocks exactly (256; 1024 = two blocks of 512) and that do not (200 queries
# over 77 text tokens, both padded; 700 = two blocks, the second part padding); head sizes 40 (SD 1.x) and 64.
@pytest.mark.parametrize("length, keys, dim", [(256, 256, 40), (1024, 1024, 8), (200, 77, 64), (700, 700, 40)])
def test_splash_kernel_in_interpret_mode_equals_the_plain_form(length, keys, dim):
    assert splash_block(256) == 256 and splash_block(1024) == 512 and splash_block(77) == 128
    q, k, v = qkv(length, length, keys, 2, dim)
    expected = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(jax.jit(splash_attention)(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_splash_kernel_gradients_equal_the_plain_form():
    """Training differentiates through the kernel (its own backward kernels), padding included."""
    q, k, v = qkv(0, 200, 77, 2, 40)

    def grads(attention):
        return jax.jit(jax.grad(lambda *x: jnp.sum(jnp.sin(attention(*x))), argnums=(0, 1, 2)))(q, k, v)

    for got, expected in zip(grads(splash_attention), grads(jax.nn.dot_product_attention), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_backend_by_platform_and_dtype():
    assert resolve_backend("auto", jnp.float32, "cpu") == "tiled"
    assert resolve_backend("auto", jnp.bfloat16, "tpu") == resolve_backend("auto", jnp.float32, "tpu") == "splash"
    assert resolve_backend("auto", jnp.bfloat16, "gpu") == resolve_backend("auto", jnp.float16, "cuda") == "cudnn"
    assert resolve_backend("auto", jnp.float32, "gpu") == "xla"  # cuDNN has no float32 kernel
    assert resolve_backend("xla", jnp.float32, "tpu") == "xla"  # a forced backend is kept
    with pytest.raises(ValueError, match="attention backend must be one of"):
        resolve_backend("flash", jnp.float32)
    # A GSPMD-partitioned step over several devices (train.py) cannot split the TPU kernel.
    assert partitioned_backend("auto", jnp.bfloat16, 8, "tpu") == "xla"
    assert partitioned_backend("auto", jnp.bfloat16, 1, "tpu") == "auto"  # splash, on one device
    assert partitioned_backend("auto", jnp.bfloat16, 8, "gpu") == "auto"  # cuDNN partitions
    assert partitioned_backend("splash", jnp.float32, 1) == "splash"
    with pytest.raises(ValueError, match="'splash' cannot run in a step partitioned over 8 devices"):
        partitioned_backend("splash", jnp.float32, 8)
    q, k, v = qkv(0, 16, 16, 1, 8)
    with pytest.raises(ValueError, match="cuDNN attention needs bfloat16 or float16"):
        dot_product_attention(q, k, v, "cudnn")
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, "xla"), dot_product_attention(q, k, v, "tiled"), rtol=1e-5, atol=1e-6
    )


def count_primitive(jaxpr, name: str = "pallas_call") -> int:
    """Call sites of primitive ``name`` in ``jaxpr`` and the jaxprs it calls (a shared sub-jaxpr counted at each
    call; the printed form names a repeated one only once)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    count += count_primitive(inner, name)
    return count


@pytest.fixture(scope="module")
def tiny_unet():
    from ip2p_jax.random_models import random_unet
    from ip2p_jax.tiny_configs import STAND_IN_UNET

    unet, params = random_unet(STAND_IN_UNET, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, unet.config.in_channels)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(2, 7, unet.config.cross_attention_dim[0])), jnp.float32)
    return unet, params, (x, jnp.array([10, 900]), context)


def test_the_backend_setting_reaches_every_self_attention_layer(tiny_unet):
    """``attention_backend="splash"`` puts the TPU kernel (interpret mode here) in every self-attention layer, and
    only there (cross-attention keeps its explicit form); the UNet's output is the tiled path's."""
    unet, params, inputs = tiny_unet
    splash = unet.clone(attention_backend="splash")
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    blocks = sum(1 for path in paths if "attn1" in path and "to_q" in path and "kernel" in path)
    assert blocks >= 2

    def kernels(model, control=None):
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, *inputs, control))(params)
        return count_primitive(jaxpr.jaxpr)

    assert kernels(unet) == 0
    assert kernels(splash) == blocks
    tiled, _ = jax.jit(lambda p: unet.apply({"params": p}, *inputs))(params)
    kernel, _ = jax.jit(lambda p: splash.apply({"params": p}, *inputs))(params)
    np.testing.assert_allclose(kernel, tiled, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        unet.clone(attention_backend="fast")
