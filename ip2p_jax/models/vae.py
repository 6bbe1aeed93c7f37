"""The Stable Diffusion autoencoder (diffusers' ``AutoencoderKL``) in Flax linen, NHWC.

``encode`` returns the diagonal Gaussian's mean and log-variance (clipped to [-30, 20] as diffusers does);
``decode`` maps latents back to images in [-1, 1] (unclipped). Neither applies ``scaling_factor``: IP2P scales
the target latents but not the conditioning image latent, so the caller decides (see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax.models.attention import fused_self_attention
from ip2p_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

_FIXED_SETTINGS = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "mid_block_add_attention": True,
}
_IGNORED_SETTINGS = ("sample_size", "force_upcast")  # informational, or about fp16 numerics only


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The settings of a diffusers ``vae/config.json`` that shape the network (defaults are diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @classmethod
    def known_settings(cls) -> set[str]:
        """Every diffusers setting this port reads, implements at one value, or knows to be informational."""
        return {f.name for f in dataclasses.fields(cls)} | set(_FIXED_SETTINGS) | set(_IGNORED_SETTINGS)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Validates a diffusers AutoencoderKL config; unsupported values and unknown keys are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(
            k
            for k in config
            if not k.startswith("_") and k not in fields | set(_FIXED_SETTINGS) | set(_IGNORED_SETTINGS)
        )
        if unknown:
            raise ValueError(f"VAE config: unknown settings {unknown}")
        for key, supported in _FIXED_SETTINGS.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"VAE config: {key}={config[key]!r} is not implemented (only {supported!r})")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        vae_config = cls(**kwargs)
        for kind in vae_config.down_block_types:
            if kind != "DownEncoderBlock2D":
                raise ValueError(f"VAE config: down block type {kind!r} is not implemented")
        for kind in vae_config.up_block_types:
            if kind != "UpDecoderBlock2D":
                raise ValueError(f"VAE config: up block type {kind!r} is not implemented")
        if len(vae_config.up_block_types) != len(vae_config.block_out_channels):
            raise ValueError("VAE config: up_block_types needs one entry per block_out_channels entry")
        return vae_config


class AttentionBlock(nn.Module):
    """The VAE's single-head spatial self-attention with GroupNorm and a residual connection."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        batch, height, width, channels = x_bhwc.shape
        h = group_norm(self.groups, 1e-6, self.dtype, "group_norm")(x_bhwc).reshape(batch, height * width, channels)
        h = fused_self_attention(h, 1, True, self.dtype)
        return x_bhwc + h.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
    """``UNetMidBlock2D`` without time embedding: resnet, attention, resnet."""

    channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        h = ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name="resnets_0")(h)
        h = AttentionBlock(self.groups, self.dtype, name="attentions_0")(h)
        return ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name="resnets_1")(h)


class EncoderBlock(nn.Module):
    """``DownEncoderBlock2D``: resnets then (except in the last block) an asymmetrically padded downsampler."""

    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(h)
        if self.add_downsample:
            h = Downsample2D(self.channels, asymmetric_pad=True, dtype=self.dtype, name="downsamplers_0")(h)
        return h


class DecoderBlock(nn.Module):
    """``UpDecoderBlock2D``: resnets then (except in the last block) a 2x upsampler."""

    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(h)
        if self.add_upsample:
            h = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(h)
        return h


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        cfg = self.config
        h = conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(x_bhwc)
        n = len(cfg.block_out_channels)
        for i, channels in enumerate(cfg.block_out_channels):
            h = EncoderBlock(
                channels,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                i < n - 1,
                self.dtype,
                name=f"down_blocks_{i}",
            )(h)
        h = MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, self.dtype, name="mid_block")(h)
        h = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, self.dtype, "conv_norm_out")(h))
        return conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z_bhwc):
        cfg = self.config
        h = conv(cfg.block_out_channels[-1], 3, self.dtype, "conv_in")(z_bhwc)
        h = MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, self.dtype, name="mid_block")(h)
        n = len(cfg.block_out_channels)
        for i, channels in enumerate(reversed(cfg.block_out_channels)):
            h = DecoderBlock(
                channels,
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                i < n - 1,
                self.dtype,
                name=f"up_blocks_{i}",
            )(h)
        h = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, self.dtype, "conv_norm_out")(h))
        return conv(cfg.out_channels, 3, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. ``apply(..., method="encode")`` / ``method="decode"``; ``__call__`` encodes the mean
    and decodes it (a reconstruction, used to initialise parameters).

    Attributes:
      config: the network's settings (``VAEConfig.from_diffusers(json)`` for a checkpoint's).
      dtype: compute dtype; parameters stay float32.
    """

    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, self.dtype, None)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, self.dtype, None)

    def encode(self, images_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images in [-1, 1] ``(B, H, W, C)`` -> ``(mean, logvar)``, each ``(B, H/f, W/f, latent_channels)``
        float32, ``f = 2 ** (len(block_out_channels) - 1)``. ``mean`` is the distribution's mode."""
        moments = self.encoder(images_bhwc.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents_bhwc: jax.Array) -> jax.Array:
        """Unscaled latents ``(B, h, w, latent_channels)`` -> images ``(B, h*f, w*f, C)`` float32, about [-1, 1]."""
        z = latents_bhwc.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images_bhwc: jax.Array) -> jax.Array:
        return self.decode(self.encode(images_bhwc)[0])


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the encoder's diagonal Gaussian: ``mean + exp(logvar / 2) * N(0, 1)``."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
