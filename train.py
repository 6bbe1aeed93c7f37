"""Training on a device mesh: InstructPix2Pix (``config.task = "ip2p"``), its autoencoder (``"autoencoder"``), a
CLIP (``"clip"``) or a text-to-image model (``"text_to_image"``).

    python train.py --config configs/tiny.py --workdir /tmp/run            # a minute on a CPU
    python train.py --config configs/ip2p_sd15.py --config.model=DIR --workdir RUN
    python train.py --config configs/shapes_vae.py --workdir RUN           # an autoencoder from scratch

Writes orbax checkpoints (``WORKDIR/checkpoints``) and TensorBoard events (``WORKDIR/tensorboard``); shows a
progress bar with loss, steps/s and images/s. Stops with a message naming the step if the loss is not finite.
Several processes (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) each read their share
of every batch; process 0 alone logs and writes. ``export.py`` turns a run into a diffusers folder. The tasks
themselves are ``ip2p_jax/training/tasks/`` (chosen by ``config.task``); this script is the loop they share.

Preemption, as TPU pods have it: a work folder that holds a checkpoint is continued from its latest one, so the same
command relaunched carries on (``--resume`` insists on a checkpoint, ``--noresume`` refuses to run over one). On
SIGTERM every process saves a checkpoint at the next step boundary, together, and exits with status 0.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

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


def check_batch(config, mesh) -> int:
    """The micro-batch (``data.global_batch_size / optim.accumulation``) after checking that it splits over the
    processes and the devices; a ``ValueError`` naming the setting otherwise."""
    import jax

    if config.data.global_batch_size % config.optim.accumulation:
        raise ValueError("data.global_batch_size must divide by optim.accumulation")
    micro_batch = config.data.global_batch_size // config.optim.accumulation
    if micro_batch % jax.process_count():
        raise ValueError(f"the batch of {micro_batch} does not split over {jax.process_count()} processes")
    if micro_batch % mesh.size:
        raise ValueError(f"the batch of {micro_batch} does not split over {mesh.size} devices")
    return micro_batch


def initial_state(task, mesh, manager, directory: Path, main_process: bool):
    """``(state, its shardings)``: the task's params in a fresh train state, or the latest checkpoint in
    ``manager`` (saving to ``directory``) restored into the same shardings. ``--resume`` / ``--noresume`` that the
    folder contradicts is a ``ValueError``."""
    import jax

    from ip2p_jax import parallel
    from ip2p_jax.training import checkpoint
    from ip2p_jax.training.state import create_train_state

    create = functools.partial(create_train_state, tx=task.tx)
    abstract_state = jax.eval_shape(create, task.params)
    state_sharding = parallel.state_shardings(mesh, abstract_state)
    latest = manager.latest_step()
    if latest is None and _RESUME.value:
        raise ValueError(f"--resume but no checkpoint in {directory}")
    if latest is not None and _RESUME.value is False:
        raise ValueError(f"--noresume but {directory} holds step {latest}; choose another --workdir")
    if latest is None:
        return jax.jit(create, out_shardings=state_sharding)(task.params), state_sharding
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding
    )
    state, meta = checkpoint.restore_latest(manager, abstract)
    if main_process:
        print(f"resumed at step {int(state.step)} (data position {meta['data_position']})", file=sys.stderr)
    return state, state_sharding


def sample_and_evaluate(task, state, sample_rows, reporter, step: int) -> None:
    """The task's sample grid and held-out measurements of the EMA params (gathered on every process, used by
    process 0)."""
    from jax.experimental import multihost_utils

    ema = multihost_utils.process_allgather(state.ema_params, tiled=True)  # every process takes part
    if reporter.main_process and task.samples is not None:
        reporter.samples(step, task.samples(ema, sample_rows))
    if reporter.main_process and task.evaluate is not None:
        reporter.measured(step, task.evaluate(ema))


def sharded_step(task, mesh, state_sharding):
    """``(step, batch sharding, frozen)``: the task's step jitted over the mesh (the state sharded as
    ``state_sharding`` and donated, the batch split over ``data``, the key and the frozen inputs replicated), and the
    frozen inputs placed on every device."""
    import jax

    from ip2p_jax import parallel

    replicated, batch_sharding = parallel.replicated(mesh), parallel.train_batch_sharding(mesh)
    step = jax.jit(
        task.step,
        in_shardings=(state_sharding, batch_sharding, replicated, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    return step, batch_sharding, jax.device_put(task.frozen, replicated)


def train(config, workdir: Path, task, builder, mesh, micro_batch: int, main_process: bool) -> None:
    """The loop: restore or start, then step, log, sample, evaluate and checkpoint until ``config.steps`` (times
    the accumulation) micro-steps, a non-finite loss (exit with the step named) or a preemption notice (a
    checkpoint, then a clean return)."""
    import jax
    import numpy as np

    from ip2p_jax.data import input_pipeline
    from ip2p_jax.training import checkpoint
    from ip2p_jax.training.preemption import PreemptionWatch
    from ip2p_jax.training.reporting import Reporter

    manager = checkpoint.checkpoint_manager(workdir / "checkpoints", keep=config.checkpoint.keep)
    try:
        state, state_sharding = initial_state(task, mesh, manager, workdir / "checkpoints", main_process)
    except ValueError as error:
        sys.exit(f"train.py: {error}")
    key, start_step = jax.random.key(config.seed), int(jax.device_get(state.step))
    total = config.steps * config.optim.accumulation
    if start_step >= total:
        if main_process:
            print(
                f"nothing to train: {workdir / 'checkpoints'} already holds step {start_step} of this config's "
                f"{total}; to train on, raise the step count (--config.steps=N with N > {config.steps}), or choose "
                "another --workdir to start afresh",
                file=sys.stderr,
            )
        return
    step_fn, batch_sharding, frozen = sharded_step(task, mesh, state_sharding)
    preemption = PreemptionWatch()  # before the progress bar: a notice from then on is caught
    reporter = Reporter(config, workdir, start_step, main_process)
    started = time.perf_counter()
    stream = input_pipeline.batches_from_config(config, builder, micro_batch, start_step)
    sample_rows, loss = None, float("nan")
    for step in range(start_step + 1, total + 1):  # the step number once this one is done
        rows = next(stream)
        if sample_rows is None:
            sample_rows = {k: v[: config.sample.count] for k, v in rows.items()}
        arrays = {k: np.asarray(v) for k, v in task.batch(rows).items()}
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in arrays.items()}
        state, metrics = step_fn(state, batch, key, frozen)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            manager.wait_until_finished()
            sys.exit(f"train.py: the loss is {loss} at step {step}; stopping (last checkpoint kept)")
        if step % config.log_every == 0 or step == total:
            rate = (step - start_step) / (time.perf_counter() - started)
            reporter.metrics(step, {k: float(v) for k, v in jax.device_get(metrics).items()}, rate, micro_batch)
        if config.sample.every and step % config.sample.every == 0:
            sample_and_evaluate(task, state, sample_rows, reporter, step)
        reporter.bar.update(1)
        preempted = preemption.reached(step)
        if preempted or step % config.checkpoint.every == 0 or step == total:
            checkpoint.save(manager, state, {"data_position": step, "config": config.to_dict()}, force=preempted)
        if preempted:
            manager.wait_until_finished()
            reporter.bar.close()
            if main_process:
                print(f"preempted: saved step {step} of {total}; the same command continues", file=sys.stderr)
            return
    preemption.close()
    manager.wait_until_finished()
    reporter.bar.close()
    if main_process:
        print(f"done: step {total}, last loss {loss:.6f}, checkpoints in {workdir / 'checkpoints'}", file=sys.stderr)


def main(argv) -> None:
    del argv
    import jax

    from ip2p_jax import parallel
    from ip2p_jax.data import input_pipeline
    from ip2p_jax.training.tasks import build_task

    logging.set_verbosity(logging.WARNING)  # orbax logs every save phase at INFO
    compilation_cache.enable(_COMPILATION_CACHE.value)
    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    if config is None:
        sys.exit("train.py: give --config configs/<name>.py")
    try:
        parallel.maybe_initialize_distributed()
        main_process = jax.process_index() == 0
        workdir.mkdir(parents=True, exist_ok=True)
        mesh = parallel.train_mesh(fsdp=config.fsdp)
        micro_batch = check_batch(config, mesh)
        builder = input_pipeline.builder_from_config(config, main_process)
        task = build_task(config, workdir, main_process)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        sys.exit(f"train.py: {error}")
    train(config, workdir, task, builder, mesh, micro_batch, main_process)


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
