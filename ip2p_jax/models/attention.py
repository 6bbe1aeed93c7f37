"""Attention as plain functions, and the attention-control interface.

Cross-attention is written out as visible steps (project, score, softmax, combine) so that a researcher can
replace the softmax step without touching the UNet. The replacement is an *attention control*: an explicit
argument of the UNet call, a pytree (``flax.struct.PyTreeNode``) whose array fields are traced and whose
``pytree_node=False`` fields are static settings. Every cross-attention layer hands its scaled scores and a
``LayerInfo`` (its name, place and spatial size) to ``control.cross_attention`` and uses the probabilities it
returns. Whatever auxiliary value the control returns for a layer comes back from the UNet call under the
layer's name:

    eps, aux = unet.apply({"params": params}, x, t, context, control=RecordCrossAttention(sizes=((16, 16),)))
    aux["down_blocks.1.attentions.0.transformer_blocks.0.attn2"]  # (B, 16, 16, T) head-averaged maps

Self-attention takes the fused path: the attention kernel of the platform (``attention_kernels.py``: splash on
TPU, cuDNN on GPU, a tiled loop of plain matmuls on CPU), or the one the UNet's ``attention_backend`` forces. A
control may opt in to self-attention layer by layer (``controls_self_attention``); it then receives the layer's
queries, keys and values (``self_attention``), e.g. to share one image's self-attention with another
(Prompt-to-Prompt). Layers no control asks for keep the fused path.

Cross-attention stays in the explicit form in every layer, with or without a control. Its 77 keys keep the scores
small (4,096 x 77 per head at 512 px, 1.9 % of self-attention's 4,096 x 4,096), and one form everywhere keeps a
control that changes nothing bitwise equal to the plain model, which the tests of every control rely on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from ip2p_jax.models.attention_kernels import dot_product_attention


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Where a cross-attention layer sits in the UNet. Static (hashable) metadata, known at trace time.

    Attributes:
      name: the diffusers module path, e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
      block: ``"down"``, ``"mid"`` or ``"up"``.
      block_index: index of the block within its kind (0 for the mid block).
      level: resolution level, 0 at the latent's size, +1 per downsampling.
      size: the layer's spatial size ``(height, width)`` in latent positions.
      num_heads: number of attention heads.
    """

    name: str
    block: str
    block_index: int
    level: int
    size: tuple[int, int]
    num_heads: int


