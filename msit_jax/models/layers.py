"""Building blocks with PyTorch semantics: conv, BatchNorm, RIM conv, GELU.

Every layer is NHWC. Kernels are HWIO (flax layout); `msit_jax.io.torch_io` maps
PyTorch's OIHW tensors onto them. The convolution itself (and its per-platform
gradient kernels) is `msit_jax.ops.conv2d`.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from msit_jax.ops import conv2d
from msit_jax.ops.runtime import RuntimeOptions
from msit_jax.ops.s2d import conv2d_s2d

Array = jax.Array

# Variable collection holding the frozen RIM base kernels. It is not 'params',
# so optimisers never see it and gradients never reach it.
FROZEN = "frozen"


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, torch.nn.GELU()'s default."""
    return jax.nn.gelu(x, approximate=False)


# --- PyTorch default initialisers -------------------------------------------
# torch.nn.Conv2d / nn.Linear: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))
# for the weight and U(+-1/sqrt(fan_in)) for the bias.

def torch_default_kernel_init() -> Callable:
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def fan_out_normal_init(kernel_size: int, out_channels: int, groups: int) -> Callable:
    """The official MSNO/MsC `_init_weights`: N(0, sqrt(2 / fan_out))."""
    fan_out = kernel_size * kernel_size * out_channels // groups
    std = math.sqrt(2.0 / fan_out)

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)

    return init


class Conv(nn.Module):
    """torch.nn.Conv2d(stride=1, padding=k//2) in NHWC.

    init_scheme: 'torch' (torch's default) or 'fan_out' (the official MSNO/MsC init,
    zero bias).
    """

    features: int
    kernel_size: int
    groups: int = 1
    use_bias: bool = True
    init_scheme: str = "torch"
    # precision, compute dtype, conv impl and both thresholds (fft_min_kernel, s2d_min_kernel)
    # apply to this conv as given: a parent passes `runtime.direct_convs()` where they must not
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        if cin % self.groups or self.features % self.groups:
            raise ValueError(
                f"channels {cin}->{self.features} not divisible by groups={self.groups}")
        k = self.kernel_size
        shape = (k, k, cin // self.groups, self.features)
        fan_in = shape[0] * shape[1] * shape[2]
        if self.init_scheme == "torch":
            k_init, b_init = torch_default_kernel_init(), torch_default_bias_init(fan_in)
        elif self.init_scheme == "fan_out":
            k_init = fan_out_normal_init(k, self.features, self.groups)
            b_init = nn.initializers.zeros_init()
        else:
            raise ValueError(f"unknown init {self.init_scheme!r}")
        kernel = self.param("kernel", k_init, shape, jnp.float32)
        bias = self.param("bias", b_init, (self.features,), jnp.float32) if self.use_bias else None
        return _conv(self.runtime, x.astype(self.runtime.compute_dtype), kernel, bias, self.groups)


def _conv(rt: RuntimeOptions, x: Array, kernel: Array, bias, groups: int) -> Array:
    """Conv / RIMConv's convolution, x (B, H, W, Cin) -> (B, H, W, Cout): on pixel
    blocks (ops.s2d) from rt.s2d_min_kernel, else `msit_jax.ops.conv2d` with rt's
    precision, FFT threshold and conv impl."""
    k = kernel.shape[0]
    if groups == 1 and rt.s2d_min_kernel and k >= rt.s2d_min_kernel:
        y = conv2d_s2d(x, kernel, rt.lax_precision)
        return y if bias is None else y + bias.astype(y.dtype)
    return conv2d(x, kernel, bias, groups=groups, precision=rt.lax_precision,
                  fft_min_kernel=rt.fft_min_kernel, impl=rt.conv_impl)


def rim_effective_kernel(base: Array, convmap: Array, rim_factor: Array) -> Array:
    """RIM's re-parameterised kernel K = W + convmap(W) * (rim_factor * W).

    base: (k, k, I, O) frozen kernel W; convmap: (3, 3, I, O), one 3x3 filter
    per 2-D kernel applied with zero padding 1 (cross-correlation, as torch);
    rim_factor: (I, O), one factor per 2-D kernel (the flax param `scale`,
    torch's `linear` 1x1 conv). Returns (k, k, I, O).
    """
    k = base.shape[0]
    padded = jnp.pad(base, ((1, 1), (1, 1), (0, 0), (0, 0)))
    mapped = sum(
        convmap[dy, dx] * padded[dy:dy + k, dx:dx + k]
        for dy in range(3)
        for dx in range(3)
    )
    return base + mapped * (rim_factor * base)


class RIMConv(nn.Module):
    """Re-Interaction Module conv (official `RiM`, groups=1, map_k=3).

    The base kernel `W` lives in the FROZEN collection and gets no gradient;
    `convmap`, `scale` (the per-2-D-kernel RIM factor, torch `linear`) and `bias`
    are learnable. Parameter names match the checkpoints and the torch mapping.
    """

    features: int
    kernel_size: int
    init_scheme: str = "torch"  # init of convmap and the RIM factor, see Conv
    # precision, compute dtype, conv impl and both thresholds (fft_min_kernel, s2d_min_kernel)
    # apply to this conv as given: a parent passes `runtime.direct_convs()` where they must not
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, cin, cout = self.kernel_size, x.shape[-1], self.features
        # The official init leaves W at zero, which makes an untrained RIM
        # output only its bias. A fresh model gets a torch-default random W
        # instead; stage-2 training overwrites it with the stage-1 kernel.
        base = self.variable(
            FROZEN, "kernel",
            lambda: torch_default_kernel_init()(self.make_rng("params"), (k, k, cin, cout)),
        ).value
        if self.init_scheme == "fan_out":  # N(0, sqrt(2/fan_out)), fan_out = 9 and 1
            cm_init, factor_init = fan_out_normal_init(3, 1, 1), fan_out_normal_init(1, 1, 1)
        else:  # torch default: fan_in = 9 and 1
            cm_init = _uniform_init(1.0 / 3.0)
            factor_init = _uniform_init(1.0)
        convmap = self.param("convmap", cm_init, (3, 3, cin, cout), jnp.float32)
        rim_factor = self.param("scale", factor_init, (cin, cout), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (cout,), jnp.float32)
        kernel = rim_effective_kernel(base, convmap, rim_factor)
        return _conv(self.runtime, x.astype(self.runtime.compute_dtype), kernel, bias, 1)


def _uniform_init(bound: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over the last axis.

    Training normalises with the biased batch variance and updates the running
    variance with the unbiased one, as torch does (flax's BatchNorm uses the
    biased variance for both). momentum is torch's (new-value weight). The
    affine parameters are flax's names: `scale` is gamma, `bias` beta.
    """

    eps: float = 1e-5
    momentum: float = 0.1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        bn_gamma = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bn_beta = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)  # two-pass, as torch
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = jax.lax.rsqrt(var + self.eps) * bn_gamma
        return ((x - mean.astype(x.dtype)) * inv.astype(x.dtype) + bn_beta.astype(x.dtype))
