"""Training on a device mesh: InstructPix2Pix (``config.task = "ip2p"``), its autoencoder (``"autoencoder"``), a
CLIP (``"clip"``) or a text-to-image model (``"text_to_image"``).

    python train.py --config configs/tiny.py --workdir /tmp/run            # a minute on a CPU
    python train.py --config configs/ip2p_sd15.py --config.model=DIR --workdir RUN
    python train.py --config configs/shapes_vae.py --workdir RUN           # an autoencoder from scratch

Writes orbax checkpoints (``WORKDIR/checkpoints``) and TensorBoard events (``WORKDIR/tensorboard``); shows a
progress bar with loss, steps/s and images/s. Stops with a message naming the step if the loss is not finite.
Several processes (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) each read their share
of every batch; process 0 alone logs and writes. ``export.py`` turns a run into a diffusers folder.

Preemption, as TPU pods have it: a work folder that holds a checkpoint is continued from its latest one, so the same
command relaunched carries on (``--resume`` insists on a checkpoint, ``--noresume`` refuses to run over one). On
SIGTERM every process saves a checkpoint at the next step boundary, together, and exits with status 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from ip2p_jax import compilation_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs go", required=True)
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", None, compilation_cache.HELP)
_RESUME = flags.DEFINE_bool(
    "resume",
    None,
    "unset: continue from the latest checkpoint in --workdir if there is one; true: there must be one; false: there "
    "must be none (a fresh run)",
)


def model_source(config, workdir: Path, main_process: bool) -> str:
    """The diffusers folder or hub id training starts from; ``new`` is a random model (``config.new_model``) that
    process 0 writes to ``WORKDIR/initial-model`` (the same on every run with the same seed)."""
    if config.model != "new":
        return config.model
    from jax.experimental import multihost_utils

    from ip2p_jax.training.new_model import INITIAL_MODEL, write_new_model

    folder = workdir / INITIAL_MODEL
    if main_process and not (folder / "model_index.json").is_file():
        write_new_model(folder, **config.new_model.to_dict(), seed=config.seed)
    multihost_utils.sync_global_devices("initial model written")
    return str(folder)


def checkpoint_models(config, model: str):
    """UNet (expanded to 8 channels when starting from SD), frozen VAE and text encoder, tokenizer."""
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
    stack = load_stack(model, dtype=dtype, with_scheduler=False, prepare_unet=ip2p_unet)
    unet, vae, text, tokenizer = stack.unet, stack.vae, stack.text_encoder, stack.tokenizer
    return unet, stack.params["unet"], vae, stack.params["vae"], text, stack.params["text_encoder"], tokenizer


def training_unet(config, unet):
    """The UNet the train step differentiates: ``unet`` with the config's rematerialisation (``remat``: ``none``,
    ``transformer`` or ``resnet_and_transformer``, ``ip2p_jax/models/unet.py``) and attention kernel
    (``attention_backend``, ``partitioned_backend`` of ``models/attention_kernels.py``: the step is one
    GSPMD-partitioned jit over every device). Sampling and evaluation use ``unet`` itself. An unknown setting is a
    ``ValueError``."""
    import jax

    from ip2p_jax.models.attention_kernels import partitioned_backend

    backend = partitioned_backend(config.attention_backend, unet.dtype, jax.device_count())
    return unet.clone(remat=config.remat, attention_backend=backend)


def sample_edit_grid(pipeline, ema_params, rows, steps: int):
    """Edits of ``rows``' input images by their instructions with the EMA UNet: a PIL grid of rows
    (input | target | edit)."""
    import numpy as np
    from PIL import Image

    from ip2p_jax.pipeline import postprocess, to_pil
    from ip2p_jax.visualisation import grid

    pipeline.params = {**pipeline.params, "unet": ema_params}
    inputs = ((rows["input_image"] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    edits = pipeline(
        list(inputs), list(rows["instruction"]), num_inference_steps=steps, output_type="pil", progress=False
    ).images
    targets = [to_pil(target) for target in postprocess(rows["edited_image"])]
    return grid([[Image.fromarray(i), t, e] for i, t, e in zip(inputs, targets, edits, strict=True)])


@dataclasses.dataclass
class Task:
    """What one kind of training brings to the shared loop of ``main``.

    Attributes:
      params: the trainable params at the start (float32).
      tx: the optimizer.
      step: ``(state, batch, key, frozen) -> (state, metrics)``, pure (jitted and sharded by ``main``).
      frozen: what the step reads but does not train (replicated).
      batch: this host's data rows (``input_image``, ``edited_image``, ``instruction``; or ``image``, ``caption``
        and the grounded words of the captioned-scene stream) -> the step's arrays.
      samples: ``(EMA params on the host, data rows) -> PIL grid`` for ``sample.every``, or ``None``.
      evaluate: ``EMA params on the host -> {name: value}`` for ``sample.every`` (held-out measurements, logged
        and printed), or ``None``.
    """

    params: Any
    tx: Any
    step: Callable
    frozen: Any
    batch: Callable[[dict], dict]
    samples: Callable[[Any, dict], Any] | None
    evaluate: Callable[[Any], dict[str, float]] | None = None


def optimizer(config):
    """AdamW (constant rate, clipping, accumulation) from the config's settings."""
    from ip2p_jax.training.state import make_optimizer

    return make_optimizer(
        config.optim.learning_rate,
        weight_decay=config.optim.weight_decay,
        max_grad_norm=config.optim.max_grad_norm,
        accumulation=config.optim.accumulation,
    )


