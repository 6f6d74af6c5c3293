"""Feature encoders without upsampler: EDSR-baseline and RDN. NHWC in and out."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msit_jax.models.layers import Conv, Precision

Array = jax.Array

# The official RDNconfig presets: (blocks D, conv layers per block C, growth G).
RDN_PRESETS = {"A": (20, 6, 32), "B": (16, 8, 64)}


class ResBlock(nn.Module):
    features: int
    res_scale: float = 1.0
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = lambda name: Conv(self.features, 3, precision=self.precision,
                                 dtype=self.dtype, impl=self.impl, name=name)
        y = conv("body_2")(nn.relu(conv("body_0")(x)))
        return x + y * self.res_scale if self.res_scale != 1.0 else x + y


class EDSRBaseline(nn.Module):
    """EDSR-baseline body: (B, H, W, 3) -> (B, H, W, n_feats). No mean shift."""

    n_resblocks: int = 16
    n_feats: int = 64
    res_scale: float = 1.0
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
        h = Conv(self.n_feats, 3, name="head_0", **kw)(x)
        y = h
        for i in range(self.n_resblocks):
            y = ResBlock(self.n_feats, self.res_scale, name=f"body_{i}", **kw)(y)
        y = Conv(self.n_feats, 3, name=f"body_{self.n_resblocks}", **kw)(y)
        return y + h


class RDB(nn.Module):
    """Residual dense block: C densely connected conv+ReLU, 1x1 fusion, local skip."""

    g0: int
    growth: int
    n_layers: int
    kernel_size: int = 3
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
        y = x
        for c in range(self.n_layers):
            out = nn.relu(_RDBConv(self.growth, self.kernel_size, name=f"convs_{c}", **kw)(y))
            y = jnp.concatenate([y, out], axis=-1)
        return Conv(self.g0, 1, name="LFF", **kw)(y) + x


class _RDBConv(nn.Module):
    growth: int
    kernel_size: int
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return Conv(self.growth, self.kernel_size, precision=self.precision,
                    dtype=self.dtype, impl=self.impl, name="conv_0")(x)


class RDN(nn.Module):
    """RDN body: (B, H, W, 3) -> (B, H, W, G0)."""

    g0: int = 64
    kernel_size: int = 3
    n_blocks: int = 16
    n_layers: int = 8
    growth: int = 64
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, c, g = self.n_blocks, self.n_layers, self.growth
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
        f1 = Conv(self.g0, self.kernel_size, name="SFENet1", **kw)(x)
        y = Conv(self.g0, self.kernel_size, name="SFENet2", **kw)(f1)
        outs = []
        for i in range(d):
            y = RDB(self.g0, g, c, self.kernel_size, name=f"RDBs_{i}", **kw)(y)
            outs.append(y)
        y = Conv(self.g0, 1, name="GFF_0", **kw)(jnp.concatenate(outs, axis=-1))
        y = Conv(self.g0, self.kernel_size, name="GFF_1", **kw)(y)
        return y + f1


def make_encoder(cfg, precision: Precision, dtype: Any, impl: str = "auto") -> nn.Module:
    """Encoder module from the model config's `encoder` and its sub-config."""
    if cfg.encoder == "edsr-baseline":
        e = cfg.edsr
        return EDSRBaseline(e.n_resblocks, e.n_feats, e.res_scale, precision, dtype, impl,
                            name="encoder")
    if cfg.encoder == "rdn":
        e = cfg.rdn
        return RDN(e.g0, e.kernel_size, e.n_blocks, e.n_layers, e.growth, precision, dtype,
                   impl, name="encoder")
    raise ValueError(f"unknown encoder {cfg.encoder!r}; choose 'edsr-baseline' or 'rdn'")

