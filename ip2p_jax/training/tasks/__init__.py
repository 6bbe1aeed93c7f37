"""Training tasks: what one kind of training brings to ``train.py``'s loop, one module each, chosen by name
(``config.task``). Each module has ``build(config, workdir, main_process) -> Task``.

To add a task: a module here whose ``build`` returns a ``Task`` (a pure step, its trainable params, optimizer and
frozen inputs, and how data rows become the step's arrays), its name in ``TASKS``, and a config in ``configs/``
that starts from ``training_config("<name>")``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

TASKS = ("ip2p", "autoencoder", "clip", "text_to_image")


@dataclasses.dataclass
class Task:
    """What one kind of training brings to the shared loop.

    Attributes:
      params: the trainable params at the start (float32).
      tx: the optimizer.
      step: ``(state, batch, key, frozen) -> (state, metrics)``, pure (jitted and sharded by the loop).
      frozen: what the step reads but does not train (replicated).
      batch: this host's data rows (``input_image``, ``edited_image``, ``instruction``; or ``image``, ``caption``
        and the grounded words of the captioned-scene stream) -> the step's arrays.
      samples: ``(EMA params on the host, data rows) -> PIL grid`` for ``sample.every``, or ``None``.
      evaluate: ``EMA params on the host -> {name: value}`` for ``sample.every`` (held-out measurements, logged
        and printed; ``training/evaluators.py``), or ``None``.
    """

    params: Any
    tx: Any
    step: Callable
    frozen: Any
    batch: Callable[[dict], dict]
    samples: Callable[[Any, dict], Any] | None
    evaluate: Callable[[Any], dict[str, float]] | None = None


def build_task(config, workdir: Path, main_process: bool) -> Task:
    """The task ``config.task`` names, built from the config. An unknown name is a ``ValueError`` that lists the
    known ones."""
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r} (one of {', '.join(TASKS)})")
    return importlib.import_module(f"{__name__}.{config.task}").build(config, workdir, main_process)
