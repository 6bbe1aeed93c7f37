"""Checkpoints of a training run with orbax's ``CheckpointManager``.

Each checkpoint holds the train state (params, EMA, optimizer state, counters) and, as JSON, the data position
and the config. Saves are asynchronous where orbax supports it; orbax writes each step to a temporary directory
and renames it when complete, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ip2p_jax.training.state import TrainState


def checkpoint_manager(directory: str | os.PathLike, keep: int = 3, asynchronous: bool = True) -> ocp.CheckpointManager:
    """A manager keeping the last ``keep`` checkpoints under ``directory``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any], force: bool = False) -> bool:
    """Saves ``state`` and ``meta`` (JSON: data position, config) at ``state.step``."""
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return manager.save(step, args=args, force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
    """The latest checkpoint as ``(state, meta)``, laid out as ``abstract_state`` (shapes, dtypes, shardings), or
    ``None`` when there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    )
    return restored["state"], restored["meta"]


def restore_weights(directory: str | os.PathLike, step: int | None = None) -> tuple[dict, dict, int]:
    """``({"params": ..., "ema_params": ...}, meta, step)`` of checkpoint ``step`` (default: the latest) as arrays
    on this process's first device, without knowing the optimizer that wrote it, whatever mesh saved it (a pod's
    run exports on a workstation). Raises ``FileNotFoundError``."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {directory}")
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"), item_handlers=handlers)
    steps = manager.all_steps()
    if step is None and steps:
        step = max(steps)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint {step} in {directory} (there are {sorted(steps)})")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stored = manager.item_metadata(step)["state"]
    # The weights' saved shapes and dtypes on one local device, in place of the saving mesh's shardings; the
    # optimizer state and counters stay on disk (a partial restore).
    abstract = {
        name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), stored[name])
        for name in ("params", "ema_params")
    }
    state = ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=state, meta=ocp.args.JsonRestore()))
    return dict(restored["state"]), restored["meta"], step
