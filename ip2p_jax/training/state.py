"""The train state, the optimizer and the EMA of InstructPix2Pix training (the reference recipe)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """Everything a training step changes (and a checkpoint saves).

    Attributes:
      step: micro-steps taken (one per batch; an optimizer step every ``accumulation`` of them).
      params: the UNet's float32 params.
      ema_params: their exponential moving average (what is exported).
      opt_state: the optax state (AdamW moments, accumulated gradients).
      ema_updates: how many times the EMA was updated (optimizer steps), for its warm-up decay.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    ema_updates: jax.Array


def make_optimizer(
    learning_rate: float,
    *,
    weight_decay: float = 1e-2,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    accumulation: int = 1,
) -> optax.GradientTransformation:
    """AdamW at a constant rate after clipping the global gradient norm, accumulated over ``accumulation`` batches
    (diffusers' ``train_instruct_pix2pix.py`` defaults)."""
    chain = []
    if max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    chain.append(optax.adamw(learning_rate, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*chain)
    return optax.MultiSteps(tx, every_k_schedule=accumulation) if accumulation > 1 else tx


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state: the EMA starts at the params."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        ema_updates=jnp.zeros((), jnp.int32),
    )


def ema_decay(updates_done: jax.Array, max_decay: float = 0.9999) -> jax.Array:
    """``min(max_decay, (1 + n) / (10 + n))`` for the ``n``-th update (from 0), as diffusers' ``EMAModel``."""
    n = updates_done.astype(jnp.float32)
    return jnp.minimum(max_decay, (1 + n) / (10 + n))


def update_ema(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """``ema <- ema - (1 - decay) * (ema - params)``."""
    return jax.tree.map(lambda e, p: e - (1 - decay) * (e - p), ema_params, params)


def apply_gradients(
    state: TrainState, grads: Any, tx: optax.GradientTransformation, *, accumulation: int, ema_max_decay: float
) -> tuple[TrainState, Any]:
    """The optimizer update, and the EMA update once per optimizer step (every ``accumulation`` micro-steps).

    Returns:
      ``(new_state, updates)``.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    optimizer_stepped = (state.step + 1) % accumulation == 0
    # Between optimizer steps the decay is 1, which leaves the EMA as it is (one elementwise pass over it, no
    # second copy of the weights for a select).
    decay = jnp.where(optimizer_stepped, ema_decay(state.ema_updates, ema_max_decay), 1.0)
    ema = update_ema(state.ema_params, params, decay)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema,
        opt_state=opt_state,
        ema_updates=state.ema_updates + optimizer_stepped.astype(jnp.int32),
    )
    return new_state, updates


def norm_metrics(grads: Any, params: Any, updates: Any, learning_rate: float) -> dict[str, jax.Array]:
    """``grad_norm``, ``param_norm``, ``update_norm`` (global L2 norms) and ``learning_rate``, float32."""
    return {
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
        "learning_rate": jnp.float32(learning_rate),
    }
