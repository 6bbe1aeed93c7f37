"""A synthetic editing stream for smoke runs and tests: colour edits of random smooth images.

Batch ``i`` is a pure function of ``(seed, i)``, so a run resumed at data position ``i`` sees exactly the batches
it would have seen, and each process of a multi-host run takes its own rows of the global batch.
"""

from __future__ import annotations

import numpy as np

EDITS = {
    "make it red": np.array([0.6, -0.3, -0.3]),
    "make it blue": np.array([-0.3, -0.3, 0.6]),
    "make it green": np.array([-0.3, 0.6, -0.3]),
}


def synthetic_batch(seed: int, position: int, batch_size: int, size: int) -> dict[str, np.ndarray]:
    """The global batch at ``position``: ``input_image`` / ``edited_image`` ``(B, size, size, 3)`` float32 in
    [-1, 1] and ``instruction`` (B,) strings; the edited image is the input shifted towards the named colour."""
    rng = np.random.default_rng([seed, position])
    coarse = rng.uniform(-0.8, 0.8, (batch_size, 4, 4, 3))
    images = np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2)
    names = list(EDITS)
    choice = rng.integers(0, len(names), batch_size)
    shifts = np.stack([EDITS[names[c]] for c in choice])[:, None, None, :]
    edited = np.clip(images + shifts, -1.0, 1.0)
    return {
        "input_image": images.astype(np.float32),
        "edited_image": edited.astype(np.float32),
        "instruction": np.array([names[c] for c in choice]),
    }


def process_rows(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This process's contiguous share of a global batch."""
    size = len(next(iter(batch.values())))
    if size % process_count:
        raise ValueError(f"global batch {size} does not split over {process_count} processes")
    rows = size // process_count
    return {k: v[process_index * rows : (process_index + 1) * rows] for k, v in batch.items()}
