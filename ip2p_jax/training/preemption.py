"""The preemption notice (SIGTERM, as TPU pods and most schedulers send it) turned into a step at which every
process saves a checkpoint and stops together.

With several processes (``jax.distributed`` initialised) JAX's coordination service catches the signal on whichever
host receives it and agrees with the others on a common step (``multihost_utils.reached_preemption_sync_point``,
which every process must call at every step). A single process has no service to ask: a Python handler notes the
signal, and the next step boundary is the one.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """``reached(step)`` is true at the step boundary where this run should save and exit; call it at every step,
    on every process, with the number of steps done."""

    def __init__(self) -> None:
        self._distributed = jax.distributed.is_initialized()
        self._noticed = False
        if not self._distributed:
            # JAX's own SIGTERM handler belongs to the coordination service; installing ours would replace it.
            signal.signal(signal.SIGTERM, self._notice)

    def _notice(self, signum, frame) -> None:
        del signum, frame
        self._noticed = True

    def reached(self, step: int) -> bool:
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._noticed

    def close(self) -> None:
        """Gives SIGTERM back its default action (the run is over; a notice now should end the process)."""
        if not self._distributed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
