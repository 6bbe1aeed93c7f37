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


def restore_unet_weights(directory: str | os.PathLike, step: int | None = None) -> tuple[dict, dict, int]:
    """``({"params": ..., "ema_params": ...}, meta, step)`` of checkpoint ``step`` (default: the latest) as NumPy
    arrays on the host, without knowing the optimizer that wrote it. Raises ``FileNotFoundError``."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {directory}")
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"))
    steps = manager.all_steps()
    if step is None and steps:
        step = max(steps)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint {step} in {directory} (there are {sorted(steps)})")
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    state = {name: jax.device_get(restored["state"][name]) for name in ("params", "ema_params")}
    return state, restored["meta"], step
