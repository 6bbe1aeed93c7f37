"""InstructPix2Pix: the UNet trains on (input, instruction, edited) triples; the VAE and text encoder are frozen
(``training/step.py``)."""

from __future__ import annotations

import functools
from pathlib import Path

from ip2p_jax.training.tasks import Task
from ip2p_jax.training.tasks.common import model_source, optimizer, training_unet


def load_models(config, model: str):
    """The model stack training starts from (``ModelStack``): the UNet expanded to 8 input channels when starting
    from Stable Diffusion (``init_from = "sd"``), in the config's dtype; no scheduler."""
    import jax.numpy as jnp

    from ip2p_jax.training.init import expand_input_channels
    from ip2p_jax.weights import load_stack

    def ip2p_unet(unet, unet_params):
        if config.init_from == "sd":
            return expand_input_channels(unet, unet_params, 8)
        if unet.config.in_channels != 8:
            raise ValueError(f"init_from='ip2p' needs an 8-channel UNet, {model} has {unet.config.in_channels}")
        return unet, unet_params

    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    return load_stack(model, dtype=dtype, with_scheduler=False, prepare_unet=ip2p_unet)


def sample_edit_grid(pipeline, ema_params, rows, steps: int):
    """Edits of ``rows``' input images by their instructions with the EMA UNet: a PIL grid of rows
    (input | target | edit)."""
    import numpy as np
    from PIL import Image

    from ip2p_jax.image_processing import postprocess, to_pil
    from ip2p_jax.visualisation import grid

    pipeline.params = {**pipeline.params, "unet": ema_params}
    inputs = ((rows["input_image"] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    edits = pipeline(
        list(inputs), list(rows["instruction"]), num_inference_steps=steps, output_type="pil", progress=False
    ).images
    targets = [to_pil(target) for target in postprocess(rows["edited_image"])]
    return grid([[Image.fromarray(i), t, e] for i, t, e in zip(inputs, targets, edits, strict=True)])


def build(config, workdir: Path, main_process: bool) -> Task:
    """The InstructPix2Pix task of ``config`` (``configs/shapes_ip2p.py``, ``configs/ip2p_sd15.py``)."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax import parallel
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import Scheduler, SchedulerConfig
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training import evaluators
    from ip2p_jax.training.objective import training_objective
    from ip2p_jax.training.step import StepSettings, train_step
    from ip2p_jax.weights.export import ip2p_scheduler_config

    model = model_source(config, workdir, main_process)
    stack = load_models(config, model)
    unet, vae, text, tokenizer = stack.unet, stack.vae, stack.text_encoder, stack.tokenizer
    vae_params, text_params = stack.params["vae"], stack.params["text_encoder"]
    tx = optimizer(config)
    objective, betas = training_objective(config.objective, model)
    alphas_cumprod = SchedulerConfig(**betas).alphas_cumprod()
    settings = StepSettings(
        unet=training_unet(config, unet),
        vae=vae,
        text_encoder=text,
        tx=tx,
        alphas_cumprod=tuple(alphas_cumprod.tolist()),
        dropout=config.objective.conditioning_dropout,
        ema_max_decay=config.ema.decay,
        accumulation=config.optim.accumulation,
        learning_rate=config.optim.learning_rate,
        objective=objective,
    )
    null_context = text.apply({"params": text_params}, jnp.asarray(tokenize(tokenizer, [""])))
    frozen = {"vae": vae_params, "text_encoder": text_params, "null_context": null_context}

    def batch(rows):
        rows = dict(rows)
        rows["input_ids"] = tokenize(tokenizer, list(rows.pop("instruction")))
        return rows

    @functools.cache
    def pipeline():
        """The editing pipeline for sample edits (built on first use; the UNet params come with each call)."""
        scheduler = Scheduler.from_config(ip2p_scheduler_config(**betas, prediction_type=objective.prediction_type))
        params = {"unet": None, "vae": vae_params, "text_encoder": text_params}
        return InstructPix2PixPipeline(
            unet, vae, text, tokenizer, scheduler, params, parallel.data_mesh(jax.local_devices())
        )

    samples = lambda ema, rows: sample_edit_grid(pipeline(), ema, rows, config.sample.steps)  # noqa: E731
    parts = evaluators.Parts(batch, tokenizer, stack=stack, alphas_cumprod=alphas_cumprod)
    evaluate = evaluators.from_config(config, parts)
    step = functools.partial(train_step, settings=settings)
    return Task(stack.params["unet"], tx, step, frozen, batch, samples, evaluate)
