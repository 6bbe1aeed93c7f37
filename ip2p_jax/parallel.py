"""Device meshes and multi-host start-up.

Batch work is SPMD over a mesh with a ``data`` axis (and, for training, an optional ``fsdp`` axis). Editing is
embarrassingly parallel: every device runs the whole sampler on its share of the images, params replicated.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
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


FSDP = "fsdp"


def train_mesh(data: int | None = None, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh: the batch splits over both axes, params and optimizer state over ``fsdp``.
    ``data`` defaults to every device not used by ``fsdp``."""
    devices = jax.devices() if devices is None else devices
    data = len(devices) // fsdp if data is None else data
    if data * fsdp != len(devices):
        raise ValueError(f"a {data} x {fsdp} mesh needs {data * fsdp} devices, there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA, FSDP))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Shards an array's largest axis that divides by ``fsdp`` over the ``fsdp`` axis; small or indivisible
    arrays (norms, biases, scalars) stay replicated."""
    if fsdp == 1 or not shape:
        return PartitionSpec()
    candidates = [axis for axis in np.argsort(shape)[::-1] if shape[axis] % fsdp == 0 and shape[axis] >= fsdp]
    if not candidates or int(np.prod(shape)) < 1024:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[int(candidates[0])] = FSDP
    return PartitionSpec(*spec)


def state_shardings(mesh: Mesh, abstract_tree):
    """``NamedSharding`` for every array of a (params / optimizer) pytree under ``fsdp_spec``."""
    fsdp = mesh.shape.get(FSDP, 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_tree)


def train_batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch's leading axis over every device of a train mesh."""
    axes = tuple(name for name in (DATA, FSDP) if name in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes))


def maybe_initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when the launcher asked for several processes (``JAX_COORDINATOR_ADDRESS``
    / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or a cluster JAX detects itself, such as a TPU pod slice);
    returns whether it did."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        # The first collective sets up the processes' communication (gloo on CPU), which gives up if a process
        # is late by half a minute: do it now, while they start together, not after one has done long work alone.
        multihost_utils.sync_global_devices("processes started")
        return True
    return False
