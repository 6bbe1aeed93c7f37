"""Training InstructPix2Pix on a device mesh.

    python train.py --config configs/tiny.py --workdir /tmp/run            # a minute on a CPU
    python train.py --config configs/tiny.py --workdir /tmp/run --resume   # continue from the last checkpoint
    python train.py --config configs/ip2p_sd15.py --config.model=DIR --workdir RUN

Writes orbax checkpoints (``WORKDIR/checkpoints``) and TensorBoard events (``WORKDIR/tensorboard``); shows a
progress bar with loss, steps/s and images/s. Stops with a message naming the step if the loss is not finite.
Several processes (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) each read their share
of every batch; process 0 alone logs and writes.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs go", required=True)
_RESUME = flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --workdir")


def model_source(config, workdir: Path, main_process: bool) -> str:
    """The diffusers folder or hub id training starts from; ``tiny`` is a random model process 0 writes to
    ``WORKDIR/tiny-model`` (the same on every run with the same seed)."""
    if config.model != "tiny":
        return config.model
    from jax.experimental import multihost_utils

    from ip2p_jax.training.tiny import write_tiny_model

    folder = workdir / "tiny-model"
    if main_process and not (folder / "model_index.json").is_file():
        write_tiny_model(folder, config.seed)
    multihost_utils.sync_global_devices("tiny model written")
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


def write_sample_edits(path: Path, pipeline, ema_params, batch, steps: int):
    """Edits of ``batch``'s input images by its instructions with the EMA UNet; a grid of rows
    (input | target | edit) written to ``path``. Returns the grid as a PIL image."""
    import numpy as np

    from ip2p_jax.pipeline import to_pil

    pipeline.params = {**pipeline.params, "unet": ema_params}
    inputs = ((batch["input_image"] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    targets = ((batch["edited_image"] + 1) / 2).clip(0, 1)
    edits = pipeline(list(inputs), list(batch["instruction"]), num_inference_steps=steps, output_type="np",
                     progress=False).images  # fmt: skip
    rows = [np.concatenate([i / 255.0, t, e], axis=1) for i, t, e in zip(inputs, targets, edits, strict=True)]
    grid = to_pil(np.concatenate(rows, axis=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def data_builder(config, main_process: bool):
    """The prepared TFDS builder of ``config.data``; process 0 builds it from ``config.manual_dir`` if needed while
    the others wait."""
    from jax.experimental import multihost_utils

    from ip2p_jax.data.input_pipeline import prepared_builder

    data_dir, manual_dir = config.data_dir or None, config.manual_dir or None
    builder = prepared_builder(config.data, data_dir, manual_dir, prepare=main_process)
    multihost_utils.sync_global_devices("data set prepared")
    return builder if main_process else prepared_builder(config.data, data_dir, manual_dir, prepare=False)


def local_batches(config, builder, micro_batch: int, position: int):
    """This process's rows of each global batch from data position ``position`` on (numpy dicts with
    ``input_image``, ``edited_image``, ``instruction``)."""
    import jax

    from ip2p_jax.data.input_pipeline import Augmentation, tfds_batches
    from ip2p_jax.data.synthetic import process_rows, synthetic_batch

    index, count = jax.process_index(), jax.process_count()
    if builder is None:
        for step in itertools.count(position):
            yield process_rows(synthetic_batch(config.seed, step, micro_batch, config.resolution), index, count)
    augmentation = Augmentation(config.resize_min, config.resize_max, config.resolution, config.flip_prob)
    yield from tfds_batches(
        builder,
        config.split,
        batch_size=micro_batch // count,
        seed=config.seed,
        augmentation=augmentation,
        position=position,
        process_index=index,
        process_count=count,
        shuffle_buffer=config.shuffle_buffer,
    )


def main(argv) -> None:
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    from ip2p_jax import parallel
    from ip2p_jax.data import input_pipeline
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import Scheduler, SchedulerConfig
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.training import checkpoint
    from ip2p_jax.training.state import create_train_state, make_optimizer
    from ip2p_jax.training.step import StepSettings, train_step
    from ip2p_jax.weights import load_noise_schedule

    logging.set_verbosity(logging.WARNING)  # orbax logs every save phase at INFO
    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    if config is None:
        sys.exit("train.py: give --config configs/<name>.py")
    parallel.maybe_initialize_distributed()
    main_process = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if config.global_batch_size % config.accumulation:
        sys.exit("train.py: global_batch_size must divide by accumulation")
    micro_batch = config.global_batch_size // config.accumulation
    if micro_batch % jax.process_count():
        sys.exit(f"train.py: the batch of {micro_batch} does not split over {jax.process_count()} processes")
    builder = None
    if config.data != input_pipeline.SYNTHETIC:
        try:
            builder = data_builder(config, main_process)
        except (ValueError, FileNotFoundError) as error:
            sys.exit(f"train.py: {error}")

    model = model_source(config, workdir, main_process)
    unet, params, vae, vae_params, text, text_params, tokenizer = checkpoint_models(config, model)
    mesh = parallel.train_mesh(fsdp=config.fsdp)
    if micro_batch % mesh.size:
        sys.exit(f"train.py: the batch of {micro_batch} does not split over {mesh.size} devices")

    tx = make_optimizer(
        config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        accumulation=config.accumulation,
    )
    try:
        betas = load_noise_schedule(model)
    except (ValueError, OSError) as error:
        sys.exit(f"train.py: {error}")
    scheduler_config = SchedulerConfig(**betas)
    settings = StepSettings(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tx=tx,
        alphas_cumprod=tuple(scheduler_config.alphas_cumprod().tolist()),
        dropout=config.conditioning_dropout,
        ema_max_decay=config.ema_decay,
        accumulation=config.accumulation,
        learning_rate=config.learning_rate,
    )
    replicated = parallel.replicated(mesh)
    abstract_state = jax.eval_shape(functools.partial(create_train_state, tx=tx), params)
    state_sharding = parallel.state_shardings(mesh, abstract_state)
    state = jax.jit(functools.partial(create_train_state, tx=tx), out_shardings=state_sharding)(params)
    null_ids = jnp.asarray(tokenize(tokenizer, [""]))
    frozen = {"vae": vae_params, "text_encoder": text_params}
    frozen["null_context"] = text.apply({"params": text_params}, null_ids)
    frozen = jax.device_put(frozen, replicated)

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
        functools.partial(train_step, settings=settings),
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
    bar = tqdm(total=total, initial=start_step, desc="training", disable=not main_process)
    started, images = time.perf_counter(), 0
    stream = local_batches(config, builder, micro_batch, start_step)
    sample_batch, loss = None, float("nan")

    @functools.cache
    def sampler():
        """The editing pipeline for sample edits (built on first use; the UNet params come with each call)."""
        scheduler = Scheduler("euler_ancestral", SchedulerConfig(**betas, steps_offset=1))
        params = {"unet": None, "vae": vae_params, "text_encoder": text_params}
        mesh = parallel.data_mesh(jax.local_devices())
        return InstructPix2PixPipeline(unet, vae, text, tokenizer, scheduler, params, mesh)

    for step in range(start_step, total):
        local = next(stream)
        if sample_batch is None:
            sample_batch = {k: v[: config.sample_count] for k, v in local.items()}
        local["input_ids"] = tokenize(tokenizer, list(local.pop("instruction")))
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
                grid = write_sample_edits(workdir / "samples" / f"step_{step + 1:07d}.png", sampler(), ema,
                                          sample_batch, config.sample_steps)  # fmt: skip
                with writer.as_default(step=step + 1):
                    tf.summary.image("sample_edits", np.asarray(grid)[None], step=step + 1)
        bar.update(1)
        if (step + 1) % config.save_every == 0 or step + 1 == total:
            checkpoint.save(manager, state, {"data_position": step + 1, "config": config.to_dict()})
    manager.wait_until_finished()
    bar.close()
    if main_process:
        print(f"done: step {total}, last loss {loss:.6f}, checkpoints in {workdir / 'checkpoints'}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
