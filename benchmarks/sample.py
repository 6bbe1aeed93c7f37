"""Editing time per image: our pipeline (jitted JAX) against diffusers' StableDiffusionInstructPix2PixPipeline.

Both load the same random-weight diffusers folder (written once to a temporary directory) and edit the same
256 px images with the same settings (dual guidance, Euler ancestral). Each framework runs in its own subprocess
so that peak memory (max RSS) is its own. Our first call compiles; the compile time is reported apart, and the
time per image comes from a second, warm call; a third call shows the progress bar (the jitted loop reports
each step to the host). PyTorch gets a 1-step warm-up call.

    python benchmarks/sample.py --model tiny                         # seconds
    python benchmarks/sample.py --model sd15 --batches 1 4 --steps 20  # SD 1.5 architecture, random weights
    python benchmarks/sample.py --model sd15 --size 512 --batches 1 8 --dtype bfloat16   # on a GPU (accelerator.sh)

On a GPU both run there (PyTorch on ``cuda``) and the peak memory is the device's (PyTorch's allocator peak; JAX's
``peak_bytes_in_use``); with ``--dtype bfloat16`` we compute the UNet and text encoder in bfloat16 and PyTorch
loads the pipeline in bfloat16.
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
from unet import SD15_UNET  # the same SD 1.5 UNet as benchmarks/unet.py (benchmarks/ is on sys.path)
from worker import device_peak_mib, memory_cell, worker_result

from ip2p_jax.tiny_configs import STAND_IN_UNET

SD15 = dict(
    unet=dict(SD15_UNET, sample_size=32),
    vae=dict(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        latent_channels=4,
    ),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
)
TINY = dict(
    unet=dict(STAND_IN_UNET, in_channels=8, out_channels=4),  # the stand-in's UNet, as IP2P
    vae=dict(
        block_out_channels=[16, 32, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    ),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
)
MODELS = {"sd15": SD15, "tiny": TINY}
WORDS = ("make", "it", "snow", "turn", "the", "sky", "red")


def write_model(config: dict, folder: Path) -> None:
    """A random IP2P model saved by diffusers' own ``save_pretrained`` (model_index.json included)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ip2p_jax.tokenizer import write_clip_vocab

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_vocab(folder.parent / "vocab", WORDS))
    text = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, **config["text"])
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL(**config["vae"]),
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**config["unet"]),
        scheduler=EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def images(batch: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]


def worker_jax(folder: str, batch: int, steps: int, size: int, dtype: str = "float32", backend: str = "auto") -> dict:
    import jax
    import jax.numpy as jnp

    from ip2p_jax.pipeline import InstructPix2PixPipeline

    pipe = InstructPix2PixPipeline.from_pretrained(folder, dtype=jnp.dtype(dtype), attention_backend=backend)
    settings = dict(num_inference_steps=steps, output_type="np", progress=False)
    pictures, prompts = images(batch, size), ["make it snow"] * batch
    start = time.perf_counter()
    pipe(pictures, prompts, **settings)
    first = time.perf_counter() - start
    start = time.perf_counter()
    pipe(pictures, prompts, **settings)
    warm = time.perf_counter() - start
    # With the bar the sampler carries a host callback, which makes it a program of its own (compiled first).
    pipe(pictures, prompts, **{**settings, "progress": True})
    start = time.perf_counter()
    pipe(pictures, prompts, **{**settings, "progress": True})
    with_bar = time.perf_counter() - start
    flops = edit_flops(pipe, batch, size, steps)
    return dict(
        seconds=warm,
        with_bar=with_bar,
        compile_s=first - warm,
        device=jax.devices()[0].device_kind,
        device_peak_mib=device_peak_mib(),
        **utilisation(flops, warm, dtype),
    )


def worker_torch(folder: str, batch: int, steps: int, size: int, dtype: str = "float32", backend: str = "") -> dict:
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    del backend  # diffusers' attention is PyTorch's scaled_dot_product_attention, which picks its own kernel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        folder,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=getattr(torch, dtype),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    pictures, prompts = images(batch, size), ["make it snow"] * batch
    with torch.inference_mode():
        pipe(prompts, image=pictures, num_inference_steps=1, output_type="np")
        start = time.perf_counter()
        pipe(prompts, image=pictures, num_inference_steps=steps, output_type="np")
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return dict(seconds=seconds, threads=torch.get_num_threads(), device_peak_mib=peak)


def run_worker(framework: str, folder: Path, batch: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", framework, "--folder", str(folder), "--batches", str(batch)]
    command += ["--steps", str(args.steps), "--size", str(args.size), "--dtype", args.dtype]
    command += ["--attention-backend", args.attention_backend]
    return worker_result(command, framework)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--attention-backend", default="auto", help="ours: auto, tiled, xla, cudnn or splash")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = worker_jax if args.worker == "jax" else worker_torch
        result = work(args.folder, args.batches[0], args.steps, args.size, args.dtype, args.attention_backend)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        write_model(MODELS[args.model], folder)
        print(
            f"# IP2P editing, {args.model} architecture (random weights), {args.size} px, {args.steps} steps, "
            f"{args.dtype}, our attention {args.attention_backend}"
        )
        print(
            "| batch | ours (s/image) | PyTorch (s/image) | ours / PyTorch | our compile (s) "
            f"| our peak (MiB) | PyTorch peak (MiB) | ours with progress bar (s/image) {MFU_HEADER}"
        )
        print(f"|---|---|---|---|---|---|---|---{MFU_RULE}")
        for batch in args.batches:
            ours = run_worker("jax", folder, batch, args)
            reference = run_worker("torch", folder, batch, args)
            print(
                f"| {batch} | {ours['seconds'] / batch:.3f} | {reference['seconds'] / batch:.3f} "
                f"| {ours['seconds'] / reference['seconds']:.2f} | {ours['compile_s']:.1f} "
                f"| {memory_cell(ours)} | {memory_cell(reference)} | {ours['with_bar'] / batch:.3f} "
                f"{mfu_cells(ours)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
