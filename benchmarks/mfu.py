"""Model FLOP utilisation (MFU) for the benchmarks: a compiled function's FLOPs (XLA's cost analysis) per second
of measured time, over the device's peak.

Peaks are dense matmul rates per chip from the vendors' data sheets. XLA's default precision computes float32
matmuls in bfloat16 passes on TPU and in TensorFloat-32 on NVIDIA GPUs since Ampere (JAX's "Matmul precision"
page), so float32 is held against those rates there. A CPU has no table entry: its peak is measured, as the rate
of a large jitted matmul in the same dtype on the same machine (the best a single XLA op reaches there).

XLA's cost analysis counts the body of a loop once, whatever its trip count, so a sampler's FLOPs are those of one
step times the steps (``loop_flops``), not the compiled loop's.
"""

from __future__ import annotations

import functools
import time

# device_kind fragment (first match wins, so the more specific first) -> (bfloat16, float32) TFLOP/s, dense.
PEAK_TFLOPS = (
    ("TPU v4", (275.0, 275.0)),
    ("TPU v5 lite", (197.0, 197.0)),  # v5e
    ("TPU v5e", (197.0, 197.0)),
    ("TPU v5", (459.0, 459.0)),  # v5p
    ("TPU v6", (918.0, 918.0)),  # v6e (Trillium)
    ("A100", (312.0, 156.0)),  # float32 as TF32
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 495.0)),  # SXM
    ("H200", (989.0, 495.0)),
)


def compiled_flops(compiled) -> float:
    """FLOPs of a compiled function (``jax.jit(f).lower(...).compile()``) by XLA's cost analysis."""
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def loop_flops(step_flops: float, steps: int) -> float:
    """A loop's FLOPs from one step's (module docstring)."""
    return step_flops * steps


def edit_flops(pipe, batch: int, size: int, steps: int, strength: float = 1.0) -> float:
    """Model FLOPs of editing ``batch`` images of ``size`` px with an ``InstructPix2PixPipeline``: one UNet
    evaluation of the three guidance branches (batch ``3 * batch``) per step run; FoI runs the same evaluations
    (its masks and modulation are elementwise work beside them). The autoencoder and text encoder, run once per
    image, are left out."""
    import jax
    import jax.numpy as jnp

    unet, config = pipe.unet, pipe.unet.config
    latent = size // pipe.vae_scale_factor
    x = jax.ShapeDtypeStruct((3 * batch, latent, latent, config.in_channels), jnp.float32)
    context = jax.ShapeDtypeStruct((3 * batch, 77, config.cross_attention_dim[0]), jnp.float32)
    t = jax.ShapeDtypeStruct((3 * batch,), jnp.float32)
    forward = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)[0])
    per_step = compiled_flops(forward.lower(pipe.params["unet"], x, t, context).compile())
    return loop_flops(per_step, pipe.scheduler.steps_for_strength(steps, strength))


@functools.cache
def measured_matmul_flops(dtype: str = "float32", n: int = 4096) -> float:
    """FLOP/s of a jitted ``n x n`` matmul in ``dtype`` on the default device (best of 5)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
    matmul = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(dtype: str = "float32", device_kind: str | None = None) -> tuple[float, str]:
    """The device's peak FLOP/s for ``dtype`` and where it comes from: ``(flops, "table: TPU v4")`` or
    ``(flops, "measured matmul")`` on a device the table does not list (a CPU)."""
    import jax

    kind = device_kind or jax.devices()[0].device_kind
    for fragment, (bf16, f32) in PEAK_TFLOPS:
        if fragment in kind:
            return (bf16 if dtype == "bfloat16" else f32) * 1e12, f"table: {fragment}"
    return measured_matmul_flops(dtype), "measured matmul"


def utilisation(flops: float, seconds: float, dtype: str = "float32") -> dict:
    """``{"gflops_per_s", "peak_gflops_per_s", "peak_source", "mfu"}`` of ``flops`` done in ``seconds``."""
    peak, source = peak_flops(dtype)
    achieved = flops / seconds
    return dict(gflops_per_s=achieved / 1e9, peak_gflops_per_s=peak / 1e9, peak_source=source, mfu=achieved / peak)


def mfu_cells(figures: dict) -> str:
    """Markdown cells ``| GFLOP/s | peak GFLOP/s (source) | MFU |`` of ``utilisation``'s figures."""
    return (
        f"| {figures['gflops_per_s']:.1f} | {figures['peak_gflops_per_s']:.0f} ({figures['peak_source']}) "
        f"| {figures['mfu']:.1%} |"
    )


MFU_HEADER = "| GFLOP/s | peak GFLOP/s | MFU |"
MFU_RULE = "|---|---|---|"