class AttentionControl(struct.PyTreeNode):
    """Base attention control: the plain model (softmax, nothing recorded).

    Subclass it (subclasses are frozen dataclasses and pytrees) and override ``cross_attention``. Array fields
    are traced and may change between calls without recompiling; mark settings that select layers or change
    shapes ``struct.field(pytree_node=False)``.
    """

    def cross_attention(self, scores_bnqk: jax.Array, layer: LayerInfo) -> tuple[jax.Array, Any]:
        """Turns one layer's scores into probabilities.

        Args:
          scores_bnqk: float32 ``(B, heads, Q, K)``, ``q k^T / sqrt(head_dim)``; queries ``Q = h * w`` in
            row-major order of the layer's ``(h, w)`` grid, keys ``K`` the text tokens.
          layer: where the layer sits.

        Returns:
          ``(probs_bnqk, aux)``: the probabilities to combine with the values (same shape as the scores), and
          an auxiliary pytree returned from the UNet under ``layer.name``, or ``None`` to return nothing.
        """
        del layer
        return jax.nn.softmax(scores_bnqk, axis=-1), None

    def attend(self, scores_bnqk: jax.Array, v_bknd: jax.Array, layer: LayerInfo) -> tuple[jax.Array, Any]:
        """One layer's attention output: ``cross_attention``'s probabilities times the layer's values.

        Override this instead of ``cross_attention`` when the output is not one probability matrix times the
        branch's own values (FoI mixes the values of two guidance branches).

        Args:
          scores_bnqk: as in ``cross_attention``.
          v_bknd: ``(B, K, heads, d)`` values of the text tokens.
          layer: where the layer sits.

        Returns:
          ``(out_bqc, aux)``: ``(B, Q, heads * d)`` and the auxiliary pytree.
        """
        probs, aux = self.cross_attention(scores_bnqk, layer)
        return combine_values(probs, v_bknd), aux

    def controls_self_attention(self, layer: LayerInfo) -> bool:
        """Whether ``self_attention`` computes this self-attention layer (an opt-in; the default is no layer).

        Decided at trace time from static settings; layers answered ``False`` take the fused path untouched.

        Args:
          layer: the self-attention layer's place (its name ends in ``attn1``; ``size`` is its spatial size).
        """
        del layer
        return False

    def self_attention(
        self, q_bqnd: jax.Array, k_bknd: jax.Array, v_bknd: jax.Array, layer: LayerInfo
    ) -> tuple[jax.Array, Any]:
        """One opted-in self-attention layer's output, before its output projection.

        The default is the plain attention through ``dot_product_attention`` (the fused path). A control may
        exchange queries, keys or values between images of the batch and still call ``dot_product_attention``,
        or compute ``attention_scores`` / softmax / ``combine_values`` itself when it needs the probabilities.

        Args:
          q_bqnd, k_bknd, v_bknd: ``(B, Q, heads, d)`` projections of the layer's ``Q = h * w`` positions
            (row-major over the layer's ``(h, w)`` grid); keys and values have the same positions.
          layer: where the layer sits.

        Returns:
          ``(out_bqc, aux)``: ``(B, Q, heads * d)`` and an auxiliary pytree returned from the UNet under
          ``layer.name``, or ``None``.
        """
        del layer
        out = dot_product_attention(q_bqnd, k_bknd, v_bknd)
        return out.reshape(out.shape[0], out.shape[1], -1), None


class RecordCrossAttention(AttentionControl):
    """Records head-averaged cross-attention probabilities of the layers of chosen spatial sizes.

    Attributes:
      sizes: the ``(height, width)`` sizes of the layers to record; empty records every layer.

    The UNet's aux then maps each recorded layer's name to float32 maps ``(B, h, w, T)``.
    """

    sizes: tuple[tuple[int, int], ...] = struct.field(pytree_node=False, default=())

    def cross_attention(self, scores_bnqk, layer):
        probs = jax.nn.softmax(scores_bnqk, axis=-1)
        if self.sizes and layer.size not in self.sizes:
            return probs, None
        height, width = layer.size
        maps = probs.mean(axis=1).reshape(probs.shape[0], height, width, probs.shape[-1])
        return probs, maps


def mean_of_layers(aux: dict[str, jax.Array]) -> jax.Array:
    """Averages recorded maps over layers: ``{name: (B, h, w, T)}`` of one size -> ``(B, h, w, T)``."""
    if not aux:
        raise ValueError("no recorded maps to average: did the control select any layer?")
    return jnp.mean(jnp.stack(list(aux.values())), axis=0)


