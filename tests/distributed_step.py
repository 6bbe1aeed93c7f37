"""One training step of the tiny model over every device of every process (run by ``test_training.py``).

    python tests/distributed_step.py OUT_PREFIX 8x1,4x2      # a (data, fsdp) mesh each; OUT_PREFIX-8x1.npz, ...

With ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` set, each process joins through
``jax.distributed`` and feeds only its own rows of the global batch, as ``train.py`` does. The step uses plain SGD:
AdamW's first update, ``lr * g / (|g| + eps)``, turns float32 reordering noise in a near-zero gradient component
into a change of up to ``lr``, while SGD keeps the comparison about the gradients. Process 0 writes the loss and
every parameter of each mesh's step to ``OUT_PREFIX-DATAxFSDP.npz``.
"""

import functools
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from ip2p_jax import parallel
from ip2p_jax.data.synthetic import process_rows, synthetic_batch
from ip2p_jax.random_models import smoke_models
from ip2p_jax.schedulers import SchedulerConfig
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.training.state import create_train_state
from ip2p_jax.training.step import StepSettings, train_step


def main(prefix: str, meshes: list[tuple[int, int]]) -> None:
    parallel.maybe_initialize_distributed()
    unet, params, vae, vae_params, text, text_params, tokenizer = smoke_models(Path(tempfile.mkdtemp()), 0)
    tx = optax.sgd(1e-3)
    alphas = SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod()
    settings = StepSettings(unet=unet, vae=vae, text_encoder=text, tx=tx, alphas_cumprod=tuple(alphas.tolist()))
    null = text.apply({"params": text_params}, jnp.asarray(tokenize(tokenizer, [""])))
    rows = process_rows(synthetic_batch(0, 0, 8, 32), jax.process_index(), jax.process_count())
    rows["input_ids"] = tokenize(tokenizer, list(rows.pop("instruction")))

    for data, fsdp in meshes:
        mesh = parallel.train_mesh(data, fsdp)
        create = functools.partial(create_train_state, tx=tx)
        shardings = parallel.state_shardings(mesh, jax.eval_shape(create, params))
        state = jax.jit(create, out_shardings=shardings)(params)
        batch_sharding, replicated = parallel.train_batch_sharding(mesh), parallel.replicated(mesh)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in rows.items()}
        frozen = jax.device_put({"vae": vae_params, "text_encoder": text_params, "null_context": null}, replicated)
        step = jax.jit(
            functools.partial(train_step, settings=settings),
            in_shardings=(shardings, batch_sharding, replicated, replicated),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )
        state, metrics = step(state, batch, jax.random.key(0), frozen)
        gathered = multihost_utils.process_allgather(state.params, tiled=True)
        if jax.process_index() == 0:
            leaves = {f"p{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(gathered))}
            sharded = sum("fsdp" in str(s.spec) for s in jax.tree.leaves(shardings))
            np.savez(f"{prefix}-{data}x{fsdp}.npz", loss=float(metrics["loss"]), sharded=sharded, **leaves)


if __name__ == "__main__":
    main(sys.argv[1], [tuple(int(n) for n in mesh.split("x")) for mesh in sys.argv[2].split(",")])
