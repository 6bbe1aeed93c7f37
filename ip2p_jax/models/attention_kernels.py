"""Softmax attention ``softmax(q k^T / sqrt(d)) v`` computed by the kernel that suits the platform.

One function, ``dot_product_attention(q, k, v, backend)``, with these backends:

* ``"tiled"``: a loop over (batch, head) and query tiles of plain 2-D matmuls. XLA's CPU backend runs batched
  matmuls with a small contraction (the head size) several times slower than plain ones, and the whole score tensor
  does not fit in cache; at 4096 tokens this form is over 10x faster there (benchmarks/cpu_kernels.py).
* ``"xla"``: ``jax.nn.dot_product_attention``'s XLA lowering (the scores materialised).
* ``"cudnn"``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention``; NVIDIA GPUs, bfloat16 or
  float16 inputs only (cuDNN has no float32 kernel).
* ``"splash"``: the Pallas TPU splash-attention kernel (the one maxdiffusion uses). Off TPU it runs in Pallas'
  interpret mode, which is slow and meant for tests. Lengths are padded to the kernel's blocks (padded keys are
  masked out through segment ids) and the head size to TPU's 128 lanes (zeros, which change no score).
  It runs on each device's shard: inside ``shard_map`` (the samplers), or on one device. The Mosaic compiler
  cannot partition it inside a GSPMD-sharded ``jit`` over several devices (``train.py``'s step), where
  ``partitioned_backend`` takes ``"xla"`` for ``"auto"`` and refuses ``"splash"``.
* ``"auto"``: ``"splash"`` on TPU; on GPU ``"cudnn"`` for bfloat16 / float16 inputs, else ``"xla"``; ``"tiled"`` on
  CPU.

All take ``(B, T, heads, d)`` queries and ``(B, S, heads, d)`` keys and values and return ``(B, T, heads, d)``;
scores accumulate in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("auto", "tiled", "xla", "cudnn", "splash")
HALF_PRECISION = (jnp.bfloat16, jnp.float16)
TPU_LANES = 128  # the head size is padded to a multiple of this for the TPU kernel
SPLASH_BLOCK = 512  # largest query / key block of the TPU kernel; shorter sequences use one block


def check_backend(backend: str) -> str:
    """``backend`` if it is one of ``BACKENDS``, else a ``ValueError`` naming them."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, dtype, platform: str | None = None) -> str:
    """The backend ``"auto"`` stands for with inputs of ``dtype`` on ``platform`` (default: JAX's default
    backend); any other backend is itself."""
    if check_backend(backend) != "auto":
        return backend
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm"):
        return "cudnn" if platform != "rocm" and jnp.dtype(dtype) in HALF_PRECISION else "xla"
    return "tiled"


def partitioned_backend(backend: str, dtype, devices: int, platform: str | None = None) -> str:
    """The backend for a GSPMD-partitioned ``jit`` over ``devices`` (``train.py``'s step): the Mosaic compiler
    cannot split the splash kernel there, so with several devices ``"auto"`` takes XLA's attention where it would
    take splash, and ``"splash"`` is a ``ValueError``."""
    if devices > 1 and resolve_backend(backend, dtype, platform) == "splash":
        if backend == "splash":
            raise ValueError(
                f"attention backend 'splash' cannot run in a step partitioned over {devices} devices (the TPU "
                "kernel runs per device, inside shard_map): use 'auto' or 'xla'"
            )
        return "xla"
    return backend


def dot_product_attention(q_btnd: jax.Array, k_bsnd: jax.Array, v_bsnd: jax.Array, backend: str = "auto") -> jax.Array:
    """Softmax attention ``(B, T, heads, d), (B, S, heads, d) x2 -> (B, T, heads, d)`` by ``backend``."""
    kind = resolve_backend(backend, q_btnd.dtype)
    if kind == "tiled":
        return tiled_attention(q_btnd, k_bsnd, v_bsnd)
    if kind == "splash":
        return splash_attention(q_btnd, k_bsnd, v_bsnd)
    if kind == "cudnn" and jnp.dtype(q_btnd.dtype) not in HALF_PRECISION:
        raise ValueError(f"cuDNN attention needs bfloat16 or float16 inputs, got {q_btnd.dtype}")
    return jax.nn.dot_product_attention(q_btnd, k_bsnd, v_bsnd, implementation=kind)


