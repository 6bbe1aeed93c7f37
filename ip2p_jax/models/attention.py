"""Attention as plain functions, and the attention-control protocol.

Attention is written out as visible steps (project, score, softmax, combine) so that a researcher can change a
step without touching the UNet. The change is an *attention control*: an explicit argument of the UNet call, a
pytree (``flax.struct.PyTreeNode``) whose array fields are traced and whose ``pytree_node=False`` fields are
static settings. The protocol is the same for self- and cross-attention layers (docs/attention.md):

  * ``controls(layer)``: the layer filter (static); by default every cross-attention layer and no self-attention
    layer. Layers a control does not take run the plain model's code, bit for bit.
  * ``probabilities(scores, probs, layer) -> (probs, aux)``: replace a layer's probabilities;
  * ``replaces_output(layer)`` and ``output(q, k, v, layer) -> (out, aux)``: replace the layer's whole output
    (FoI mixes two guidance branches' values; Prompt-to-Prompt's self-attention moves queries and keys between
    images and keeps the fused kernel);
  * ``Compose(a, b, ...)``: several controls on one UNet call, ``a``'s probabilities handed to ``b``.

Whatever auxiliary value a control returns for a layer comes back from the UNet call under the layer's name:

    eps, aux = unet.apply({"params": params}, x, t, context, control=RecordCrossAttention(sizes=((16, 16),)))
    aux["down_blocks.1.attentions.0.transformer_blocks.0.attn2"]  # (B, 16, 16, T) head-averaged maps

Self-attention layers no control takes go through the platform's fused kernel (``attention_kernels.py``: splash
on TPU, cuDNN on GPU, a tiled loop of plain matmuls on CPU), or the one the UNet's ``attention_backend`` forces.
Cross-attention layers are the explicit form with or without a control. Their 77 keys keep the scores small
(4,096 x 77 per head at 512 px, 1.9 % of self-attention's 4,096 x 4,096), and one form everywhere keeps a control
that changes nothing bitwise equal to the plain model, which the tests of every control rely on.
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
    """Where an attention layer sits in the UNet. Static (hashable) metadata, known at trace time.

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

    @property
    def kind(self) -> str:
        """``"self"`` (``attn1``: image positions to image positions) or ``"cross"`` (``attn2``: to text tokens)."""
        return "self" if self.name.endswith("attn1") else "cross"


class AttentionControl(struct.PyTreeNode):
    """Base attention control: the plain model (softmax, nothing recorded).

    Subclass it (subclasses are frozen dataclasses and pytrees) and override ``probabilities`` to replace a layer's
    probabilities, or ``replaces_output`` and ``output`` to replace its output; ``controls`` chooses the layers.
    Array fields are traced and may change between calls without recompiling; mark settings that select layers
    or change shapes ``struct.field(pytree_node=False)``.
    """

    def controls(self, layer: LayerInfo) -> bool:
        """Whether this control takes ``layer`` (decided at trace time from static settings). The default takes
        every cross-attention layer and no self-attention layer: those keep the fused kernel."""
        return layer.kind == "cross"

    def probabilities(self, scores_bnqk: jax.Array, probs_bnqk: jax.Array, layer: LayerInfo) -> tuple[jax.Array, Any]:
        """A taken layer's probabilities.

        Args:
          scores_bnqk: float32 ``(B, heads, Q, K)``, ``q k^T / sqrt(head_dim)``; queries ``Q = h * w`` in row-major
            order of the layer's ``(h, w)`` grid, keys ``K`` the text tokens (cross-attention) or the same
            positions (self-attention).
          probs_bnqk: the probabilities so far: ``softmax(scores)``, or what an earlier control of a ``Compose``
            made of them.
          layer: where the layer sits.

        Returns:
          ``(probs_bnqk, aux)``: the probabilities the layer combines with its values (rows need not sum to 1), and
          an auxiliary pytree returned from the UNet under ``layer.name``, or ``None`` to return nothing.
        """
        del scores_bnqk, layer
        return probs_bnqk, None

    def replaces_output(self, layer: LayerInfo) -> bool:
        """Whether ``output`` computes this taken layer's output instead of ``probabilities`` (static)."""
        del layer
        return False

    def output(
        self, q_bqnd: jax.Array, k_bknd: jax.Array, v_bknd: jax.Array, layer: LayerInfo
    ) -> tuple[jax.Array, Any]:
        """A taken layer's output, for controls that are not one probability matrix times the branch's own values.

        Args:
          q_bqnd: ``(B, Q, heads, d)`` queries of the layer's ``Q = h * w`` positions (row-major).
          k_bknd, v_bknd: ``(B, K, heads, d)`` keys and values (text tokens, or the same positions).
          layer: where the layer sits.

        Returns:
          ``(out_bqc, aux)``: ``(B, Q, heads * d)``, before the layer's output projection, and the aux pytree.
          The default is the plain attention: the fused kernel for self-attention, the explicit form otherwise.
        """
        if layer.kind == "self":
            out = dot_product_attention(q_bqnd, k_bknd, v_bknd)
            return out.reshape(out.shape[0], out.shape[1], -1), None
        return combine_values(jax.nn.softmax(attention_scores(q_bqnd, k_bknd), axis=-1), v_bknd), None

    def attend(
        self, q_bqnd: jax.Array, k_bknd: jax.Array, v_bknd: jax.Array, layer: LayerInfo
    ) -> tuple[jax.Array, Any]:
        """What a taken layer calls: ``output`` where it replaces the output, else the explicit attention with
        ``probabilities``. Not meant to be overridden (``Compose`` does)."""
        if self.replaces_output(layer):
            return self.output(q_bqnd, k_bknd, v_bknd, layer)
        scores = attention_scores(q_bqnd, k_bknd)
        probs, aux = self.probabilities(scores, jax.nn.softmax(scores, axis=-1), layer)
        return combine_values(probs, v_bknd), aux


