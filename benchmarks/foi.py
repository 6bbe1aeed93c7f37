"""FoI's overhead: Focus on Your Instruction against plain IP2P, same model, steps, strength, batch and seed, and
FoI with one text branch per sub-instruction (``text_branches="per_instruction"``, ``K + 2`` UNet branches a step)
against FoI's composite prompt (3).

All run in our pipeline (no other implementation of FoI exists) on the random-weight models of
``benchmarks/sample.py``, each in its own subprocess so that peak memory (max RSS) is its own; the time per image
comes from a second, warm call. FoI edits with ``--sub-instructions`` (2 or 3) sub-instructions.

    python benchmarks/foi.py --model tiny
    python benchmarks/foi.py --model sd15 --batch 4 --steps 10 --sub-instructions 3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from mfu import MFU_HEADER, MFU_RULE, edit_flops, mfu_cells, utilisation  # benchmarks/ is on sys.path
from worker import device_peak_mib, memory_cell, worker_result

sys.path.insert(0, str(Path(__file__).parent))
from sample import MODELS, images, write_model  # noqa: E402

SUBS = [("make it snow", "snow"), ("turn the sky red", "sky"), ("add a hat", "hat")]
METHODS = ("ip2p", "foi", "foi_per_instruction")


def worker(method: str, folder: str, batch: int, steps: int, size: int, mask_downsample: int, count: int, args) -> dict:
    import jax.numpy as jnp

    from ip2p_jax.foi import FoIConfig
    from ip2p_jax.pipeline import InstructPix2PixPipeline

    dtype, backend = args.dtype, args.attention_backend
    pipe = InstructPix2PixPipeline.from_pretrained(folder, dtype=jnp.dtype(dtype), attention_backend=backend)
    pictures = images(batch, size)
    common = dict(num_inference_steps=steps, output_type="np", progress=False)
    subs = SUBS[:count]
    prompt = ", ".join(text for text, _ in subs)
    branches = "per_instruction" if method == "foi_per_instruction" else "composite"
    config = FoIConfig(mask_downsample=mask_downsample, text_branches=branches)

    def run():
        if method.startswith("foi"):
            return pipe(pictures, instructions=[subs] * batch, foi=config, **common)
        return pipe(pictures, [prompt] * batch, strength=0.8, **common)

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    # (the FLOPs of three branches: MFU is not reported for the per-instruction mode's K + 2)
    flops = edit_flops(pipe, batch, size, steps, strength=0.8)
    return dict(
        seconds=seconds,
        compile_s=first - seconds,
        device_peak_mib=device_peak_mib(),
        **utilisation(flops, seconds, dtype),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="of the full schedule; strength 0.8 runs 80 %%")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--mask-downsample", type=int, help="default 4 (paper), 1 for tiny, whose UNet attends only at full size"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--attention-backend", default="auto", help="auto, tiled, xla, cudnn or splash")
    parser.add_argument("--sub-instructions", type=int, choices=(2, 3), default=2)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mask_downsample is None:
        args.mask_downsample = 1 if args.model == "tiny" else 4
    if args.worker:
        count = args.sub_instructions
        result = worker(args.worker, args.folder, args.batch, args.steps, args.size, args.mask_downsample, count, args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        write_model(MODELS[args.model], folder)
        results = {}
        for method in METHODS:
            command = [sys.executable, __file__, "--worker", method, "--folder", str(folder)]
            command += ["--sub-instructions", str(args.sub_instructions)]
            command += ["--batch", str(args.batch), "--steps", str(args.steps), "--size", str(args.size)]
            command += ["--mask-downsample", str(args.mask_downsample), "--dtype", args.dtype]
            command += ["--attention-backend", args.attention_backend]
            results[method] = worker_result(command, method)
    ip2p, foi, per = results["ip2p"], results["foi"], results["foi_per_instruction"]
    title = f"{args.model} architecture (random weights), {args.size} px, batch {args.batch}, {args.steps} steps"
    print(
        f"# FoI ({args.sub_instructions} sub-instructions) vs IP2P, strength 0.8, {title}, {args.dtype}, "
        f"attention {args.attention_backend}"
    )
    print(f"| method | s/image | compile (s) | peak (MiB) {MFU_HEADER}")
    print(f"|---|---|---|---{MFU_RULE}")
    for name, r in (("IP2P", ip2p), ("FoI", foi), ("FoI per instruction", per)):
        cells = mfu_cells(r) if name != "FoI per instruction" else "| - | - | - |"
        print(f"| {name} | {r['seconds'] / args.batch:.3f} | {r['compile_s']:.1f} | {memory_cell(r)} {cells}")
    print(f"\nFoI / IP2P time: {foi['seconds'] / ip2p['seconds']:.3f}")
    print(f"FoI per instruction / FoI time: {per['seconds'] / foi['seconds']:.3f}")
    print(f"FoI per instruction / FoI peak RSS: {per['peak_rss_mib'] / foi['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