# ---------------------------------------------------------------------------------------------- CPU


def query_tile(length: int) -> int:
    """Rows of queries per tile on CPU: about ``length / 8``, at least 64, dividing ``length``."""
    target = max(64, length // 8)
    tile = max((d for d in range(1, min(target, length) + 1) if length % d == 0), default=length)
    return tile if tile >= 16 else length


def tiled_attention(q_btnd: jax.Array, k_bsnd: jax.Array, v_bsnd: jax.Array) -> jax.Array:
    """Softmax attention as a loop over (batch, head) and query tiles of 2-D matmuls (module docstring)."""
    batch, length, heads, dim = q_btnd.shape
    tile = query_tile(length)

    def by_head(x):  # (B, T, N, d) -> (B * N, T, d)
        return x.transpose(0, 2, 1, 3).reshape(batch * heads, x.shape[1], dim)

    queries = by_head(q_btnd * jnp.asarray(dim**-0.5, q_btnd.dtype)).reshape(batch * heads, -1, tile, dim)

    def one_head(args):
        q_tiles, k, v = args

        def one_tile(q):
            probs = jax.nn.softmax(jnp.matmul(q, k.T, preferred_element_type=jnp.float32), axis=-1)
            return jnp.matmul(probs.astype(v.dtype), v)

        return jax.lax.map(one_tile, q_tiles)

    out = jax.lax.map(one_head, (queries, by_head(k_bsnd), by_head(v_bsnd)))
    return out.reshape(batch, heads, length, dim).transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------- TPU


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def splash_block(length: int) -> int:
    """The kernel's block along a sequence of ``length``: one block of ``length`` rounded up to 128 when that is
    at most ``SPLASH_BLOCK``, else ``SPLASH_BLOCK``."""
    return min(SPLASH_BLOCK, _round_up(length, TPU_LANES))


def _splash_kernel(heads: int, q_length: int, kv_length: int, block_q: int, block_kv: int, interpret: bool):
    """The splash kernel for one example ``(heads, q_length, d)`` with full (unmasked) attention. Made at trace
    time (its mask tables become constants of the traced function, so it is not cached across traces)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.FullMask((q_length, kv_length)) for _ in range(heads)])
    blocks = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(
    q_btnd: jax.Array, k_bsnd: jax.Array, v_bsnd: jax.Array, interpret: bool | None = None
) -> jax.Array:
    """Softmax attention through the Pallas TPU splash kernel (module docstring); ``interpret`` defaults to
    "not on a TPU"."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    batch, q_length, heads, dim = q_btnd.shape
    kv_length = k_bsnd.shape[1]
    block_q, block_kv = splash_block(q_length), splash_block(kv_length)
    q_padded, kv_padded = _round_up(q_length, block_q), _round_up(kv_length, block_kv)
    dim_padded = _round_up(dim, TPU_LANES)

    def to_kernel(x, length):  # (B, L, N, d) -> (B, N, L_padded, d_padded), zeros appended
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim_padded - dim)))
        return x.transpose(0, 2, 1, 3)

    # The kernel does not scale the scores: scale the queries (by the real head size) first.
    q = to_kernel(q_btnd * jnp.asarray(dim**-0.5, q_btnd.dtype), q_padded)
    k, v = to_kernel(k_bsnd, kv_padded), to_kernel(v_bsnd, kv_padded)
    # Padded keys get segment 0 and every query segment 1, so no query attends to a padded key; padded queries
    # attend to the real keys and are cut off below.
    segments = SegmentIds(
        q=jnp.ones((q_padded,), jnp.int32), kv=jnp.asarray(np.arange(kv_padded) < kv_length, jnp.int32)
    )
    kernel = _splash_kernel(heads, q_padded, kv_padded, block_q, block_kv, interpret)
    out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segments))(q, k, v)
    return out.transpose(0, 2, 1, 3)[:, :q_length, :, :dim].astype(q_btnd.dtype)
