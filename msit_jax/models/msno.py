"""MSNO (multi-scale neural operator) and the V / multi-scale Q-K branches.

All maps are (B, H, W, dim). Layer names mirror the official state_dict
(`amsno.*`, `conv_vs.0`, `multi_conv_qs.0.*`) so conversion is a renaming.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msit_jax.models.layers import BatchNorm, Conv, RIMConv, gelu
from msit_jax.ops.runtime import RuntimeOptions

Array = jax.Array

# LEM: (dy, dx) offsets read by each channel class. c % 4 picks a 4-neighbour;
# channels with c % 8 >= 4 add a diagonal neighbour on top.
_LEM_CROSS = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}
_LEM_DIAG = {4: (-1, 1), 5: (1, -1), 6: (1, 1), 7: (-1, -1)}


def lem_mask(dim: int) -> np.ndarray:
    """The fixed LEM depthwise kernel, (dim, 3, 3) float32; tap (i, j) reads offset (i-1, j-1)."""
    if dim % 8:
        raise ValueError(f"LEM needs dim divisible by 8, got {dim}")
    mask = np.zeros((dim, 3, 3), np.float32)
    for c in range(dim):
        dy, dx = _LEM_CROSS[c % 4]
        mask[c, dy + 1, dx + 1] = 1.0
        if c % 8 in _LEM_DIAG:
            dy, dx = _LEM_DIAG[c % 8]
            mask[c, dy + 1, dx + 1] = 1.0
    return mask


def lem_shift(x: Array) -> Array:
    """LEM pixel shift with circular padding: (B, H, W, C) -> (B, H, W, C).

    Each output channel is the sum of the (one or two) shifted input copies its
    mask selects; exact, with no multiply-by-zero taps.
    """
    mask = lem_mask(x.shape[-1])
    out = jnp.zeros_like(x)
    for i in range(3):
        for j in range(3):
            sel = mask[:, i, j]
            if not sel.any():
                continue
            # out[y, x] reads in[y + i - 1, x + j - 1] (circular).
            shifted = jnp.roll(x, shift=(1 - i, 1 - j), axis=(1, 2))
            out = out + jnp.where(sel.astype(bool), shifted, jnp.zeros((), x.dtype))
    return out


class MultiScaleConv(nn.Module):
    """Split channels into `heads` equal groups; group i gets a (3 + 2i)-sized RIM/plain conv
    (multi-scale in the receptive-field sense: kernel sizes 3, 5, 7, ...)."""

    heads: int
    conv: str  # 'rim' | 'plain'
    init_scheme: str
    name_fmt: str
    runtime: RuntimeOptions = RuntimeOptions()  # its thresholds apply to every kernel size

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        if c % self.heads:
            raise ValueError(f"{c} channels not divisible into {self.heads} kernel-size heads")
        hc = c // self.heads
        outs = []
        for i, xi in enumerate(jnp.split(x, self.heads, axis=-1)):
            k = 3 + 2 * i
            layer = rim_or_plain_conv(self.conv, hc, k, self.init_scheme,
                                      self.name_fmt.format(i + 1), self.runtime)
            outs.append(layer(xi))
        return jnp.concatenate(outs, axis=-1)


def rim_or_plain_conv(kind: str, features: int, k: int, init: str, name: str,
                      runtime: RuntimeOptions) -> nn.Module:
    """A conv at a RIM position: RIMConv (stage 2) or a plain Conv (stage 1 / folded),
    running with `runtime` as given (thresholds included)."""
    kw = dict(init_scheme=init, runtime=runtime, name=name)
    if kind == "rim":
        return RIMConv(features, k, **kw)
    if kind == "plain":
        return Conv(features, k, **kw)
    raise ValueError(f"unknown conv kind {kind!r}; choose 'rim' or 'plain'")


# The MixHead instances (by module name) and the conv each one's BatchNorm follows;
# `msit_jax.models.reparam.fold` merges the BatchNorm into that conv.
BN_INPUT_CONV = {"sim": "sim0", "mix": "proj1"}


class MixHead(nn.Module):
    """conv1x1 (grouped, dim -> 2 dim) -> BatchNorm -> GELU -> conv1x1 (2 dim -> dim)."""

    dim: int
    groups: int
    names: tuple[str, str]
    batch_norm: bool
    bn_eps: float
    bn_momentum: float
    runtime: RuntimeOptions = RuntimeOptions()  # its 1x1 convs take it as given

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        kw = dict(init_scheme="fan_out", runtime=self.runtime)
        y = Conv(2 * self.dim, 1, groups=self.groups, name=self.names[0], **kw)(x)
        if self.batch_norm:
            y = BatchNorm(self.bn_eps, self.bn_momentum, name="bn")(y, train)
        return Conv(self.dim, 1, name=self.names[1], **kw)(gelu(y))


class MSNO(nn.Module):
    """Feature enhancement: x -> proj(SIM(MSC(LEM(s(x)))) * v(x)), (B, H, W, dim)."""

    dim: int
    heads: int = 16
    use_lem: bool = True
    conv: str = "rim"
    batch_norm: bool = True
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    # the thresholds reach the multi-scale convs only
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        # The 1x1 projections and the mix head are not multi-scale: no FFT or pixel blocks.
        direct = self.runtime.direct_convs()
        kw = dict(init_scheme="fan_out", runtime=direct)
        v = Conv(self.dim, 1, use_bias=False, name="v", **kw)(x)
        s = Conv(self.dim, 1, use_bias=False, name="s", **kw)(x)
        if self.use_lem:
            s = lem_shift(s)
        s = MultiScaleConv(self.heads, self.conv, "fan_out", "Ms_conv_{}", self.runtime,
                           name="msc")(s)
        s = MixHead(self.dim, self.heads, (BN_INPUT_CONV["sim"], "sim1"), self.batch_norm,
                    self.bn_eps, self.bn_momentum, direct, name="sim")(s, train)
        return Conv(self.dim, 1, name="proj", **kw)(s * v)


class QKBranch(nn.Module):
    """Multi-scale Q/K features (official MsC): (B, H, W, dim) -> (B, H, W, dim)."""

    dim: int
    heads: int = 4
    conv: str = "rim"
    batch_norm: bool = True
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    # the thresholds reach the multi-scale convs only
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        # The 1x1 projections and the mix head are not multi-scale: no FFT or pixel blocks.
        direct = self.runtime.direct_convs()
        kw = dict(init_scheme="fan_out", runtime=direct)
        y = Conv(self.dim, 1, name="proj0", **kw)(x)
        y = MultiScaleConv(self.heads, self.conv, "fan_out", "local_conv_{}", self.runtime,
                           name="msc")(y)
        return MixHead(self.dim, self.dim // self.heads, (BN_INPUT_CONV["mix"], "proj2"),
                       self.batch_norm, self.bn_eps, self.bn_momentum, direct,
                       name="mix")(y, train)