class Compose(AttentionControl):
    """Several controls on one UNet call: ``Compose(PromptToPrompt(...), RecordCrossAttention())``.

    A layer is taken when any of them takes it. The probabilities pass through the controls that take the layer
    in order (the second sees the first's), so a recorder placed last records what the layer used. At most one of
    them may replace a layer's output; when one does, it computes the output and the others' ``probabilities``
    see the layer's plain ``softmax(scores)``: they observe, and probabilities they change do not reach the output
    (``Compose(PromptToPrompt(...), FoIModulation(...))`` would drop Prompt-to-Prompt's replacement in the
    cross-attention layers FoI takes). A ``Compose`` is not a part of another: list its parts instead.

    The UNet's aux for a layer is a tuple with one entry per control (``None`` where it returned nothing);
    ``split`` turns the UNet's aux into one dict per control.

    Attributes:
      parts: the controls, in order.
    """

    parts: tuple[AttentionControl, ...]

    def __init__(self, *controls: AttentionControl, parts: tuple[AttentionControl, ...] | None = None):
        # ``parts=`` is how JAX's unflattening and ``replace`` rebuild the dataclass.
        parts = tuple(controls) if parts is None else tuple(parts)
        if any(isinstance(part, Compose) for part in parts):
            raise ValueError("a Compose is not a part of another Compose: list its parts instead")
        object.__setattr__(self, "parts", parts)

    def controls(self, layer):
        return any(part.controls(layer) for part in self.parts)

    def attend(self, q_bqnd, k_bknd, v_bknd, layer):
        taking = [i for i, part in enumerate(self.parts) if part.controls(layer)]
        replacing = [i for i in taking if self.parts[i].replaces_output(layer)]
        if len(replacing) > 1:
            names = ", ".join(type(self.parts[i]).__name__ for i in replacing)
            raise ValueError(f"{layer.name}: more than one control replaces the output ({names})")
        if not taking:  # the plain layer
            return AttentionControl().output(q_bqnd, k_bknd, v_bknd, layer)
        aux = [None] * len(self.parts)
        observers = [i for i in taking if i not in replacing]
        if observers:
            scores = attention_scores(q_bqnd, k_bknd)
            probs = jax.nn.softmax(scores, axis=-1)
            for i in observers:
                probs, aux[i] = self.parts[i].probabilities(scores, probs, layer)
        if replacing:
            out, aux[replacing[0]] = self.parts[replacing[0]].output(q_bqnd, k_bknd, v_bknd, layer)
        else:
            out = combine_values(probs, v_bknd)
        return out, None if all(a is None for a in aux) else tuple(aux)

    def split(self, aux: dict[str, Any]) -> list[dict[str, Any]]:
        """The UNet's aux of a composed control as one ``{layer name: aux}`` dict per control, in order."""
        return [{name: value[i] for name, value in aux.items() if value[i] is not None} for i in range(len(self.parts))]


class RecordCrossAttention(AttentionControl):
    """Records head-averaged cross-attention probabilities of the layers of chosen spatial sizes.

    Attributes:
      sizes: the ``(height, width)`` sizes of the layers to record; empty records every layer.

    The UNet's aux then maps each recorded layer's name to float32 maps ``(B, h, w, T)``.
    """

    sizes: tuple[tuple[int, int], ...] = struct.field(pytree_node=False, default=())

    def controls(self, layer):
        return layer.kind == "cross" and (not self.sizes or layer.size in self.sizes)

    def probabilities(self, scores_bnqk, probs_bnqk, layer):
        height, width = layer.size
        maps = probs_bnqk.mean(axis=1).reshape(probs_bnqk.shape[0], height, width, probs_bnqk.shape[-1])
        return probs_bnqk, maps


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
    """The UNet's self-attention (``attn1``), no q/k/v biases: the fused path unless a control takes the layer.

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
        if control is None or self.layer is None or not control.controls(self.layer):
            return fused_self_attention(x_btc, self.num_heads, False, self.dtype, self.attention_backend), None
        q, k, v = _self_projections(x_btc, self.num_heads, False, self.dtype)
        out, aux = control.attend(q, k, v, self.layer)
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
        if control is None or not control.controls(self.layer):
            out, aux = combine_values(jax.nn.softmax(attention_scores(q, k), axis=-1), v), None
        else:
            out, aux = control.attend(q, k, v, self.layer)
        return _dense(channels, True, self.dtype, "to_out_0")(out), aux
