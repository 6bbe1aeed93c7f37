"""The two CPU kernels the UNet leans on, ours beside XLA's default and PyTorch's, in one run.

1. Self-attention at the UNet's token counts (SD 1.5's 8 heads of 40, guidance batch 3): 1024 tokens at 256 px,
   4096 at 512 px. Behind ``ip2p_jax.models.attention_kernels.dot_product_attention``'s CPU dispatch.
2. 3x3 convolutions at the UNet's levels: ``lax.conv_general_dilated``, im2col (one matmul over gathered patches)
   and ``torch.nn.functional.conv2d``. Behind ``ip2p_jax.models.resnet.IM2COL_MAX_POSITIONS``.

Each row ends with our MFU (``mfu.py``) from the kernel's FLOPs counted by hand (``4 B H T^2 d`` for attention,
``2 B side^2 9 C_in C_out`` for a convolution): the tiled attention is a loop, whose body XLA's cost analysis
counts once.

    python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from mfu import utilisation  # benchmarks/ is on sys.path

from ip2p_jax.models.attention_kernels import tiled_attention
from ip2p_jax.models.resnet import _im2col_conv

# (spatial side, input channels, output channels) of the SD 1.5 UNet's 3x3 convolutions at 256 px and 512 px.
CONV_SHAPES = [(64, 320, 320), (32, 320, 320), (16, 640, 640), (8, 1280, 1280), (8, 2560, 1280), (4, 2560, 1280)]


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_table(tokens_list, batch, heads, head_dim, repeats) -> None:
    print(f"\n## self-attention, batch {batch}, {heads} heads of {head_dim}, float32")
    print(
        "| tokens | ours, tiled (ms) | jax.nn.dot_product_attention (ms) | PyTorch SDPA (ms) | ours / PyTorch "
        "| our MFU |"
    )
    print("|---|---|---|---|---|---|")
    tiled = jax.jit(tiled_attention)
    fused = jax.jit(jax.nn.dot_product_attention)
    for tokens in tokens_list:
        q = jnp.asarray(np.random.RandomState(0).randn(batch, tokens, heads, head_dim), jnp.float32)
        qt = torch.tensor(np.asarray(q)).transpose(1, 2).contiguous()
        ours = median_seconds(lambda q=q: tiled(q, q, q).block_until_ready(), repeats)
        xla = median_seconds(lambda q=q: fused(q, q, q).block_until_ready(), repeats)
        with torch.inference_mode():
            reference = median_seconds(lambda qt=qt: F.scaled_dot_product_attention(qt, qt, qt), repeats)
        mfu = utilisation(4 * batch * heads * tokens**2 * head_dim, ours)["mfu"]
        print(
            f"| {tokens} | {ours * 1e3:.1f} | {xla * 1e3:.1f} | {reference * 1e3:.1f} | {ours / reference:.2f} "
            f"| {mfu:.1%} |"
        )


def conv_table(batch, repeats) -> None:
    print(f"\n## 3x3 convolution, batch {batch}, float32")
    print("| side | C_in -> C_out | lax.conv (ms) | im2col (ms) | PyTorch conv2d (ms) | ours / PyTorch | our MFU |")
    print("|---|---|---|---|---|---|---|")
    padding = ((1, 1), (1, 1))
    xla = jax.jit(
        lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )
    im2col = jax.jit(lambda x, k: _im2col_conv(x, k, 1, padding))
    rng = np.random.RandomState(0)
    for side, c_in, c_out in CONV_SHAPES:
        x = jnp.asarray(rng.randn(batch, side, side, c_in), jnp.float32)
        k = jnp.asarray(rng.randn(3, 3, c_in, c_out) * 0.02, jnp.float32)
        xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
        kt = torch.tensor(np.asarray(k)).permute(3, 2, 0, 1).contiguous()
        t_xla = median_seconds(lambda x=x, k=k: xla(x, k).block_until_ready(), repeats)
        t_col = median_seconds(lambda x=x, k=k: im2col(x, k).block_until_ready(), repeats)
        with torch.inference_mode():
            t_ref = median_seconds(lambda xt=xt, kt=kt: F.conv2d(xt, kt, padding=1), repeats)
        ours = t_col if side * side <= 64 else t_xla
        mfu = utilisation(2 * batch * side * side * 9 * c_in * c_out, ours)["mfu"]
        print(
            f"| {side} | {c_in} -> {c_out} | {t_xla * 1e3:.1f} | {t_col * 1e3:.1f} | {t_ref * 1e3:.1f} "
            f"| {ours / t_ref:.2f} | {mfu:.1%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# CPU kernels on {jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}")
    attention_table(args.tokens, args.batch, 8, 40, args.repeats)
    conv_table(args.batch, args.repeats)


if __name__ == "__main__":
    main()
