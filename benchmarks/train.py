"""One InstructPix2Pix training step: ours (``training/step.py``, jitted, state donated) against the same step in
PyTorch with diffusers' models, as diffusers' ``train_instruct_pix2pix.py`` writes it, on the same machine.

Both steps do the same work: encode the edited image (a latent sample, scaled) and the input image (the mode,
unscaled) with the frozen VAE, encode the instruction with the frozen text encoder, conditioning dropout, noise at
a random timestep, the 8-channel UNet's epsilon-prediction MSE, backward, global-norm clipping at 1, AdamW 1e-4,
and the EMA update. Random weights, float32, the same batch size and image size. Each framework runs in its own
subprocess (peak memory is its own); the step time is the median of warm steps after the compiled step's warm-up.

    python benchmarks/train.py                          # the tiny config (32 px) and SD 1.5 (256 px), batch 2
    python benchmarks/train.py --models tiny --steps 10
    python benchmarks/train.py --models sd15 --batch 8 --dtype bfloat16   # on a GPU (accelerator.sh)

With ``--dtype bfloat16`` our UNet computes in bfloat16 (params and optimizer float32) and PyTorch runs the UNet's
forward under ``torch.autocast`` in bfloat16 (diffusers' ``--mixed_precision bf16``); on a GPU PyTorch runs there
and the peak memory is the device's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from mfu import MFU_HEADER, MFU_RULE, compiled_flops, mfu_cells, utilisation  # benchmarks/ is on sys.path
from unet import SD15_UNET
from worker import device_peak_mib, memory_cell

from ip2p_jax.tiny_configs import SMOKE_TEXT, SMOKE_UNET, SMOKE_VAE

SD15 = dict(
    unet=SD15_UNET,
    vae=dict(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        latent_channels=4,
    ),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    size=256,
)
TINY = dict(unet=SMOKE_UNET, vae=SMOKE_VAE, text=SMOKE_TEXT, size=32)  # configs/tiny.py
MODELS = {"tiny": TINY, "sd15": SD15}
VOCAB = 1000


def batch_arrays(batch: int, size: int):
    import numpy as np

    rng = np.random.RandomState(0)
    images = rng.uniform(-1, 1, (2, batch, size, size, 3)).astype(np.float32)
    ids = rng.randint(0, VOCAB, (batch, 77)).astype(np.int32)
    return images[0], images[1], ids


def worker_jax(model: dict, batch: int, steps: int, dtype: str = "float32") -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    from ip2p_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from ip2p_jax.random_models import random_unet, random_vae
    from ip2p_jax.schedulers import SchedulerConfig
    from ip2p_jax.training.new_model import SD_BETAS
    from ip2p_jax.training.state import create_train_state, make_optimizer
    from ip2p_jax.training.step import StepSettings, train_step

    unet, unet_params = random_unet(model["unet"], jax.random.key(0), dtype=jnp.dtype(dtype))
    vae, vae_params = random_vae(model["vae"], jax.random.key(1))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, eos_token_id=VOCAB - 1, **model["text"]))
    text_params = text.init(jax.random.key(2), jnp.zeros((1, 77), jnp.int32))["params"]
    tx = make_optimizer(1e-4, max_grad_norm=1.0)
    alphas = SchedulerConfig(**SD_BETAS).alphas_cumprod()
    settings = StepSettings(unet=unet, vae=vae, text_encoder=text, tx=tx, alphas_cumprod=tuple(alphas.tolist()))
    null = text.apply({"params": text_params}, jnp.zeros((1, 77), jnp.int32))
    frozen = {"vae": vae_params, "text_encoder": text_params, "null_context": null}
    inputs, edited, ids = batch_arrays(batch, model["size"])
    data = {"input_image": jnp.asarray(inputs), "edited_image": jnp.asarray(edited), "input_ids": jnp.asarray(ids)}
    state = jax.jit(functools.partial(create_train_state, tx=tx), donate_argnums=0)(unet_params)  # as train.py
    del unet_params
    key = jax.random.key(0)
    start = time.perf_counter()
    step = jax.jit(functools.partial(train_step, settings=settings), donate_argnums=0)
    step = step.lower(state, data, key, frozen).compile()
    compile_s = time.perf_counter() - start
    flops = compiled_flops(step)  # the whole step: the encoders, the UNet forward and backward, AdamW, the EMA
    state, metrics = step(state, data, key, frozen)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data, key, frozen)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = device_peak_mib()
    return dict(seconds=seconds, compile_s=compile_s, device_peak_mib=peak, **utilisation(flops, seconds, dtype))


def worker_torch(model: dict, batch: int, steps: int, dtype: str = "float32") -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ip2p_jax.training.new_model import SD_BETAS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**model["unet"]).train().to(device)
    vae = AutoencoderKL(**model["vae"]).eval().requires_grad_(False).to(device)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, eos_token_id=VOCAB - 1, **model["text"]))
    text = text.eval().requires_grad_(False).to(device)
    scheduler = DDPMScheduler(**SD_BETAS)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=False)
    inputs, edited, ids = (torch.from_numpy(x).to(device) for x in batch_arrays(batch, model["size"]))
    inputs, edited = inputs.permute(0, 3, 1, 2).contiguous(), edited.permute(0, 3, 1, 2).contiguous()
    ids = ids.long()
    with torch.no_grad():
        null = text(torch.zeros((1, 77), dtype=torch.long, device=device))[0]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with torch.no_grad():
            latents = vae.encode(edited).latent_dist.sample() * vae.config.scaling_factor
            context = text(ids)[0]
            image_latents = vae.encode(inputs).latent_dist.mode()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        r = torch.rand(batch, device=device)
        context = torch.where((r < 0.1)[:, None, None], null, context)
        image_latents = image_latents * (~((r >= 0.05) & (r < 0.15))).float()[:, None, None, None]
        with autocast:
            prediction = unet(torch.cat([noisy, image_latents], dim=1), timesteps, context).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        return float(loss)  # (a device sync)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return dict(seconds=statistics.median(times), first_s=first, threads=torch.get_num_threads(), device_peak_mib=peak)


def run_worker(framework: str, name: str, batch: int, steps: int, dtype: str) -> dict:
    command = [sys.executable, __file__, "--worker", framework, "--models", name, "--batch", str(batch)]
    command += ["--dtype", dtype]
    result = subprocess.run(command + ["--steps", str(steps)], capture_output=True, text=True)
    if result.returncode != 0:
        return {
            "error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        }
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "sd15"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="warm steps timed (the median is reported)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = worker_jax if args.worker == "jax" else worker_torch
        result = work(MODELS[args.models[0]], args.batch, args.steps, args.dtype)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    print(f"# one IP2P training step, batch {args.batch}, {args.dtype}, median of {args.steps} warm steps")
    print(
        "| model | image | ours (s/step) | PyTorch (s/step) | ours / PyTorch | our compile (s) "
        f"| our peak (MiB) | PyTorch peak (MiB) {MFU_HEADER}"
    )
    print(f"|---|---|---|---|---|---|---|---{MFU_RULE}")
    for name in args.models:
        ours = run_worker("jax", name, args.batch, args.steps, args.dtype)
        reference = run_worker("torch", name, args.batch, args.steps, args.dtype)
        size = MODELS[name]["size"]
        if "error" in ours or "error" in reference:
            failures = f"ours: {ours.get('error', 'ok')}; PyTorch: {reference.get('error', 'ok')}"
            print(f"| {name} | {size} px | failed ({failures}) |")
            continue
        print(
            f"| {name} | {size} px | {ours['seconds']:.3f} | {reference['seconds']:.3f} "
            f"| {ours['seconds'] / reference['seconds']:.2f} | {ours['compile_s']:.1f} "
            f"| {memory_cell(ours)} | {memory_cell(reference)} {mfu_cells(ours)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