def ip2p_task(config, workdir: Path, main_process: bool) -> Task:
    """InstructPix2Pix: the UNet trains; VAE and text encoder are frozen (``training/step.py``)."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax import parallel
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import Scheduler, SchedulerConfig
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training.objective import training_objective
    from ip2p_jax.training.step import StepSettings, train_step
    from ip2p_jax.weights.export import ip2p_scheduler_config

    model = model_source(config, workdir, main_process)
    unet, params, vae, vae_params, text, text_params, tokenizer = checkpoint_models(config, model)
    tx = optimizer(config)
    objective, betas = training_objective(config.objective, model)
    settings = StepSettings(
        unet=training_unet(config, unet),
        vae=vae,
        text_encoder=text,
        tx=tx,
        alphas_cumprod=tuple(SchedulerConfig(**betas).alphas_cumprod().tolist()),
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
    evaluate = None
    if config.get("eval") and config.eval.count and config.data.name.split("/")[0] == "shapes_edit":
        evaluate = keyword_localisation(config, unet, vae, vae_params, text, text_params, tokenizer, betas)
    step = functools.partial(train_step, settings=settings)
    return Task(params, tx, step, frozen, batch, samples, evaluate)


def keyword_localisation(config, unet, vae, vae_params, text, text_params, tokenizer, betas) -> Callable:
    """``EMA params -> {name: value}``: the instruction keyword's localisation (``ip2p_jax/evaluation/localisation.py``)
    on ``eval.count`` fresh ShapesEdit training-distribution edits (drawn past the split's end, so never trained on; the
    test splits stay untouched), conditioned on the input picture as FoI's mask step is."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ip2p_jax.data import shapes_edit
    from ip2p_jax.evaluation.localisation import localisation, noised_maps
    from ip2p_jax.foi import SubInstruction, instruction_tokens
    from ip2p_jax.schedulers import SchedulerConfig
    from ip2p_jax.tokenizer import tokenize

    builder_config = shapes_edit.ShapesEditConfig(name="eval", leak_fraction=0.0)
    examples = [shapes_edit.draw(builder_config, "train", 10**6 + i) for i in range(config.eval.count)]
    pixels = np.stack([e.input_image for e in examples]).astype(np.float32) / 127.5 - 1.0
    image_latents, _ = jax.jit(lambda x: vae.apply({"params": vae_params}, x, method="encode"))(pixels)
    latents = vae.config.scaling_factor * image_latents
    context = text.apply({"params": text_params}, jnp.asarray(tokenize(tokenizer, [e.instruction for e in examples])))
    weights = np.stack(
        [
            instruction_tokens(tokenizer, [SubInstruction(e.instruction, e.edits[0].keyword)]).keyword_weights
            for e in examples
        ]
    )
    regions = np.stack([e.regions[:1] for e in examples])
    valid = np.ones(weights.shape[:2], bool)
    alphas_cumprod = SchedulerConfig(**betas).alphas_cumprod()
    unet_apply = lambda p, *a: unet.apply({"params": p}, *a)  # noqa: E731
    size = tuple(config.eval.map_size)
    maps_at = jax.jit(
        lambda p, noise, t, a: noised_maps(unet_apply, p, latents, noise, t, a, context, size, image_latents),
        static_argnums=2,  # the timestep: one compile per measured timestep
    )

    def evaluate(ema):
        measured = {}
        for t in config.eval.timesteps:
            noise = jax.random.normal(jax.random.key(t), latents.shape)
            maps = np.asarray(maps_at(ema, noise, int(t), float(alphas_cumprod[t])))
            found = localisation(maps, weights, regions, valid, gamma=config.eval.gamma, tau=config.eval.tau)
            measured[f"keyword_iou_t{t}"] = float(np.nanmean(found["iou"]))
            measured[f"keyword_inside_over_mean_t{t}"] = float(np.nanmean(found["inside_over_mean"]))
        return measured

    return evaluate


