"""What process 0 of a training run shows and writes: the progress bar, TensorBoard scalars and images, the sample
grids in ``WORKDIR/samples`` and the evaluators' lines (``train.py``'s loop reports to it)."""

from __future__ import annotations

import sys
from pathlib import Path


class Reporter:
    """Process 0's outputs: the progress bar, TensorBoard scalars and images, sample grids in ``WORKDIR/samples``
    and the evaluators' lines. Other processes make none of them."""

    def __init__(self, config, workdir: Path, start_step: int, main_process: bool):
        """A bar from ``start_step`` to the run's last micro-step; TensorBoard events in ``WORKDIR/tensorboard``."""
        from tqdm import tqdm

        self.main_process, self.workdir = main_process, workdir
        self.writer = None
        if main_process:
            import tensorflow as tf

            self.writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))
        total = config.steps * config.optim.accumulation
        self.bar = tqdm(total=total, initial=start_step, desc=f"training ({config.task})", disable=not main_process)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is not None:
            import tensorflow as tf

            with self.writer.as_default(step=step):
                for name, value in values.items():
                    tf.summary.scalar(prefix + name, value)

    def metrics(self, step: int, values: dict[str, float], steps_per_second: float, micro_batch: int) -> None:
        """The step's metrics: the loss and the rates on the bar, every value in TensorBoard."""
        self.bar.set_postfix(
            loss=f"{values['loss']:.4f}",
            steps_s=f"{steps_per_second:.2f}",
            images_s=f"{steps_per_second * micro_batch:.1f}",
        )
        self.scalars(step, values)

    def samples(self, step: int, grid) -> None:
        import numpy as np
        import tensorflow as tf

        path = self.workdir / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        with self.writer.as_default(step=step):
            tf.summary.image("samples", np.asarray(grid)[None], step=step)

    def measured(self, step: int, values: dict[str, float]) -> None:
        self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()), file=sys.stderr)
        self.scalars(step, values, prefix="eval/")
