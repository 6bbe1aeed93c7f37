"""CLIP (transformers' ``CLIPModel``) in Flax linen: the vision tower, the text tower and their projections.

The text tower is ``models/clip_text.py``'s; this file adds the vision transformer (a ViT whose patch embedding is
a convolution without bias, with a learned class token, ``pre_layrnorm`` before the encoder and ``post_layernorm``
on the class token; its encoder is ``clip_text.CLIPEncoder`` with ``causal=False``), the two projections into the
joint space and ``logit_scale``. Used for the CLIP metrics of
IP2P's data generation and evaluation (``ip2p_jax/evaluation/clip_metrics.py``): OpenAI's ViT-L/14 and PickScore
(a fine-tuned OpenCLIP ViT-H/14) are both this module with different settings.

Parameter names mirror transformers' (``vision_model.encoder.layers.0.self_attn.q_proj`` ->
``vision_model/encoder/layers_0/self_attn/q_proj``); ``vision_model.embeddings.class_embedding`` and
``logit_scale`` are bare parameters there and here. Images are NHWC, resized and normalised with CLIP's mean and
std: ``pixel_values_bhwc`` is what ``clip_preprocess.ip2p_pixel_values`` returns, or transformers'
``CLIPImageProcessor`` output (``weights.load_clip_preprocessor``, NCHW) transposed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax.models.clip_text import (
    _IGNORED_SETTINGS,
    ACTIVATIONS,
    CLIPEncoder,
    CLIPTextConfig,
    CLIPTextTransformer,
    _layer_norm,
)

# The bare parameters of a transformers CLIPModel checkpoint (no ``.weight`` suffix), for the weight converter.
BARE_PARAMETERS = ("vision_model.embeddings.class_embedding", "logit_scale")

# Settings that transformers v4 wrote into every nested config (generation defaults, labels, export flags) and
# that do not touch CLIP's forward pass. openai/clip-vit-large-patch14's config.json carries all of them.
_GENERIC_SETTINGS = frozenset(
    (
        "add_cross_attention",
        "bad_words_ids",
        "begin_suppress_tokens",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "diversity_penalty",
        "do_sample",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "finetuning_task",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "id2label",
        "label2id",
        "is_decoder",
        "is_encoder_decoder",
        "length_penalty",
        "max_length",
        "min_length",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_scores",
        "pruned_heads",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict_in_generate",
        "suppress_tokens",
        "temperature",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "top_k",
        "top_p",
        "torchscript",
        "typical_p",
        "use_bfloat16",
    )
    + _IGNORED_SETTINGS
)

# transformers' own defaults (CLIPTextConfig / CLIPVisionConfig), which fill what a config.json leaves out. Ours
# differ for the text tower (CLIPTextConfig here defaults to SD 1.x's encoder), so they are spelled out.
_TRANSFORMERS_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
_TRANSFORMERS_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_TOP_LEVEL_SETTINGS = frozenset(
    ("text_config", "vision_config", "text_config_dict", "vision_config_dict", "projection_dim")
    + ("logit_scale_init_value", "initializer_factor", "model_type", "architectures", "torch_dtype", "dtype")
    + ("transformers_version",)
)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The settings of a transformers ``CLIPVisionConfig`` that shape the vision transformer."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        """Patch tokens plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPVisionConfig:
        """Validates a transformers CLIP vision config dict (a full ``CLIPConfig``'s ``vision_config`` works too)."""
        if "vision_config" in config:
            config = config["vision_config"]
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | _GENERIC_SETTINGS | {"eos_token_id"}  # v4 wrote token ids (None) into vision configs too
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"vision config: unknown settings {unknown}")
        vision_config = cls(**{k: v for k, v in config.items() if k in fields})
        if vision_config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"vision config: hidden_act={vision_config.hidden_act!r} is not implemented "
                f"(only {sorted(ACTIVATIONS)})"
            )
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(vision_config, name), int):
                raise ValueError(f"vision config: {name}={getattr(vision_config, name)!r} is not one integer")
        if vision_config.hidden_size % vision_config.num_attention_heads:
            raise ValueError(
                f"vision config: hidden_size {vision_config.hidden_size} is not a multiple of "
                f"num_attention_heads {vision_config.num_attention_heads}"
            )
        return vision_config


