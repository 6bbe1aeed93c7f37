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


# On CPU, convolutions with at most this many output positions per image run as one matmul over gathered
# patches: XLA's CPU convolution is 2-10x slower there (the UNet's 8x8 and 4x4 levels; benchmarks/cpu_kernels.py),
# and faster from 16x16 up.
IM2COL_MAX_POSITIONS = 64


def _im2col_conv(x_bhwc, kernel_hwio, stride, padding):
    """Convolution as ``patches @ kernel``: ``(B*Ho*Wo, kh*kw*C_in) @ (kh*kw*C_in, C_out)``."""
    kh, kw, c_in, c_out = kernel_hwio.shape
    x = jnp.pad(x_bhwc, ((0, 0), *padding, (0, 0)))
    batch, height, width, _ = x.shape
    out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
    taps = [
        x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.stack(taps, axis=-2).reshape(batch * out_h * out_w, kh * kw * c_in)
    return (patches @ kernel_hwio.reshape(kh * kw * c_in, c_out)).reshape(batch, out_h, out_w, c_out)


class Conv2D(nn.Module):
    """2-D convolution on NHWC with explicit padding; parameters as ``flax.linen.Conv`` (``kernel`` is
    ``(kh, kw, C_in, C_out)``, then ``bias``). A 1x1 convolution is a matmul; on CPU, small outputs use im2col.

    Attributes:
      features: output channels.
      kernel_size: square kernel side.
      stride: square stride.
      padding: ``((top, bottom), (left, right))``.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: tuple = ((1, 1), (1, 1))
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        size, stride, padding = self.kernel_size, self.stride, tuple(map(tuple, self.padding))
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (size, size, x_bhwc.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel = x_bhwc.astype(self.dtype), kernel.astype(self.dtype)
        out_h = (x.shape[1] + sum(padding[0]) - size) // stride + 1
        out_w = (x.shape[2] + sum(padding[1]) - size) // stride + 1
        if size == 1 and stride == 1 and padding == ((0, 0), (0, 0)):
            y = x @ kernel[0, 0]
        elif jax.default_backend() == "cpu" and out_h * out_w <= IM2COL_MAX_POSITIONS:
            y = _im2col_conv(x, kernel, stride, padding)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return y + bias.astype(self.dtype)


def conv(features: int, kernel: int, dtype: Any, name: str | None, stride: int = 1, padding: Any = None) -> Conv2D:
    """A convolution padded ``kernel // 2`` on every side unless ``padding`` is given, like PyTorch's layers."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return Conv2D(features, kernel, stride, padding, dtype=dtype, name=name)


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