def split_heads(x_btc: jax.Array, num_heads: int) -> jax.Array:
    """``(B, T, heads * d)`` -> ``(B, T, heads, d)``."""
    batch, length, channels = x_btc.shape
    return x_btc.reshape(batch, length, num_heads, channels // num_heads)


def attention_scores(q_bqnd: jax.Array, k_bknd: jax.Array) -> jax.Array:
    """Scaled scores ``q k^T / sqrt(d)`` in float32: ``(B, Q, heads, d), (B, K, heads, d) -> (B, heads, Q, K)``.

    The products accumulate in float32 whatever the compute dtype, which is what diffusers'
    ``upcast_attention`` asks for and keeps bfloat16 softmax inputs accurate.
    """
    scale = q_bqnd.shape[-1] ** -0.5
    scores = jnp.einsum("bqnd,bknd->bnqk", q_bqnd, k_bknd, preferred_element_type=jnp.float32)
    return scores * scale


def combine_values(probs_bnqk: jax.Array, v_bknd: jax.Array) -> jax.Array:
    """``probs @ v``: ``(B, heads, Q, K), (B, K, heads, d) -> (B, Q, heads * d)``."""
    out = jnp.einsum("bnqk,bknd->bqnd", probs_bnqk.astype(v_bknd.dtype), v_bknd)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _dense(features: int, use_bias: bool, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _self_projections(x_btc: jax.Array, num_heads: int, qkv_bias: bool, dtype: Any) -> list[jax.Array]:
    """``to_q``, ``to_k``, ``to_v`` of the calling module applied to ``x``, each split into heads."""
    channels = x_btc.shape[-1]
    return [split_heads(_dense(channels, qkv_bias, dtype, name)(x_btc), num_heads) for name in ("to_q", "to_k", "to_v")]


def fused_self_attention(
    x_btc: jax.Array, num_heads: int, qkv_bias: bool, dtype: Any, backend: str = "auto"
) -> jax.Array:
    """Multi-head self-attention ``(B, T, C) -> (B, T, C)`` through ``dot_product_attention`` by ``backend``.

    Call it inside a compact method: it creates ``to_q``, ``to_k``, ``to_v`` (with biases if ``qkv_bias``, as
    in the VAE) and ``to_out_0`` in the calling module, as diffusers' ``Attention`` names them.
    """
    q, k, v = _self_projections(x_btc, num_heads, qkv_bias, dtype)
    out = dot_product_attention(q, k, v, backend).reshape(x_btc.shape)
    return _dense(x_btc.shape[-1], True, dtype, "to_out_0")(out)


class SelfAttention(nn.Module):
    """The UNet's self-attention (``attn1``), no q/k/v biases: the fused path unless the control opts in.

    Attributes:
      num_heads: heads; the head size is ``C // num_heads``.
      layer: this layer's place, handed to the control (static); ``None`` never offers the layer to a control.
      attention_backend: the fused path's kernel (``attention_kernels.BACKENDS``).
    """

    num_heads: int
    layer: LayerInfo | None = None
    dtype: Any = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, x_btc: jax.Array, control: AttentionControl | None = None) -> tuple[jax.Array, Any]:
        """``(B, T, C)`` -> ``((B, T, C), aux or None)``."""
        if control is None or self.layer is None or not control.controls_self_attention(self.layer):
            return fused_self_attention(x_btc, self.num_heads, False, self.dtype, self.attention_backend), None
        q, k, v = _self_projections(x_btc, self.num_heads, False, self.dtype)
        out, aux = control.self_attention(q, k, v, self.layer)
        return _dense(x_btc.shape[-1], True, self.dtype, "to_out_0")(out), aux


class CrossAttention(nn.Module):
    """Multi-head cross-attention from image positions to text tokens, with the control hook.

    Attributes:
      num_heads: heads; the head size is ``C // num_heads`` where ``C`` is the query width.
      layer: this layer's place, handed to the control (static).
    """

    num_heads: int
    layer: LayerInfo
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x_bqc: jax.Array, context_bkd: jax.Array, control: AttentionControl | None
    ) -> tuple[jax.Array, Any]:
        """``(B, Q, C)`` queries, ``(B, K, D)`` context -> ``((B, Q, C), aux or None)``."""
        channels = x_bqc.shape[-1]
        q = split_heads(_dense(channels, False, self.dtype, "to_q")(x_bqc), self.num_heads)
        k = split_heads(_dense(channels, False, self.dtype, "to_k")(context_bkd), self.num_heads)
        v = split_heads(_dense(channels, False, self.dtype, "to_v")(context_bkd), self.num_heads)
        scores = attention_scores(q, k)
        if control is None:
            out, aux = combine_values(jax.nn.softmax(scores, axis=-1), v), None
        else:
            out, aux = control.attend(scores, v, self.layer)
        return _dense(channels, True, self.dtype, "to_out_0")(out), aux
