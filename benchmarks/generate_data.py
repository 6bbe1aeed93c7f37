"""Data generation speed: pairs per second of generate_data.py's tiny config, the UNet's share of that time, and
plain text-to-image pairs against diffusers' StableDiffusionPipeline (PyTorch) on the same architecture.

diffusers has no Prompt-to-Prompt, so the side-by-side compares what both can do: a pair as two text-to-image
images (the input and the edited caption) with classifier-free guidance and Euler ancestral, decoded to pixels.
Ours then adds what generate_data.py does per pair: the P2P control (cross- and self-attention sharing) and the CLIP
scores. Each framework runs in its own subprocess; times come from warm calls (our first call compiles; PyTorch gets
a 1-step warm-up), best of ``--repeats``.

    python benchmarks/generate_data.py                 # the tiny config: 32 px, 10 steps, 8 pairs per call
    python benchmarks/generate_data.py --pairs 16 --steps 20
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from mfu import MFU_HEADER, MFU_RULE, compiled_flops, loop_flops, mfu_cells, utilisation  # benchmarks/ on sys.path
from worker import worker_result

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [("a photo of a cat on a sofa", "a photo of a dog on a sofa"), ("a red car", "a blue car in snow")]


def load_tiny_config(pairs: int, steps: int):
    import importlib.util

    spec = importlib.util.spec_from_file_location("config", ROOT / "configs" / "generate_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.batch_size, config.steps = pairs, steps
    return config


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def worker_jax(pairs: int, steps: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ip2p_jax.generation.candidates import make_candidate
    from ip2p_jax.generation.pairs import PairGenerator, TripleWork, load_models
    from ip2p_jax.generation.prompt_to_prompt import PromptToPrompt
    from ip2p_jax.generation.text_to_image import TextToImageInputs, make_text_to_image_sampler
    from ip2p_jax.generation.triples import Triple

    config = load_tiny_config(pairs, steps)
    with tempfile.TemporaryDirectory() as workdir:
        models, clip = load_models(config, Path(workdir))
    generator = PairGenerator(models, clip, config)
    works = []
    for index, (source, target) in enumerate(CAPTIONS):
        triple = Triple(index, source, "edit", target)
        works.append(TripleWork(triple, *generator.prepare(triple), candidates=[], pending=0))
    batch = [(works[i % len(works)], make_candidate(1000 + i, (0.1, 0.9), (7.5, 15.0))) for i in range(pairs)]

    def full_batch():
        images, scores = generator.run_batch(batch)
        return images

    start = time.perf_counter()
    full_batch()
    compile_s = time.perf_counter() - start
    full = best_of(repeats, full_batch)

    # The pieces, on the same batch: the P2P sampler alone, and the UNet alone over the same steps and batch.
    unet = models.unet
    params = generator.params["unet"]
    inputs = None

    def capture():
        nonlocal inputs
        from ip2p_jax.generation.text_to_image import PromptToPromptInputs
        from ip2p_jax.parallel import batch_sharded, pad_batch

        sharding = batch_sharded(generator.mesh)
        inputs = PromptToPromptInputs(
            context=jnp.stack([w.context for w, _ in batch]),
            null_context=jnp.broadcast_to(generator.null_context, (pairs, *generator.null_context.shape)),
            keys=jax.vmap(jax.random.key)(np.arange(pairs, dtype=np.uint32)),
            guidance_scale=jnp.full((pairs,), 7.5),
            p=jnp.full((pairs,), 0.5),
            mapper=jnp.asarray(np.stack([w.alignment.mapper for w, _ in batch])),
            alphas=jnp.asarray(np.stack([w.alignment.alphas for w, _ in batch])),
        )
        inputs = jax.tree.map(lambda x: jax.device_put(pad_batch(x, pairs), sharding), inputs)

    capture()
    p2p = best_of(repeats, lambda: jax.block_until_ready(generator.sampler(params, inputs)))

    shape = (4 * pairs, *generator.settings.latent_shape)  # [branch, role, pair]
    context = jnp.concatenate([inputs.context[:, 0], inputs.context[:, 1]] * 2)
    # The UNet as generate_data.py runs it: with the P2P control, sharing (its cost is the UNet's here).
    control = PromptToPrompt(
        mapper=inputs.mapper, alphas=inputs.alphas, share=jnp.ones((pairs,), bool), self_attention_sharing=True
    )

    def unet_steps(params, x, control):
        def body(x, t):
            eps, _ = unet.apply({"params": params}, x, t, context, control)
            return x + 1e-3 * eps, None

        return jax.lax.scan(body, x, jnp.linspace(999.0, 0.0, steps))[0]

    x = jnp.zeros(shape)
    times = {}
    for name, with_control in (("unet", control), ("unet_plain", None)):
        run = jax.jit(functools.partial(unet_steps, control=with_control))
        jax.block_until_ready(run(params, x))
        times[name] = best_of(repeats, lambda run=run: jax.block_until_ready(run(params, x)))

    # Plain text-to-image pairs: 2 images per pair, no control, decoded (what the PyTorch side does).
    t2i = make_text_to_image_sampler(lambda p, *a: unet.apply({"params": p}, *a), generator.settings, generator.mesh)
    plain_inputs = TextToImageInputs(
        context=jnp.concatenate([inputs.context[:, 0], inputs.context[:, 1]]),
        null_context=jnp.concatenate([inputs.null_context] * 2),
        keys=jnp.concatenate([inputs.keys] * 2),
        guidance_scale=jnp.full((2 * pairs,), 7.5),
    )
    vae, vae_params = models.vae, generator.params["vae"]
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z / vae.config.scaling_factor, method="decode"))

    def plain_pairs():
        return np.asarray(decode(vae_params, t2i(params, plain_inputs)))

    plain_pairs()
    plain = best_of(repeats, plain_pairs)
    # Model FLOPs of a generate_data.py batch: the UNet at the P2P batch once per step (mfu.py: a scan's body is
    # counted once), without the control's elementwise work; decoding and CLIP scoring run once and are left out.
    forward = jax.jit(lambda p, x: unet.apply({"params": p}, x, jnp.float32(500.0), context)[0])
    flops = loop_flops(compiled_flops(forward.lower(params, x).compile()), steps)
    return dict(
        full=full,
        p2p=p2p,
        plain=plain,
        compile_s=compile_s,
        device=jax.devices()[0].device_kind,
        **times,
        **utilisation(flops, full),
    )


def worker_torch(pairs: int, steps: int, repeats: int, threads: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ip2p_jax.random_models import tiny_tokenizer
    from ip2p_jax.tiny_configs import STAND_IN_TEXT, STAND_IN_UNET, STAND_IN_VAE

    config = load_tiny_config(pairs, steps)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = tiny_tokenizer(Path(workdir))
    text = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, **STAND_IN_TEXT)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**STAND_IN_VAE),
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, **STAND_IN_UNET),
        scheduler=EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = [CAPTIONS[i % len(CAPTIONS)][role] for role in (0, 1) for i in range(pairs)]
    size = config.resolution
    settings = dict(height=size, width=size, guidance_scale=7.5, output_type="np")
    with torch.inference_mode():
        pipe(prompts, num_inference_steps=1, **settings)
        plain = best_of(repeats, lambda: pipe(prompts, num_inference_steps=steps, **settings))
    return dict(plain=plain, threads=torch.get_num_threads())


def run_worker(framework: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", framework, "--pairs", str(args.pairs)]
    command += ["--steps", str(args.steps), "--repeats", str(args.repeats), "--torch-threads", str(args.torch_threads)]
    return worker_result(command, framework)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per call (the tiny config's batch_size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="PyTorch's intra-op threads (0: its default, one per core)"
    )
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "jax":
            result = worker_jax(args.pairs, args.steps, args.repeats)
        else:
            result = worker_torch(args.pairs, args.steps, args.repeats, args.torch_threads)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    ours, reference = run_worker("jax", args), run_worker("torch", args)
    n = args.pairs
    print(f"# generate_data.py tiny config: 32 px, {args.steps} steps, {n} pairs per call, float32")
    print("| pairs of | ours (pairs/s) | PyTorch (pairs/s) | ours / PyTorch (time) |")
    print("|---|---|---|---|")
    print(
        f"| plain text-to-image (2 images, CFG, decoded) | {n / ours['plain']:.2f} | {n / reference['plain']:.2f} "
        f"| {ours['plain'] / reference['plain']:.2f} |"
    )
    print(f"| P2P sampler alone (cross + self sharing) | {n / ours['p2p']:.2f} | - | - |")
    print(f"| generate_data.py batch (P2P, decode, CLIP scores) | {n / ours['full']:.2f} | - | - |")
    print()
    print(
        f"UNet share of generate_data.py's time: {ours['unet'] / ours['full']:.0%} (the UNet with the P2P control "
        f"over the same steps and batch: {ours['unet']:.3f} s of {ours['full']:.3f} s; without a control "
        f"{ours['unet_plain']:.3f} s); P2P sampler / plain sampler and decode: {ours['p2p'] / ours['plain']:.2f}; "
        f"our compile: {ours['compile_s']:.1f} s; peak RSS ours {ours['peak_rss_mib']:.0f} MiB, "
        f"PyTorch {reference['peak_rss_mib']:.0f} MiB ({reference['threads']} threads)"
    )
    print(f"\nMFU of a generate_data.py batch (UNet FLOPs only)\n{MFU_HEADER}\n{MFU_RULE}\n{mfu_cells(ours)}")


if __name__ == "__main__":
    main()