def autoencoder_task(config, workdir: Path, main_process: bool) -> Task:
    """The KL autoencoder on both pictures of every pair (a batch of ``B`` pairs is ``2B`` images;
    ``training/autoencoder.py``), from ``config.new_model.vae`` (``model = "new"``) or a folder's ``vae/``."""
    import jax
    import numpy as np

    from ip2p_jax.pipeline import postprocess, to_pil
    from ip2p_jax.random_models import random_vae
    from ip2p_jax.training.autoencoder import AutoencoderSettings, autoencoder_step
    from ip2p_jax.visualisation import grid
    from ip2p_jax.weights import load_vae

    del workdir, main_process
    if config.model == "new":
        vae, params = random_vae(config.new_model.vae.to_dict(), jax.random.key(config.seed))
    else:
        vae, params = load_vae(config.model)
    tx = optimizer(config)
    settings = AutoencoderSettings(
        vae=vae,
        tx=tx,
        kl_weight=config.objective.kl_weight,
        ema_max_decay=config.ema.decay,
        accumulation=config.optim.accumulation,
        learning_rate=config.optim.learning_rate,
    )
    reconstruct = jax.jit(lambda p, x: vae.apply({"params": p}, x))

    def batch(rows):
        return {"images": np.concatenate([rows["input_image"], rows["edited_image"]])}

    def samples(ema, rows):
        """Rows of (picture | reconstruction by the EMA params)."""
        pictures = rows["input_image"]
        pairs = zip(postprocess(pictures), postprocess(reconstruct(ema, pictures)), strict=True)
        return grid([[to_pil(picture), to_pil(reconstruction)] for picture, reconstruction in pairs])

    return Task(params, tx, functools.partial(autoencoder_step, settings=settings), {}, batch, samples)


def clip_task(config, workdir: Path, main_process: bool) -> Task:
    """A CLIP trained contrastively on captioned scenes (``training/clip.py``), from ``config.new_model.clip``
    (``model = "new"``, written to ``WORKDIR/initial-model``) or a transformers ``CLIPModel`` folder."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ip2p_jax.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from ip2p_jax.data import captioned_scenes
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training.clip import (
        CLIPSettings,
        clip_step,
        pick_accuracy,
        retrieval_top1,
        trim_padding,
        word_pick_questions,
    )
    from ip2p_jax.training.new_model import INITIAL_MODEL, write_new_clip
    from ip2p_jax.weights import load_clip, load_tokenizer

    source = config.model
    if source == "new":
        source = str(workdir / INITIAL_MODEL)
        if main_process and not (workdir / INITIAL_MODEL / "config.json").is_file():
            write_new_clip(source, **config.new_model.clip.to_dict(), seed=config.seed)
        multihost_utils.sync_global_devices("initial model written")
    clip, params = load_clip(source)
    tokenizer = load_tokenizer(source, subfolder="")
    tx = optimizer(config)
    settings = CLIPSettings(clip, tx, config.ema.decay, config.optim.accumulation, config.optim.learning_rate)
    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)

    def batch(rows):
        # CLIP's processing of a picture already at the tower's size: [0, 1], CLIP's mean and std.
        captions = list(rows["caption"])
        negatives = rows.get("hard_negatives", np.zeros((len(captions), 0), str))
        ids = tokenize(tokenizer, captions + [str(text) for text in negatives.reshape(-1)])
        ids = trim_padding(ids, clip.config.text.eos_token_id)
        arrays = {"pixel_values": ((rows["image"] + 1) / 2 - mean) / std, "input_ids": ids[: len(captions)]}
        if negatives.size:
            arrays["negative_input_ids"] = ids[len(captions) :].reshape(*negatives.shape, -1)
            arrays["negative_valid"] = rows["hard_negative_valid"]
        return arrays

    held_out = batch(next(captioned_scenes.batches(config.seed, config.eval.count, stream="eval")))
    held_out_scenes = [captioned_scenes.draw_scene(config.seed, "eval", i) for i in range(config.eval.count)]
    picks = {kind: word_pick_questions(held_out_scenes, kind) for kind in ("shape", "colour")}
    encode = jax.jit(lambda p, x, ids: clip.apply({"params": p}, x, ids)[:2])
    encode_text = jax.jit(lambda p, ids: clip.apply({"params": p}, ids, method="get_text_features"))

    def evaluate(ema):
        """Top-1 retrieval among ``eval.count`` held-out scenes, both ways; shape and colour picks among their
        objects' one-word variants (``word_pick_questions``)."""
        image_embeds, text_embeds = encode(ema, held_out["pixel_values"], held_out["input_ids"])
        image_embeds = np.asarray(image_embeds)
        measured = retrieval_top1(image_embeds, np.asarray(text_embeds))
        for kind, (rows, captions, truth, count) in picks.items():
            variants = np.asarray(encode_text(ema, tokenize(tokenizer, captions))).reshape(len(rows), count, -1)
            measured[f"{kind}_pick"] = pick_accuracy(image_embeds[rows], variants, truth)
        return measured

    step = functools.partial(clip_step, settings=settings)
    return Task(params, tx, step, {}, batch, samples=None, evaluate=evaluate)


