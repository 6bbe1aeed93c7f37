"""Convolutional building blocks shared by the UNet and the VAE (NHWC), named as in diffusers."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(groups: int, eps: float, dtype: Any, name: str) -> nn.GroupNorm:
    """GroupNorm over channel groups; the exact two-pass variance, as PyTorch computes it."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def conv(features: int, kernel: int, dtype: Any, name: str | None, stride: int = 1, padding: Any = "SAME_1") -> nn.Conv:
    """A 2-D convolution; ``padding="SAME_1"`` pads ``kernel // 2`` on every side, like PyTorch's ``padding=k//2``."""
    if padding == "SAME_1":
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (``time_embedding_norm="default"``, output scale 1).

    Attributes:
      out_channels: output channels; a 1x1 ``conv_shortcut`` is used when they differ from the input's.
      groups, eps: GroupNorm settings.
    """

    out_channels: int
    groups: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, temb_bc: jax.Array | None = None) -> jax.Array:
        """``(B, H, W, C_in)`` and optional ``(B, C_t)`` time embedding -> ``(B, H, W, out_channels)``."""
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x_bhwc))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb_bc is not None:
            temb = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=jnp.float32, name="time_emb_proj")(
                nn.silu(temb_bc)
            )
            h = h + temb[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x_bhwc.shape[-1] != self.out_channels:
            x_bhwc = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x_bhwc)
        return x_bhwc + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution. ``asymmetric_pad`` is the VAE's variant: pad right and bottom by one, no more."""

    channels: int
    asymmetric_pad: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
        return conv(self.channels, 3, self.dtype, "conv", stride=2, padding=padding)(x_bhwc)


def upsample_nearest(x_bhwc: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize to ``size``, source index ``floor(i * in / out)`` as PyTorch's ``nearest``."""
    _, height, width, _ = x_bhwc.shape
    if size == (2 * height, 2 * width):
        return jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(size[0]) * height) // size[0]
    cols = (jnp.arange(size[1]) * width) // size[1]
    return x_bhwc[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest upsampling (to twice the size, or to ``size`` when given) followed by a 3x3 convolution."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        if size is None:
            size = (2 * x_bhwc.shape[1], 2 * x_bhwc.shape[2])
        return conv(self.channels, 3, self.dtype, "conv")(upsample_nearest(x_bhwc, size))
