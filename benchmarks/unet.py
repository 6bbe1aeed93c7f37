"""One UNet forward pass (a guidance batch of 3): ours (jitted JAX) against diffusers on PyTorch, same machine.

The real SD 1.5 architecture with 8 input channels (InstructPix2Pix), random weights, float32 (or bfloat16
compute with ``--dtype``). Each measurement runs in its own subprocess so that peak memory (max RSS; on a GPU, the
device's peak) belongs to one framework. Prints, per image size: time per forward for both and their ratio, our
compile time, peak memory, and our MFU (``mfu.py``: XLA's FLOP count of the compiled forward / time, against the
device's peak; on a CPU the rate of a large jitted matmul on the same machine).

    python benchmarks/unet.py                     # SD 1.5 at 256 and 512 px
    python benchmarks/unet.py --model tiny --sizes 64   # seconds, for a smoke run
    python benchmarks/unet.py --dtype bfloat16 --batch 24 --attention-backend cudnn   # on a GPU
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

from mfu import MFU_HEADER, MFU_RULE, compiled_flops, mfu_cells, utilisation  # benchmarks/ is on sys.path
from worker import device_peak_mib, worker_result

from ip2p_jax.tiny_configs import STAND_IN_UNET

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
TINY_UNET = dict(STAND_IN_UNET, in_channels=8, out_channels=4, sample_size=8)  # the stand-in's, as IP2P
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


def worker_jax(config: dict, latent: int, batch: int, repeats: int, dtype: str, backend: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig

    module = UNet2DConditionModel(UNetConfig.from_diffusers(config), dtype=jnp.dtype(dtype), attention_backend=backend)
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
    flops = compiled_flops(compiled)
    compiled(params, sample, timesteps, context).block_until_ready()  # warm-up
    times = timed(lambda: compiled(params, sample, timesteps, context).block_until_ready(), repeats)
    seconds = statistics.median(times)
    peak = device_peak_mib() or peak_rss_mib()
    return dict(
        seconds=seconds,
        compile_s=compile_s,
        flops=flops,
        peak_mib=peak,
        device=str(jax.devices()[0].device_kind),
        **utilisation(flops, seconds, dtype),
    )


def worker_torch(config: dict, latent: int, batch: int, repeats: int, dtype: str, backend: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    del backend  # PyTorch's scaled_dot_product_attention picks its own kernel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval().to(device, torch_dtype)
    sample = torch.randn(batch, config["in_channels"], latent, latent, device=device, dtype=torch_dtype)
    timesteps = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, TOKENS, config["cross_attention_dim"], device=device, dtype=torch_dtype)

    def forward():
        model(sample, timesteps, context)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        forward()  # warm-up
        times = timed(forward, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    return dict(seconds=statistics.median(times), peak_mib=peak, threads=torch.get_num_threads())


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
        "--dtype",
        args.dtype,
        "--attention-backend",
        args.attention_backend,
    ]
    return worker_result(command, framework)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    parser.add_argument("--batch", type=int, default=3, help="3 = IP2P's guidance batch for one image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--attention-backend", default="auto", help="ours: auto, tiled, xla, cudnn or splash")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = MODELS[args.model]

    if args.worker:
        worker = worker_jax if args.worker == "jax" else worker_torch
        latent = args.sizes[0] // 8
        print(json.dumps(worker(config, latent, args.batch, args.repeats, args.dtype, args.attention_backend)))
        return

    print(
        f"# UNet forward, {args.model}, batch {args.batch}, {args.dtype}, attention {args.attention_backend}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        "| image | ours (s) | PyTorch (s) | ours / PyTorch | our compile (s) | our peak (MiB) | "
        f"PyTorch peak (MiB) {MFU_HEADER} device |"
    )
    print(f"|---|---|---|---|---|---|---{MFU_RULE}---|")
    for size in args.sizes:
        ours = run_worker("jax", args, size)
        reference = run_worker("torch", args, size)
        print(
            f"| {size} px | {ours['seconds']:.3f} | {reference['seconds']:.3f} | "
            f"{ours['seconds'] / reference['seconds']:.2f} | {ours['compile_s']:.1f} | {ours['peak_mib']:.0f} | "
            f"{reference['peak_mib']:.0f} {mfu_cells(ours)} {ours['device']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
