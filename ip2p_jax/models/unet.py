"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``) in Flax linen, NHWC.

Parameter names mirror diffusers' module paths (``down_blocks.1.attentions.0`` -> ``down_blocks_1/attentions_0``)
so that checkpoints convert by name. The call returns ``(eps, aux)``: ``aux`` maps the name of every attention
layer for which the attention control returned something to that value (``{}`` without a control): cross-attention
layers (``...attn2``), and self-attention layers (``...attn1``) the control takes. See
``models/attention.py`` for the control interface.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax.models.attention import AttentionControl, CrossAttention, LayerInfo, SelfAttention
from ip2p_jax.models.attention_kernels import check_backend
from ip2p_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers settings this port implements only at one value: anything else is an error that names the setting.
_FIXED_SETTINGS = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Settings read and accepted at any value because they change nothing here.
_IGNORED_SETTINGS = (
    "sample_size",  # informational only
    "use_linear_projection",  # proj_in / proj_out are Dense either way; the loader reshapes 1 x 1 convolutions
    "upcast_attention",  # the scores always accumulate in float32 (``attention.attention_scores``)
)


def _per_block(value: Any, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {name} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The settings of a diffusers ``unet/config.json`` that shape the network (defaults are diffusers').
    Per-block values are tuples."""

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (1280,) * 4
    num_heads: tuple[int, ...] = (8,) * 4  # diffusers' (misnamed) `attention_head_dim`
    transformer_layers_per_block: tuple[int, ...] = (1,) * 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Validates a diffusers UNet config dict; unsupported values and unknown keys are errors naming them."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_heads"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in cls.known_settings())
        if unknown:
            raise ValueError(f"UNet config: unknown settings {unknown}")
        for key, supported in _FIXED_SETTINGS.items():
            value = config.get(key, supported)
            if isinstance(value, list) and key == "only_cross_attention":
                value = any(value)
            if value != supported:
                raise ValueError(f"UNet config: {key}={value!r} is not implemented (only {supported!r})")
        n = len(config.get("down_block_types", cls.down_block_types))
        kwargs = {k: config[k] for k in fields if k in config}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        # diffusers' `attention_head_dim` is the number of heads (a historical naming slip it keeps).
        kwargs["num_heads"] = _per_block(config.get("attention_head_dim", 8), n, "attention_head_dim")
        # diffusers' defaults for settings given as one value or one per block.
        for key, default in (("cross_attention_dim", 1280), ("transformer_layers_per_block", 1)):
            kwargs[key] = _per_block(config.get(key, default), n, key)
        if kwargs.get("norm_num_groups", 32) is None:
            raise ValueError("UNet config: norm_num_groups=None is not implemented")
        unet_config = cls(**kwargs)
        unet_config.validate()
        return unet_config

    @classmethod
    def known_settings(cls) -> set[str]:
        """Every diffusers setting this port reads, implements at one value, or knows to be informational."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_heads"}
        return fields | set(_FIXED_SETTINGS) | set(_IGNORED_SETTINGS) | {"attention_head_dim"}

    def cross_attention_levels(self) -> tuple[int, ...]:
        """The resolution levels (0 at the latent's size, +1 per downsampling) that have cross-attention layers:
        those of the ``CrossAttn`` down and up blocks, and the mid block's at the lowest level."""
        n = len(self.down_block_types)
        levels = {i for i, kind in enumerate(self.down_block_types) if kind == "CrossAttnDownBlock2D"}
        levels |= {n - 1 - i for i, kind in enumerate(self.up_block_types) if kind == "CrossAttnUpBlock2D"}
        return tuple(sorted(levels | {n - 1}))

    def validate(self) -> None:
        n = len(self.down_block_types)
        for name in (
            "up_block_types",
            "block_out_channels",
            "num_heads",
            "cross_attention_dim",
            "transformer_layers_per_block",
        ):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNet config: {name} must have one entry per down block ({n})")
        for kind in self.down_block_types:
            if kind not in DOWN_BLOCK_TYPES:
                raise ValueError(f"UNet config: down block type {kind!r} is not implemented ({DOWN_BLOCK_TYPES})")
        for kind in self.up_block_types:
            if kind not in UP_BLOCK_TYPES:
                raise ValueError(f"UNet config: up block type {kind!r} is not implemented ({UP_BLOCK_TYPES})")
        if self.block_out_channels[0] % 2:
            raise ValueError("UNet config: block_out_channels[0] must be even (sinusoidal time embedding)")


def timestep_embedding(timesteps_b: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers: ``(B,) -> (B, dim)`` float32."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps_b.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class GEGLU(nn.Module):
    """``proj`` to twice the hidden width, then ``hidden * gelu(gate)`` with the exact GELU."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        proj = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=jnp.float32, name="proj")(x)
        hidden, gate = jnp.split(proj, 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net_0`` to ``4 C`` gated, ``net_2`` back to ``C``."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(4 * x.shape[-1], self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=jnp.float32, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-normed with LayerNorm and residual.

    Returns ``(x, aux)`` with ``aux`` mapping ``self_layer.name`` / ``layer.name`` to what the control returned for
    the self- / cross-attention layer (absent when it returned ``None``).
    """

    num_heads: int
    layer: LayerInfo
    self_layer: LayerInfo | None = None
    dtype: Any = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, x_btc, context_bkd, control):
        def norm(name):
            return nn.LayerNorm(
                epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, param_dtype=jnp.float32, name=name
            )

        aux = {}
        backend = self.attention_backend
        out, self_aux = SelfAttention(self.num_heads, self.self_layer, self.dtype, backend, name="attn1")(
            norm("norm1")(x_btc), control
        )
        if self_aux is not None:
            aux[self.self_layer.name] = self_aux
        x_btc = x_btc + out
        out, cross_aux = CrossAttention(self.num_heads, self.layer, self.dtype, name="attn2")(
            norm("norm2")(x_btc), context_bkd, control
        )
        if cross_aux is not None:
            aux[self.layer.name] = cross_aux
        x_btc = x_btc + out
        x_btc = x_btc + FeedForward(self.dtype, name="ff")(norm("norm3")(x_btc))
        return x_btc, aux


def level_size(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial size ``(height, width)`` of the UNet's layers ``level`` downsamplings below the latent: each stride-2
    3 x 3 convolution (padding 1) maps ``n`` to ``ceil(n / 2)``, so a latent of height 50 and width 75 has levels of
    (25, 38) and (13, 19), not the floor division's (25, 37) and (12, 18)."""
    height, width = latent_size
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where a block sits: its kind, index among its kind and resolution level (for ``LayerInfo``)."""

    block: str
    block_index: int
    level: int

    def prefix(self) -> str:
        return "mid_block" if self.block == "mid" else f"{self.block}_blocks.{self.block_index}"


class Transformer2DModel(nn.Module):
    """GroupNorm, ``proj_in``, transformer blocks, ``proj_out``, residual.

    A 1x1 convolution and a linear projection over channels are the same map in NHWC, so both of diffusers'
    ``use_linear_projection`` variants are a Dense here; the weight loader reshapes either checkpoint form.
    """

    num_heads: int
    num_layers: int
    groups: int
    place: _Place
    attention_index: int
    dtype: Any = jnp.float32
    remat: str = "none"
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, x_bhwc, context_bkd, control):
        batch, height, width, channels = x_bhwc.shape
        block_class = rematerialised(BasicTransformerBlock, self.remat, "transformer")
        h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x_bhwc)
        h = nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32, name="proj_in")(h)
        h = h.reshape(batch, height * width, channels)
        aux = {}
        for i in range(self.num_layers):
            prefix = f"{self.place.prefix()}.attentions.{self.attention_index}.transformer_blocks.{i}"
            layer, self_layer = (
                LayerInfo(
                    name=f"{prefix}.{module}",
                    block=self.place.block,
                    block_index=self.place.block_index,
                    level=self.place.level,
                    size=(height, width),
                    num_heads=self.num_heads,
                )
                for module in ("attn2", "attn1")
            )
            block = block_class(
                self.num_heads, layer, self_layer, self.dtype, self.attention_backend, name=f"transformer_blocks_{i}"
            )
            h, layer_aux = block(h, context_bkd, control)
            aux.update(layer_aux)
        h = nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32, name="proj_out")(h)
        return x_bhwc + h.reshape(batch, height, width, channels), aux


# Rematerialisation (activation checkpointing) for training: which blocks keep nothing of their activations for
# the backward pass and recompute them from the block's input. (A policy that keeps matmul outputs, such as
# ``dots_with_no_batch_dims_saveable``, would keep the CPU attention's scores: its tiles are plain matmuls.)
REMAT = {
    "none": {},
    "transformer": {"transformer": jax.checkpoint_policies.nothing_saveable},
    "resnet_and_transformer": {
        "transformer": jax.checkpoint_policies.nothing_saveable,
        "resnet": jax.checkpoint_policies.nothing_saveable,
    },
}


def rematerialised(module_class, remat: str, kind: str):
    """``module_class``, wrapped in ``nn.remat`` with its policy when the setting ``remat`` (a key of ``REMAT``)
    rematerialises blocks of this ``kind``."""
    policy = REMAT[remat].get(kind)
    return module_class if policy is None else nn.remat(module_class, policy=policy)


class _BlockSettings(nn.Module):
    """Fields shared by the UNet's blocks."""

    channels: int
    num_layers: int
    with_attention: bool
    num_heads: int
    transformer_layers: int
    groups: int
    eps: float
    place: _Place
    dtype: Any = jnp.float32
    remat: str = "none"
    attention_backend: str = "auto"

    def resnet(self, index):
        resnet_class = rematerialised(ResnetBlock2D, self.remat, "resnet")
        return resnet_class(self.channels, self.groups, self.eps, self.dtype, name=f"resnets_{index}")

    def attention(self, index):
        return Transformer2DModel(
            self.num_heads,
            self.transformer_layers,
            self.groups,
            self.place,
            index,
            self.dtype,
            self.remat,
            self.attention_backend,
            name=f"attentions_{index}",
        )


class DownBlock(_BlockSettings):
    """``CrossAttnDownBlock2D`` (``with_attention``) or ``DownBlock2D``; returns the skips it adds."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, h, temb, context, control):
        skips, aux = [], {}
        for j in range(self.num_layers):
            h = self.resnet(j)(h, temb)
            if self.with_attention:
                h, a = self.attention(j)(h, context, control)
                aux.update(a)
            skips.append(h)
        if self.add_downsample:
            h = Downsample2D(self.channels, dtype=self.dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips, aux


class MidBlock(_BlockSettings):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    @nn.compact
    def __call__(self, h, temb, context, control):
        h = self.resnet(0)(h, temb)
        h, aux = self.attention(0)(h, context, control)
        return self.resnet(1)(h, temb), aux


class UpBlock(_BlockSettings):
    """``CrossAttnUpBlock2D`` (``with_attention``) or ``UpBlock2D``; consumes one skip per resnet."""

    upsample_size: tuple[int, int] | None = None  # None: no upsampler (the last block)

    @nn.compact
    def __call__(self, h, skips, temb, context, control):
        aux = {}
        for j in range(self.num_layers):
            h = self.resnet(j)(jnp.concatenate([h, skips[-1 - j]], axis=-1), temb)
            if self.with_attention:
                h, a = self.attention(j)(h, context, control)
                aux.update(a)
        if self.upsample_size is not None:
            h = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(h, self.upsample_size)
        return h, aux


class TimestepEmbedding(nn.Module):
    """``linear_1``, SiLU, ``linear_2``."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32, name="linear_2")(nn.silu(x))


class UNet2DConditionModel(nn.Module):
    """The conditional UNet.

    Attributes:
      config: the network's settings (``UNetConfig.from_diffusers(json)`` for a checkpoint's).
      dtype: compute dtype; parameters stay float32.
      remat: which blocks training rematerialises (a key of ``REMAT``); the outputs do not change.
      attention_backend: the kernel of self-attention (``attention_kernels.BACKENDS``; ``"auto"`` picks the
        platform's); cross-attention keeps its explicit form (``models/attention.py``).
    """

    config: UNetConfig
    dtype: Any = jnp.float32
    remat: str = "none"
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        # Checked here, so that a bad setting fails where the model is made.
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {sorted(REMAT)}, got {self.remat!r}")
        check_backend(self.attention_backend)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        sample_bhwc: jax.Array,
        timesteps: jax.Array,
        context_btd: jax.Array,
        control: AttentionControl | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Predicts the noise.

        Args:
          sample_bhwc: ``(B, H, W, in_channels)`` latents (for IP2P, noisy latent then image latent).
          timesteps: scalar or ``(B,)`` timesteps (may be fractional).
          context_btd: ``(B, T, cross_attention_dim)`` text encoder states.
          control: optional attention control (see ``models/attention.py``).

        Returns:
          ``(eps, aux)``: ``(B, H, W, out_channels)`` float32 and the control's per-layer outputs by layer name.
        """
        cfg, dtype = self.config, self.dtype
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample_bhwc.shape[0],))
        temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(4 * cfg.block_out_channels[0], dtype, name="time_embedding")(temb.astype(dtype))
        context_btd = context_btd.astype(dtype)
        n = len(cfg.down_block_types)

        def settings(index, block, block_index, num_layers, with_attention):
            return dict(
                channels=cfg.block_out_channels[index],
                num_layers=num_layers,
                with_attention=with_attention,
                num_heads=cfg.num_heads[index],
                transformer_layers=cfg.transformer_layers_per_block[index],
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                place=_Place(block, block_index, index),
                dtype=dtype,
                remat=self.remat,
                attention_backend=self.attention_backend,
            )

        h = conv(cfg.block_out_channels[0], 3, dtype, "conv_in")(sample_bhwc.astype(dtype))
        skips, aux = [h], {}
        for i, kind in enumerate(cfg.down_block_types):
            block = DownBlock(
                **settings(i, "down", i, cfg.layers_per_block, kind == "CrossAttnDownBlock2D"),
                add_downsample=i < n - 1,
                name=f"down_blocks_{i}",
            )
            h, new_skips, a = block(h, temb, context_btd, control)
            skips += new_skips
            aux.update(a)

        h, a = MidBlock(**settings(n - 1, "mid", 0, 1, True), name="mid_block")(h, temb, context_btd, control)
        aux.update(a)

        for i, kind in enumerate(cfg.up_block_types):
            num_layers = cfg.layers_per_block + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            # Upsample to the next skip's size: it is not 2x when a size was odd on the way down.
            upsample_size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            block = UpBlock(
                **settings(n - 1 - i, "up", i, num_layers, kind == "CrossAttnUpBlock2D"),
                upsample_size=upsample_size,
                name=f"up_blocks_{i}",
            )
            h, a = block(h, block_skips, temb, context_btd, control)
            aux.update(a)

        h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype, "conv_norm_out")(h))
        h = conv(cfg.out_channels, 3, dtype, "conv_out")(h)
        return h.astype(jnp.float32), aux
