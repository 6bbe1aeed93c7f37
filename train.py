"""Training on a device mesh: InstructPix2Pix (``config.task = "ip2p"``) or its autoencoder (``"autoencoder"``).

    python train.py --config configs/tiny.py --workdir /tmp/run            # a minute on a CPU
    python train.py --config configs/tiny.py --workdir /tmp/run --resume   # continue from the last checkpoint
    python train.py --config configs/ip2p_sd15.py --config.model=DIR --workdir RUN
    python train.py --config configs/shapes_vae.py --workdir RUN           # an autoencoder from scratch

Writes orbax checkpoints (``WORKDIR/checkpoints``) and TensorBoard events (``WORKDIR/tensorboard``); shows a
progress bar with loss, steps/s and images/s. Stops with a message naming the step if the loss is not finite.
Several processes (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) each read their share
of every batch; process 0 alone logs and writes. ``export.py`` turns a run into a diffusers folder.
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

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs go", required=True)
_RESUME = flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --workdir")


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
    from ip2p_jax.weights import load_text_encoder, load_tokenizer, load_unet, load_vae

    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    unet, unet_params = load_unet(model, dtype=dtype)
    if config.init_from == "sd":
        unet, unet_params = expand_input_channels(unet, unet_params, 8)
    elif unet.config.in_channels != 8:
        raise ValueError(f"init_from='ip2p' needs an 8-channel UNet, {model} has {unet.config.in_channels}")
    vae, vae_params = load_vae(model, dtype=dtype)
    text, text_params = load_text_encoder(model, dtype=dtype)
    return unet, unet_params, vae, vae_params, text, text_params, load_tokenizer(model)


def sample_edit_grid(pipeline, ema_params, rows, steps: int):
    """Edits of ``rows``' input images by their instructions with the EMA UNet: a PIL grid of rows
    (input | target | edit)."""
    import numpy as np

    from ip2p_jax.pipeline import to_pil

    pipeline.params = {**pipeline.params, "unet": ema_params}
    inputs = ((rows["input_image"] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    targets = ((rows["edited_image"] + 1) / 2).clip(0, 1)
    edits = pipeline(list(inputs), list(rows["instruction"]), num_inference_steps=steps, output_type="np",
                     progress=False).images  # fmt: skip
    grid = [np.concatenate([i / 255.0, t, e], axis=1) for i, t, e in zip(inputs, targets, edits, strict=True)]
    return to_pil(np.concatenate(grid, axis=0))


@dataclasses.dataclass
class Task:
    """What one kind of training brings to the shared loop of ``main``.

    Attributes:
      params: the trainable params at the start (float32).
      tx: the optimizer.
      step: ``(state, batch, key, frozen) -> (state, metrics)``, pure (jitted and sharded by ``main``).
      frozen: what the step reads but does not train (replicated).
      batch: this host's data rows (``input_image``, ``edited_image``, ``instruction``) -> the step's arrays.
      samples: ``(EMA params on the host, data rows) -> PIL grid`` for ``sample_every``.
    """

    params: Any
    tx: Any
    step: Callable
    frozen: Any
    batch: Callable[[dict], dict]
    samples: Callable[[Any, dict], Any]


def optimizer(config):
    """AdamW (constant rate, clipping, accumulation) from the config's settings."""
    from ip2p_jax.training.state import make_optimizer

    return make_optimizer(
        config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        accumulation=config.accumulation,
    )