def _resolved_sub_config(config: Mapping[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``config[f"{name}_config"]`` with transformers' defaults under it, and the legacy ``{name}_config_dict``.

    Configs saved before transformers 4.26 (openai/clip-vit-large-patch14's among them) carry both
    ``text_config`` and ``text_config_dict``. transformers rebuilds a complete config from the ``_dict`` one and
    its own defaults and lets that replace every setting of the other, so the ``_dict`` wins, defaults included.
    """
    sub = dict(config.get(f"{name}_config") or {})
    legacy = config.get(f"{name}_config_dict")
    if legacy is not None:
        sub.update({**defaults, **legacy})
    return {**defaults, **sub}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A transformers ``CLIPConfig`` (``model_type`` ``"clip"``): both towers and the joint space.

    Attributes:
      text: the text tower's settings.
      vision: the vision tower's settings.
      projection_dim: width of the joint embedding space (both projections' outputs).
      logit_scale_init_value: ``logit_scale``'s value before training (the checkpoint's replaces it).
    """

    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPConfig:
        """Validates a transformers ``CLIPModel`` ``config.json`` dict; unknown settings raise ``ValueError``."""
        model_type = config.get("model_type", "clip")
        if model_type != "clip":
            raise ValueError(f"model_type {model_type!r} is not a CLIPModel's ('clip')")
        known = _TOP_LEVEL_SETTINGS | _GENERIC_SETTINGS
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"CLIP config: unknown settings {unknown}")
        text = _resolved_sub_config(config, "text", _TRANSFORMERS_TEXT_DEFAULTS)
        text = {k: v for k, v in text.items() if k not in _GENERIC_SETTINGS}
        vision = _resolved_sub_config(config, "vision", _TRANSFORMERS_VISION_DEFAULTS)
        return cls(
            text=CLIPTextConfig.from_transformers(text),
            vision=CLIPVisionConfig.from_transformers(vision),
            projection_dim=config.get("projection_dim", 512),
            logit_scale_init_value=config.get("logit_scale_init_value", 2.6592),
        )


class CLIPVisionEmbeddings(nn.Module):
    """Non-overlapping patches (a strided convolution without bias), the class token first, plus learned positions."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values_bhwc: jax.Array) -> jax.Array:
        cfg = self.config
        batch, height, width, channels = pixel_values_bhwc.shape
        if (height, width, channels) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"images of {height}x{width}x{channels}; this CLIP takes "
                f"{cfg.image_size}x{cfg.image_size}x{cfg.num_channels} (see clip_preprocess)"
            )
        patches = nn.Conv(
            cfg.hidden_size,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="patch_embedding",
        )(pixel_values_bhwc.astype(self.dtype))
        # Row-major over the patch grid, as PyTorch's flatten of (B, D, h, w).
        patches_btd = patches.reshape(batch, -1, cfg.hidden_size)
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(cfg.hidden_size**-0.5), (cfg.hidden_size,), jnp.float32
        )
        class_btd = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size))
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, param_dtype=jnp.float32, name="position_embedding")
        embeddings = jnp.concatenate([class_btd, patches_btd], axis=1)
        return embeddings + positions(jnp.arange(cfg.num_positions))[None].astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
    """transformers' ``CLIPVisionModel`` body (``vision_model`` in a ``CLIPModel``).

    Attributes:
      config: the vision tower's settings.
      dtype: compute dtype; parameters stay float32.
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalised images ``(B, S, S, C)`` -> ``(last_hidden (B, 1 + patches, D), pooled (B, D))`` float32.

        ``pooled`` is the class token after ``post_layernorm``; ``last_hidden`` is not normalised (as transformers).
        """
        cfg = self.config
        h = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values_bhwc)
        h = _layer_norm(cfg, self.dtype, "pre_layrnorm")(h)  # sic: transformers' name for the checkpoint key
        # The text tower's encoder without the causal mask: image patches attend to each other both ways.
        h = CLIPEncoder(cfg, causal=False, dtype=self.dtype, name="encoder")(h)
        pooled = _layer_norm(cfg, self.dtype, "post_layernorm")(h[:, 0])
        return h.astype(jnp.float32), pooled.astype(jnp.float32)


def pool_eos(hidden_btd: jax.Array, input_ids_bt: jax.Array, eos_token_id: int) -> jax.Array:
    """The hidden state at each sequence's end-of-text token: ``(B, T, D), (B, T) -> (B, D)``.

    As transformers: with ``eos_token_id == 2`` (configs written before transformers fixed CLIP's token ids) the
    position of the largest id, which is the end token in OpenAI's vocabulary; otherwise the first occurrence of
    ``eos_token_id``, since padding may repeat it. Every sequence must hold an end token.
    """
    ids = jnp.asarray(input_ids_bt)
    positions = jnp.argmax(ids if eos_token_id == 2 else ids == eos_token_id, axis=-1)
    return jnp.take_along_axis(hidden_btd, positions[:, None, None], axis=1)[:, 0]


class CLIPModel(nn.Module):
    """CLIP: two towers projected into one embedding space (transformers' ``CLIPModel``).

    ``init`` and ``__call__`` take both inputs; the feature methods are applied on their own::

        image_embeds = module.apply({"params": params}, pixels_bhwc, method=CLIPModel.get_image_features)

    Attributes:
      config: the settings (``CLIPConfig.from_transformers(json)`` for a checkpoint's).
      dtype: compute dtype; parameters stay float32, outputs are float32.
    """

    config: CLIPConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.text_model = CLIPTextTransformer(cfg.text, self.dtype)
        self.vision_model = CLIPVisionTransformer(cfg.vision, self.dtype)
        projection = dict(features=cfg.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
        self.text_projection = nn.Dense(**projection)
        self.visual_projection = nn.Dense(**projection)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), (), jnp.float32
        )

    def get_image_features(self, pixel_values_bhwc: jax.Array) -> jax.Array:
        """Normalised images ``(B, S, S, 3)`` -> image embeddings ``(B, projection_dim)`` float32, not unit length."""
        _, pooled = self.vision_model(pixel_values_bhwc)
        return self.visual_projection(pooled.astype(self.dtype)).astype(jnp.float32)

    def get_text_features(self, input_ids_bt: jax.Array) -> jax.Array:
        """Token ids ``(B, T)`` int32 (each with an end token) -> text embeddings ``(B, projection_dim)`` float32.

        No attention mask is needed: attention is causal, so padding after the end token cannot reach it.
        """
        pooled = pool_eos(self.text_model(input_ids_bt), input_ids_bt, self.config.text.eos_token_id)
        return self.text_projection(pooled.astype(self.dtype)).astype(jnp.float32)

    def __call__(self, pixel_values_bhwc: jax.Array, input_ids_bt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(image_embeds (B, P), text_embeds (B', P), logit_scale ())``; ``exp(logit_scale)`` scales CLIP's logits."""
        return self.get_image_features(pixel_values_bhwc), self.get_text_features(input_ids_bt), self.logit_scale
