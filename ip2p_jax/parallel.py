"""Device meshes and multi-host start-up.

Batch work is SPMD over a mesh with a ``data`` axis (and, for training, an optional ``fsdp`` axis). Editing is
embarrassingly parallel: every device runs the whole sampler on its share of the images, params replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """A one-axis ``("data",)`` mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def padded_size(batch: int, mesh: Mesh) -> int:
    """The smallest multiple of the ``data`` axis size that holds ``batch`` items."""
    shards = mesh.shape[DATA]
    return -(-batch // shards) * shards


def pad_batch(x, size: int):
    """Pads the leading axis of a numpy or jax array to ``size`` by repeating the last item (results for the
    copies are dropped)."""
    if x.shape[0] == size:
        return x
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[-1:], size - x.shape[0], axis=0)], axis=0)