def text_to_image_task(config, workdir: Path, main_process: bool) -> Task:
    """A text-to-image latent diffusion model on captioned scenes (``training/text_to_image.py``), optionally with
    the grounding objective; the VAE and text encoder are frozen. Measures word localisation on held-out scenes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ip2p_jax import parallel
    from ip2p_jax.data import captioned_scenes
    from ip2p_jax.evaluation.localisation import localisation, noised_maps
    from ip2p_jax.generation.text_to_image import TextToImageInputs, TextToImageSettings, make_text_to_image_sampler
    from ip2p_jax.pipeline import postprocess, to_pil
    from ip2p_jax.schedulers import Scheduler, SchedulerConfig
    from ip2p_jax.tokenizer import span_token_weights, tokenize
    from ip2p_jax.training.objective import training_objective
    from ip2p_jax.training.text_to_image import TextToImageStepSettings, text_to_image_step
    from ip2p_jax.visualisation import grid
    from ip2p_jax.weights import load_stack
    from ip2p_jax.weights.export import ip2p_scheduler_config

    def text_to_image_unet(unet, unet_params):
        if unet.config.in_channels != 4:
            raise ValueError(f"text-to-image training needs a 4-channel UNet, {model} has {unet.config.in_channels}")
        return unet, unet_params

    model = model_source(config, workdir, main_process)
    stack = load_stack(model, with_scheduler=False, prepare_unet=text_to_image_unet)
    unet, vae, text, tokenizer = stack.unet, stack.vae, stack.text_encoder, stack.tokenizer
    params, vae_params, text_params = stack.params["unet"], stack.params["vae"], stack.params["text_encoder"]
    tx = optimizer(config)
    objective, betas = training_objective(config.objective, model)
    alphas_cumprod = SchedulerConfig(**betas).alphas_cumprod()
    settings = TextToImageStepSettings(
        unet=training_unet(config, unet),
        vae=vae,
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
    frozen = {"vae": vae_params, "text_encoder": text_params, "null_context": null_context}

    def batch(rows):
        captions = list(rows["caption"])
        return {
            "image": rows["image"],
            "input_ids": tokenize(tokenizer, captions),
            "token_weights": span_token_weights(tokenizer, captions, rows["word_spans"]),
            "word_masks": rows["word_masks"],
            "word_valid": (rows["word_spans"][..., 0] >= 0) & rows["word_masks"].any(axis=(2, 3)),
        }

    unet_apply = lambda p, *a: unet.apply({"params": p}, *a)  # noqa: E731
    scale = vae.config.scaling_factor
    latent_size = config.data.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    scheduler = Scheduler.from_config(ip2p_scheduler_config(**betas, prediction_type=objective.prediction_type))
    sampler = make_text_to_image_sampler(
        unet_apply,
        TextToImageSettings(scheduler, config.sample.steps, (latent_size, latent_size), unet.config.in_channels),
        parallel.data_mesh(jax.local_devices()[:1]),
    )
    decode = jax.jit(lambda z: vae.apply({"params": vae_params}, z / scale, method="decode"))

    def samples(ema, rows):
        """Rows of (training picture | a picture generated from its caption by the EMA UNet)."""
        count = len(rows["caption"])
        context = encode_text(jnp.asarray(tokenize(tokenizer, list(rows["caption"]))))
        inputs = TextToImageInputs(
            context=context,
            null_context=jnp.broadcast_to(null_context, context.shape),
            keys=jax.vmap(lambda i: jax.random.fold_in(jax.random.key(config.seed), i))(jnp.arange(count)),
            guidance_scale=jnp.full((count,), config.sample.guidance_scale, jnp.float32),
        )
        generated = postprocess(decode(sampler(ema, inputs)))
        return grid([[to_pil(x), to_pil(y)] for x, y in zip(postprocess(rows["image"]), generated, strict=True)])

    held_out = batch(next(captioned_scenes.batches(config.seed, config.eval.count, stream="eval")))
    mean, _ = jax.jit(lambda x: vae.apply({"params": vae_params}, x, method="encode"))(held_out["image"])
    held_latents = scale * mean
    held_context = encode_text(jnp.asarray(held_out["input_ids"]))
    map_size = tuple(config.eval.map_size)
    maps_at = jax.jit(
        lambda p, noise, t, a: noised_maps(unet_apply, p, held_latents, noise, t, a, held_context, map_size),
        static_argnums=2,  # the timestep: one compile per measured timestep
    )
    shape_words = np.arange(captioned_scenes.GROUNDED) < captioned_scenes.GROUNDED - 1  # the last is "background"

    def evaluate(ema):
        """Word localisation on held-out scenes: FoI's mask IoU and inside / mean, shape words and "background"."""
        measured = {}
        for t in config.eval.timesteps:
            noise = jax.random.normal(jax.random.key(t), held_latents.shape)
            maps = np.asarray(maps_at(ema, noise, int(t), float(alphas_cumprod[t])))
            found = localisation(
                maps,
                held_out["token_weights"],
                held_out["word_masks"],
                held_out["word_valid"],
                gamma=config.eval.gamma,
                tau=config.eval.tau,
            )
            for name, words in (("shape", shape_words), ("background", ~shape_words)):
                measured[f"{name}_iou_t{t}"] = float(np.nanmean(found["iou"][:, words]))
                measured[f"{name}_inside_over_mean_t{t}"] = float(np.nanmean(found["inside_over_mean"][:, words]))
        return measured

    step = functools.partial(text_to_image_step, settings=settings)
    return Task(params, tx, step, frozen, batch, samples=samples, evaluate=evaluate)


