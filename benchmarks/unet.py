"""One UNet forward pass (a guidance batch of 3): ours (jitted JAX) against diffusers on PyTorch, same machine.

The real SD 1.5 architecture with 8 input channels (InstructPix2Pix), random weights, float32. Each measurement
runs in its own subprocess so that peak memory (max RSS) belongs to one framework. Prints, per image size: time
per forward for both and their ratio, our compile time, peak memory, and our achieved GFLOP/s (XLA's FLOP count
of the compiled forward / time) against the GFLOP/s of a large jitted float32 matmul on the same machine.

    python benchmarks/unet.py                     # SD 1.5 at 256 and 512 px
    python benchmarks/unet.py --model tiny --sizes 64   # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

from worker import worker_result  # benchmarks/ is on sys.path

SD15_UNET = dict(
    in_channels=8,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    sample_size=64,
)
TINY_UNET = dict(
    in_channels=8,
    out_channels=4,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    sample_size=8,
)
MODELS = {"sd15": SD15_UNET, "tiny": TINY_UNET}
TOKENS = 77


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def worker_jax(config: dict, latent: int, batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig

    module = UNet2DConditionModel(UNetConfig.from_diffusers(config))
    sample = jnp.asarray(np.random.RandomState(0).randn(batch, latent, latent, config["in_channels"]), jnp.float32)
    timesteps = jnp.full((batch,), 500.0)
    context = jnp.asarray(np.random.RandomState(1).randn(batch, TOKENS, config["cross_attention_dim"]), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), sample, timesteps, context)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), shapes)

    forward = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c)[0])
    start = time.perf_counter()
    compiled = forward.lower(params, sample, timesteps, context).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    compiled(params, sample, timesteps, context).block_until_ready()  # warm-up
    times = timed(lambda: compiled(params, sample, timesteps, context).block_until_ready(), repeats)

    n = 4096
    a = jnp.asarray(rng.standard_normal((n, n), np.float32))
    matmul = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    matmul(a, a).block_until_ready()
    matmul_s = min(timed(lambda: matmul(a, a).block_until_ready(), 5))
    return dict(
        seconds=statistics.median(times),
        compile_s=compile_s,
        flops=flops,
        peak_rss_mib=peak_rss_mib(),
        matmul_gflops=2 * n**3 / matmul_s / 1e9,
        device=str(jax.devices()[0].device_kind),
    )


def worker_torch(config: dict, latent: int, batch: int, repeats: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval()
    sample = torch.randn(batch, config["in_channels"], latent, latent)
    timesteps = torch.full((batch,), 500.0)
    context = torch.randn(batch, TOKENS, config["cross_attention_dim"])
    with torch.inference_mode():
        model(sample, timesteps, context)  # warm-up
        times = timed(lambda: model(sample, timesteps, context), repeats)
    return dict(seconds=statistics.median(times), peak_rss_mib=peak_rss_mib(), threads=torch.get_num_threads())


def run_worker(framework: str, args, size: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        framework,
        "--model",
        args.model,
        "--sizes",
        str(size),
        "--batch",
        str(args.batch),
        "--repeats",
        str(args.repeats),
    ]
    return worker_result(command, framework)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    parser.add_argument("--batch", type=int, default=3, help="3 = IP2P's guidance batch for one image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = MODELS[args.model]

    if args.worker:
        worker = worker_jax if args.worker == "jax" else worker_torch
        print(json.dumps(worker(config, args.sizes[0] // 8, args.batch, args.repeats)))
        return

    print(
        f"# UNet forward, {args.model}, batch {args.batch}, float32, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        "| image | ours (s) | PyTorch (s) | ours / PyTorch | our compile (s) | our peak RSS (MiB) | "
        "PyTorch peak RSS (MiB) | our GFLOP/s | matmul GFLOP/s | share of matmul |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        ours = run_worker("jax", args, size)
        reference = run_worker("torch", args, size)
        gflops = ours["flops"] / ours["seconds"] / 1e9
        print(
            f"| {size} px | {ours['seconds']:.3f} | {reference['seconds']:.3f} | "
            f"{ours['seconds'] / reference['seconds']:.2f} | {ours['compile_s']:.1f} | {ours['peak_rss_mib']:.0f} | "
            f"{reference['peak_rss_mib']:.0f} | {gflops:.1f} | {ours['matmul_gflops']:.1f} | "
            f"{gflops / ours['matmul_gflops']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