def ip2p_task(config, workdir: Path, main_process: bool) -> Task:
    """InstructPix2Pix: the UNet trains; VAE and text encoder are frozen (``training/step.py``)."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax import parallel
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import Scheduler, SchedulerConfig
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training.step import StepSettings, train_step
    from ip2p_jax.weights import load_noise_schedule

    model = model_source(config, workdir, main_process)
    unet, params, vae, vae_params, text, text_params, tokenizer = checkpoint_models(config, model)
    tx = optimizer(config)
    betas = load_noise_schedule(model)
    settings = StepSettings(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tx=tx,
        alphas_cumprod=tuple(SchedulerConfig(**betas).alphas_cumprod().tolist()),
        dropout=config.conditioning_dropout,
        ema_max_decay=config.ema_decay,
        accumulation=config.accumulation,
        learning_rate=config.learning_rate,
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
        scheduler = Scheduler("euler_ancestral", SchedulerConfig(**betas, steps_offset=1))
        params = {"unet": None, "vae": vae_params, "text_encoder": text_params}
        return InstructPix2PixPipeline(
            unet, vae, text, tokenizer, scheduler, params, parallel.data_mesh(jax.local_devices())
        )

    samples = lambda ema, rows: sample_edit_grid(pipeline(), ema, rows, config.sample_steps)  # noqa: E731
    return Task(params, tx, functools.partial(train_step, settings=settings), frozen, batch, samples)


def autoencoder_task(config, workdir: Path, main_process: bool) -> Task:
    """The KL autoencoder on both pictures of every pair (a batch of ``B`` pairs is ``2B`` images;
    ``training/autoencoder.py``), from ``config.new_model.vae`` (``model = "new"``) or a folder's ``vae/``."""
    import jax
    import numpy as np

    from ip2p_jax.pipeline import postprocess, to_pil
    from ip2p_jax.random_models import random_vae
    from ip2p_jax.training.autoencoder import AutoencoderSettings, autoencoder_step
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
        kl_weight=config.kl_weight,
        ema_max_decay=config.ema_decay,
        accumulation=config.accumulation,
        learning_rate=config.learning_rate,
    )
    reconstruct = jax.jit(lambda p, x: vae.apply({"params": p}, x))

    def batch(rows):
        return {"images": np.concatenate([rows["input_image"], rows["edited_image"]])}

    def samples(ema, rows):
        """Rows of (picture | reconstruction by the EMA params)."""
        pictures = rows["input_image"]
        grid = np.concatenate([postprocess(pictures), postprocess(reconstruct(ema, pictures))], axis=2)
        return to_pil(np.concatenate(list(grid), axis=0))

    return Task(params, tx, functools.partial(autoencoder_step, settings=settings), {}, batch, samples)


TASKS = {"ip2p": ip2p_task, "autoencoder": autoencoder_task}


def main(argv) -> None:
    del argv
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    from ip2p_jax import parallel
    from ip2p_jax.data import input_pipeline
    from ip2p_jax.training import checkpoint
    from ip2p_jax.training.state import create_train_state

    logging.set_verbosity(logging.WARNING)  # orbax logs every save phase at INFO
    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    if config is None:
        sys.exit("train.py: give --config configs/<name>.py")
    if config.task not in TASKS:
        sys.exit(f"train.py: unknown task {config.task!r} (one of {sorted(TASKS)})")
    parallel.maybe_initialize_distributed()
    main_process = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if config.global_batch_size % config.accumulation:
        sys.exit("train.py: global_batch_size must divide by accumulation")
    micro_batch = config.global_batch_size // config.accumulation
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

    manager = checkpoint.checkpoint_manager(workdir / "checkpoints", keep=config.keep_checkpoints)
    if _RESUME.value:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding
        )
        restored = checkpoint.restore_latest(manager, abstract)
        if restored is None:
            sys.exit(f"train.py: --resume but no checkpoint in {workdir / 'checkpoints'}")
        state, meta = restored
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
    total = config.steps * config.accumulation
    bar = tqdm(total=total, initial=start_step, desc=f"training ({config.task})", disable=not main_process)
    started, images = time.perf_counter(), 0
    stream = input_pipeline.batches_from_config(config, builder, micro_batch, start_step)
    sample_rows, loss = None, float("nan")
    for step in range(start_step, total):
        rows = next(stream)
        if sample_rows is None:
            sample_rows = {k: v[: config.sample_count] for k, v in rows.items()}
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
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_s=f"{(step + 1 - start_step) / elapsed:.2f}",
                            images_s=f"{images / elapsed:.1f}")  # fmt: skip
            if writer is not None:
                with writer.as_default(step=step + 1):
                    for name, value in metrics.items():
                        tf.summary.scalar(name, value)
        if config.sample_every and (step + 1) % config.sample_every == 0:
            ema = multihost_utils.process_allgather(state.ema_params, tiled=True)  # every process takes part
            if main_process:
                grid = task.samples(ema, sample_rows)
                path = workdir / "samples" / f"step_{step + 1:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                grid.save(path)
                with writer.as_default(step=step + 1):
                    tf.summary.image("samples", np.asarray(grid)[None], step=step + 1)
        bar.update(1)
        if (step + 1) % config.save_every == 0 or step + 1 == total:
            checkpoint.save(manager, state, {"data_position": step + 1, "config": config.to_dict()})
    manager.wait_until_finished()
    bar.close()
    if main_process:
        print(f"done: step {total}, last loss {loss:.6f}, checkpoints in {workdir / 'checkpoints'}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
