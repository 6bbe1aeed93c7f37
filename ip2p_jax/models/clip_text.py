"""The CLIP text transformer (transformers' ``CLIPTextModel``) in Flax linen.

Returns the last hidden state after the final layer norm, which is what Stable Diffusion conditions on.
``transformers`` v5 ships no Flax models, so this is our own; parameter names mirror transformers'
(``text_model.encoder.layers.0.self_attn.q_proj`` -> ``text_model/encoder/layers_0/self_attn/q_proj``).

``CLIPEncoder`` (and its ``CLIPEncoderLayer``, ``CLIPAttention``, ``CLIPMLP``) is the transformer of both CLIP
towers: causal here, unmasked in ``models/clip.py``'s vision tower, with the same parameter names in both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax.models.attention import split_heads

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # SD 1.x (OpenAI CLIP)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # SD 2.x (OpenCLIP)
}
# Keys of a transformers CLIPTextConfig that do not change the text transformer's forward pass.
_IGNORED_SETTINGS = (
    "projection_dim",
    "initializer_range",
    "initializer_factor",
    "attention_dropout",
    "dropout",
    "bos_token_id",
    "pad_token_id",
    "model_type",
    "architectures",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "tie_word_embeddings",
    "id2label",
    "label2id",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "name_or_path",
)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The settings of a transformers ``text_encoder/config.json`` that shape the network."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """Validates a transformers CLIP text config dict (a full ``CLIPConfig``'s ``text_config`` works too)."""
        if "text_config" in config:
            config = config["text_config"]
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        text_config = cls(**kwargs)
        if text_config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"text encoder config: hidden_act={text_config.hidden_act!r} is not implemented "
                f"(only {sorted(ACTIVATIONS)})"
            )
        unknown = sorted(k for k in config if not k.startswith("_") and k not in fields | set(_IGNORED_SETTINGS))
        if unknown:
            raise ValueError(f"text encoder config: unknown settings {unknown}")
        return text_config


class TransformerConfig(Protocol):
    """What ``CLIPEncoder`` reads of a tower's config: ``CLIPTextConfig`` and ``models/clip.py``'s
    ``CLIPVisionConfig`` both have these fields."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(cfg: TransformerConfig, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, name=name
    )


class CLIPAttention(nn.Module):
    """Multi-head self-attention (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

    Attributes:
      config: the tower's sizes (``hidden_size``, ``num_attention_heads``).
      causal: each token sees only itself and the tokens before it (the text tower); otherwise every token sees
        every other (the vision tower: image patches have no order to respect).
      dtype: compute dtype; parameters stay float32.
    """

    config: TransformerConfig
    causal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        """``(B, T, hidden)`` -> ``(B, T, hidden)``."""
        cfg = self.config
        q, k, v = (
            split_heads(_dense(cfg.hidden_size, self.dtype, f"{n}_proj")(x_btd), cfg.num_attention_heads)
            for n in ("q", "k", "v")
        )
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal).reshape(x_btd.shape)
        return _dense(cfg.hidden_size, self.dtype, "out_proj")(out)


class CLIPMLP(nn.Module):
    """``fc1`` to ``intermediate_size``, the config's activation, ``fc2`` back: ``(B, T, hidden)`` -> same."""

    config: TransformerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.config.hidden_act](_dense(self.config.intermediate_size, self.dtype, "fc1")(x_btd))
        return _dense(self.config.hidden_size, self.dtype, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: self-attention (causal or not, see ``CLIPAttention``), then the MLP."""

    config: TransformerConfig
    causal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        """``(B, T, hidden)`` -> ``(B, T, hidden)``."""
        cfg = self.config
        x_btd = x_btd + CLIPAttention(cfg, self.causal, self.dtype, name="self_attn")(
            _layer_norm(cfg, self.dtype, "layer_norm1")(x_btd)
        )
        return x_btd + CLIPMLP(cfg, self.dtype, name="mlp")(_layer_norm(cfg, self.dtype, "layer_norm2")(x_btd))


class CLIPEncoder(nn.Module):
    """The transformer of either CLIP tower: ``num_hidden_layers`` ``CLIPEncoderLayer`` (``layers_0``, ...).

    Attributes:
      config: the tower's sizes and activation (``CLIPTextConfig`` or ``CLIPVisionConfig``).
      causal: True for the text tower (causal attention), False for the vision tower.
      dtype: compute dtype; parameters stay float32.
    """

    config: TransformerConfig
    causal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h_btd: jax.Array) -> jax.Array:
        """``(B, T, hidden)`` -> ``(B, T, hidden)``, not normalised (each tower applies its own final layer norm)."""
        for i in range(self.config.num_hidden_layers):
            h_btd = CLIPEncoderLayer(self.config, self.causal, self.dtype, name=f"layers_{i}")(h_btd)
        return h_btd


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids_bt):
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32, name="token_embedding")
        positions = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, param_dtype=jnp.float32, name="position_embedding"
        )
        return tokens(input_ids_bt) + positions(jnp.arange(input_ids_bt.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
    """transformers' ``CLIPTextTransformer`` (``text_model``): embeddings, the causal encoder, the final layer norm.

    Causal as OpenAI trained it: each token's state depends only on the tokens before it, so padding after the
    end token changes nothing up to it.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids_bt: jax.Array) -> jax.Array:
        """Token ids ``(B, T)`` -> ``(B, T, hidden)`` float32 after ``final_layer_norm``."""
        cfg = self.config
        length = input_ids_bt.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed the text encoder's {cfg.max_position_embeddings} positions")
        h = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids_bt).astype(self.dtype)
        h = CLIPEncoder(cfg, causal=True, dtype=self.dtype, name="encoder")(h)
        return _layer_norm(cfg, self.dtype, "final_layer_norm")(h).astype(jnp.float32)


class CLIPTextModel(nn.Module):
    """CLIP's text tower.

    Attributes:
      config: the network's settings (``CLIPTextConfig.from_transformers(json)`` for a checkpoint's).
      dtype: compute dtype; parameters stay float32.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids_bt: jax.Array) -> jax.Array:
        """Token ids ``(B, T)`` int32 -> last hidden state after the final layer norm ``(B, T, hidden)`` float32."""
        return CLIPTextTransformer(self.config, self.dtype, name="text_model")(input_ids_bt)