TASKS = {"ip2p": ip2p_task, "autoencoder": autoencoder_task, "clip": clip_task, "text_to_image": text_to_image_task}


def main(argv) -> None:
    del argv
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    from ip2p_jax import parallel
    from ip2p_jax.data import input_pipeline
    from ip2p_jax.training import checkpoint
    from ip2p_jax.training.preemption import PreemptionWatch
    from ip2p_jax.training.state import create_train_state

    logging.set_verbosity(logging.WARNING)  # orbax logs every save phase at INFO
    compilation_cache.enable(_COMPILATION_CACHE.value)
    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    if config is None:
        sys.exit("train.py: give --config configs/<name>.py")
    if config.task not in TASKS:
        sys.exit(f"train.py: unknown task {config.task!r} (one of {sorted(TASKS)})")
    parallel.maybe_initialize_distributed()
    main_process = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if config.data.global_batch_size % config.optim.accumulation:
        sys.exit("train.py: data.global_batch_size must divide by optim.accumulation")
    micro_batch = config.data.global_batch_size // config.optim.accumulation
    if micro_batch % jax.process_count():
        sys.exit(f"train.py: the batch of {micro_batch} does not split over {jax.process_count()} processes")
    mesh = parallel.train_mesh(fsdp=config.fsdp)
    if micro_batch % mesh.size:
        sys.exit(f"train.py: the batch of {micro_batch} does not split over {mesh.size} devices")
    try:
        builder = input_pipeline.builder_from_config(config, main_process)
        task = TASKS[config.task](config, workdir, main_process)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        sys.exit(f"train.py: {error}")

    replicated = parallel.replicated(mesh)
    create = functools.partial(create_train_state, tx=task.tx)
    abstract_state = jax.eval_shape(create, task.params)
    state_sharding = parallel.state_shardings(mesh, abstract_state)
    state = jax.jit(create, out_shardings=state_sharding)(task.params)
    frozen = jax.device_put(task.frozen, replicated)

    manager = checkpoint.checkpoint_manager(workdir / "checkpoints", keep=config.checkpoint.keep)
    latest = manager.latest_step()
    if latest is None and _RESUME.value:
        sys.exit(f"train.py: --resume but no checkpoint in {workdir / 'checkpoints'}")
    if latest is not None and _RESUME.value is False:
        sys.exit(f"train.py: --noresume but {workdir / 'checkpoints'} holds step {latest}; choose another --workdir")
    if latest is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding
        )
        state, meta = checkpoint.restore_latest(manager, abstract)
        if main_process:
            print(f"resumed at step {int(state.step)} (data position {meta['data_position']})", file=sys.stderr)

    batch_sharding = parallel.train_batch_sharding(mesh)
    step_fn = jax.jit(
        task.step,
        in_shardings=(state_sharding, batch_sharding, replicated, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    key = jax.random.key(config.seed)
    writer = None
    if main_process:
        import tensorflow as tf

        writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))
    start_step = int(jax.device_get(state.step))
    preemption = PreemptionWatch()  # before the progress bar: a notice from then on is caught
    total = config.steps * config.optim.accumulation
    bar = tqdm(total=total, initial=start_step, desc=f"training ({config.task})", disable=not main_process)
    started, images = time.perf_counter(), 0
    stream = input_pipeline.batches_from_config(config, builder, micro_batch, start_step)
    sample_rows, loss = None, float("nan")
    for step in range(start_step, total):
        rows = next(stream)
        if sample_rows is None:
            sample_rows = {k: v[: config.sample.count] for k, v in rows.items()}
        local = task.batch(rows)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in local.items()}
        state, metrics = step_fn(state, batch, key, frozen)
        images += micro_batch
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            manager.wait_until_finished()
            sys.exit(f"train.py: the loss is {loss} at step {step + 1}; stopping (last checkpoint kept)")
        if (step + 1) % config.log_every == 0 or step + 1 == total:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - started
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                steps_s=f"{(step + 1 - start_step) / elapsed:.2f}",
                images_s=f"{images / elapsed:.1f}",
            )
            if writer is not None:
                with writer.as_default(step=step + 1):
                    for name, value in metrics.items():
                        tf.summary.scalar(name, value)
        if config.sample.every and (step + 1) % config.sample.every == 0:
            ema = multihost_utils.process_allgather(state.ema_params, tiled=True)  # every process takes part
            if main_process and task.samples is not None:
                grid = task.samples(ema, sample_rows)
                path = workdir / "samples" / f"step_{step + 1:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                grid.save(path)
                with writer.as_default(step=step + 1):
                    tf.summary.image("samples", np.asarray(grid)[None], step=step + 1)
            if main_process and task.evaluate is not None:
                measured = task.evaluate(ema)
                bar.write(
                    f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in measured.items()), file=sys.stderr
                )
                with writer.as_default(step=step + 1):
                    for name, value in measured.items():
                        tf.summary.scalar(f"eval/{name}", value)
        bar.update(1)
        preempted = preemption.reached(step + 1)
        if preempted or (step + 1) % config.checkpoint.every == 0 or step + 1 == total:
            checkpoint.save(manager, state, {"data_position": step + 1, "config": config.to_dict()}, force=preempted)
        if preempted:
            manager.wait_until_finished()
            bar.close()
            if main_process:
                print(f"preempted: saved step {step + 1} of {total}; the same command continues", file=sys.stderr)
            return
    preemption.close()
    manager.wait_until_finished()
    bar.close()
    if main_process:
        print(f"done: step {total}, last loss {loss:.6f}, checkpoints in {workdir / 'checkpoints'}", file=sys.stderr)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with an override of a setting the config does not have (``--config.lr=...``) reported in one
    line rather than as ml_collections' traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:  # ml_collections' "no such field", raised while parsing
        from ip2p_jax.script_config import unknown_setting

        sys.exit(f"train.py: {unknown_setting(error)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
