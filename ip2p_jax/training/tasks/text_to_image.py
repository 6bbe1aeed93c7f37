"""A text-to-image latent diffusion model on captioned scenes (``training/text_to_image.py``), optionally with the
grounding objective; the VAE and text encoder are frozen."""

from __future__ import annotations

import functools
from pathlib import Path

from ip2p_jax.training.tasks import Task
from ip2p_jax.training.tasks.common import model_source, optimizer, training_unet


def sample_generations(config, stack, betas, prediction_type: str, encode_text, null_context):
    """``(EMA params, data rows) -> PIL grid`` of rows (training picture | a picture generated from its caption)."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax import parallel
    from ip2p_jax.generation.text_to_image import TextToImageInputs, TextToImageSettings, make_text_to_image_sampler
    from ip2p_jax.image_processing import postprocess, to_pil
    from ip2p_jax.schedulers import Scheduler
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.visualisation import grid
    from ip2p_jax.weights.export import ip2p_scheduler_config

    unet, vae = stack.unet, stack.vae
    latent_size = config.data.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    scheduler = Scheduler.from_config(ip2p_scheduler_config(**betas, prediction_type=prediction_type))
    sampler = make_text_to_image_sampler(
        lambda p, *a: unet.apply({"params": p}, *a),
        TextToImageSettings(scheduler, config.sample.steps, (latent_size, latent_size), unet.config.in_channels),
        parallel.data_mesh(jax.local_devices()[:1]),
    )
    scale = vae.config.scaling_factor
    decode = jax.jit(lambda z: vae.apply({"params": stack.params["vae"]}, z / scale, method="decode"))

    def samples(ema, rows):
        count = len(rows["caption"])
        context = encode_text(jnp.asarray(tokenize(stack.tokenizer, list(rows["caption"]))))
        inputs = TextToImageInputs(
            context=context,
            null_context=jnp.broadcast_to(null_context, context.shape),
            keys=jax.vmap(lambda i: jax.random.fold_in(jax.random.key(config.seed), i))(jnp.arange(count)),
            guidance_scale=jnp.full((count,), config.sample.guidance_scale, jnp.float32),
        )
        generated = postprocess(decode(sampler(ema, inputs)))
        return grid([[to_pil(x), to_pil(y)] for x, y in zip(postprocess(rows["image"]), generated, strict=True)])

    return samples


def build(config, workdir: Path, main_process: bool) -> Task:
    """The text-to-image task of ``config`` (``configs/shapes_t2i.py``)."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax.schedulers import SchedulerConfig
    from ip2p_jax.tokenizer import span_token_weights, tokenize
    from ip2p_jax.training import evaluators
    from ip2p_jax.training.objective import training_objective
    from ip2p_jax.training.text_to_image import TextToImageStepSettings, text_to_image_step
    from ip2p_jax.weights import load_stack

    def text_to_image_unet(unet, unet_params):
        if unet.config.in_channels != 4:
            raise ValueError(f"text-to-image training needs a 4-channel UNet, {model} has {unet.config.in_channels}")
        return unet, unet_params

    model = model_source(config, workdir, main_process)
    stack = load_stack(model, with_scheduler=False, prepare_unet=text_to_image_unet)
    text, tokenizer, text_params = stack.text_encoder, stack.tokenizer, stack.params["text_encoder"]
    tx = optimizer(config)
    objective, betas = training_objective(config.objective, model)
    alphas_cumprod = SchedulerConfig(**betas).alphas_cumprod()
    settings = TextToImageStepSettings(
        unet=training_unet(config, stack.unet),
        vae=stack.vae,
        text_encoder=text,
        tx=tx,
        alphas_cumprod=tuple(alphas_cumprod.tolist()),
        caption_dropout=config.objective.caption_dropout,
        token_weight=config.grounding.token_weight,
        pixel_weight=config.grounding.pixel_weight,
        grounding_sizes=tuple(tuple(size) for size in config.grounding.sizes),
        ema_max_decay=config.ema.decay,
        accumulation=config.optim.accumulation,
        learning_rate=config.optim.learning_rate,
        objective=objective,
    )
    encode_text = jax.jit(lambda ids: text.apply({"params": text_params}, ids))
    null_context = encode_text(jnp.asarray(tokenize(tokenizer, [""])))
    frozen = {"vae": stack.params["vae"], "text_encoder": text_params, "null_context": null_context}

    def batch(rows):
        captions = list(rows["caption"])
        return {
            "image": rows["image"],
            "input_ids": tokenize(tokenizer, captions),
            "token_weights": span_token_weights(tokenizer, captions, rows["word_spans"]),
            "word_masks": rows["word_masks"],
            "word_valid": (rows["word_spans"][..., 0] >= 0) & rows["word_masks"].any(axis=(2, 3)),
        }

    samples = sample_generations(config, stack, betas, objective.prediction_type, encode_text, null_context)
    evaluate = evaluators.from_config(
        config, evaluators.Parts(batch, tokenizer, stack=stack, alphas_cumprod=alphas_cumprod)
    )
    step = functools.partial(text_to_image_step, settings=settings)
    return Task(stack.params["unet"], tx, step, frozen, batch, samples=samples, evaluate=evaluate)
