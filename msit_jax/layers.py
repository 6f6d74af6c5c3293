"""Building blocks with PyTorch semantics: conv, BatchNorm, RIM conv, GELU.

Every layer is NHWC. Kernels are HWIO (flax layout); `msit_jax.torch_io` maps
PyTorch's OIHW tensors onto them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Precision = Optional[jax.lax.Precision]

# Variable collection holding the frozen RIM base kernels. It is not 'params',
# so optimisers never see it and gradients never reach it.
FROZEN = "frozen"


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, torch.nn.GELU()'s default."""
    return jax.nn.gelu(x, approximate=False)


def accum_type(*operands) -> Optional[Any]:
    """preferred_element_type for a dot: float32 accumulation/output.

    XLA:CPU has no bf16 x bf16 -> f32 dot; there the dot returns bf16 (callers
    cast), elsewhere (GPU/TPU) it accumulates and returns float32.
    """
    low = any(jnp.dtype(o.dtype) != jnp.float32 for o in operands)
    return None if low and jax.default_backend() == "cpu" else jnp.float32


def parse_precision(name: Optional[str]) -> Precision:
    if name in (None, "default"):
        return None
    return {"high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}[name]


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


def conv2d(
    x: Array,
    kernel: Array,
    bias: Optional[Array],
    *,
    groups: int = 1,
    padding: int | None = None,
    precision: Precision = None,
    fft: bool = False,
) -> Array:
    """Stride-1 conv with symmetric zero padding (torch `padding=k//2`).

    x: (B, H, W, Cin); kernel: (k, k, Cin/groups, Cout); bias: (Cout,) or None.
    fft: compute a 'same' ungrouped conv as an FFT product (the same sums,
    rounded differently: ~5e-7 relative); several times faster for large
    kernels on few channels, forward and backward.
    """
    k = kernel.shape[0]
    p = k // 2 if padding is None else padding
    if fft and groups == 1 and p == k // 2:
        y = conv2d_fft(x, kernel.astype(x.dtype))
    else:
        y = _conv(x, kernel.astype(x.dtype), groups, p, precision)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def conv2d_fft(x: Array, kernel: Array) -> Array:
    """'same' cross-correlation of x (B, H, W, Cin) with kernel (k, k, Cin, Cout) via rFFTs.

    With FFTs of size H + k - 1 (the padded input) the circular correlation
    has no wrap-around at the H x W outputs. Gradients follow by autodiff.
    """
    k = kernel.shape[0]
    p = k // 2
    h, w = x.shape[1], x.shape[2]
    size = (h + 2 * p, w + 2 * p)
    xf = jnp.fft.rfft2(jnp.pad(x.astype(jnp.float32), ((0, 0), (p, p), (p, p), (0, 0))),
                       axes=(1, 2))
    kf = jnp.fft.rfft2(kernel.astype(jnp.float32), s=size, axes=(0, 1))
    yf = jnp.einsum("byxi,yxio->byxo", xf, jnp.conj(kf))
    return jnp.fft.irfft2(yf, s=size, axes=(1, 2))[:, :h, :w].astype(x.dtype)


def _lax_conv(x: Array, w: Array, groups: int, p: int, precision: Precision) -> Array:
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=precision)


# The forward pass is XLA's convolution; only the kernel gradient is computed
# differently on CPU, where XLA lowers it as a convolution whose "kernel" is the
# whole output gradient: 5-100x slower than the forward for 1x1, grouped and
# large kernels. The alternatives below are exact up to float32 round-off.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, w: Array, groups: int, p: int, precision: Precision) -> Array:
    return _lax_conv(x, w, groups, p, precision)


def _conv_fwd(x, w, groups, p, precision):
    return _lax_conv(x, w, groups, p, precision), (x, w)


def _conv_bwd(groups, p, precision, res, g):
    x, w = res
    _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, w, groups, p, precision), x)
    return vjp_x(g)[0], kernel_grad(x, g, w.shape, groups, p, precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


def kernel_grad(x: Array, g: Array, shape: tuple, groups: int, p: int,
                precision: Precision) -> Array:
    """d(loss)/d(kernel) of a stride-1 conv: x (B, H, W, Cin), g (B, H, W, Cout) -> shape (HWIO).

    On CPU the method is chosen by kernel size and width (measured on 48x48
    maps, batch 4, the training shapes): a matmul for 1x1 (block diagonal of
    the dense product when grouped), an FFT cross-correlation for large
    kernels on few channels, k*k shifted matmuls for 3x3 and small narrow
    kernels, XLA's own rule otherwise.
    """
    k, _, cin_g, cout = shape
    cin = x.shape[-1]
    narrow = cin * cout <= 32 * 32
    cpu = jax.default_backend() == "cpu"
    if cpu and k == 1 and p == 0:
        dense = jnp.dot(x.reshape(-1, cin).T, g.reshape(-1, cout), precision=precision)
        if groups == 1:
            return dense[None, None]
        cout_g = cout // groups
        blocks = dense.reshape(groups, cin_g, groups, cout_g)
        diag = blocks[jnp.arange(groups), :, jnp.arange(groups), :]  # (G, cin_g, cout_g)
        return jnp.transpose(diag, (1, 0, 2)).reshape(1, 1, cin_g, cout)
    if cpu and groups == 1 and p == k // 2:
        if (k >= 9 and narrow) or k >= 15:
            return _kernel_grad_fft(x, g, k)
        if k == 3 or (k <= 7 and narrow):
            return _kernel_grad_shifts(x, g, k, precision)
    _, vjp_w = jax.vjp(lambda w_: _lax_conv(x, w_, groups, p, precision),
                       jnp.zeros(shape, x.dtype))
    return vjp_w(g)[0]


def _kernel_grad_shifts(x: Array, g: Array, k: int, precision: Precision) -> Array:
    """dK[i, j] = shift_ij(xpad)^T @ g, one (Cin x Cout) matmul per tap."""
    p = k // 2
    h, w, cin = x.shape[1:]
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    gm = g.reshape(-1, g.shape[-1])
    taps = [jnp.dot(xp[:, i:i + h, j:j + w].reshape(-1, cin).T, gm, precision=precision)
            for i in range(k) for j in range(k)]
    return jnp.stack(taps).reshape(k, k, cin, -1)


def _kernel_grad_fft(x: Array, g: Array, k: int) -> Array:
    """Large-kernel 'same' conv kernel gradient as an FFT cross-correlation.

    dK[dy, dx, i, o] = sum_{b,y,x} xpad[b, y+dy, x+dx, i] g[b, y, x, o]; with FFTs
    of size H + k - 1 the circular correlation has no wrap-around for dy < k.
    """
    p = k // 2
    h, w = x.shape[1] + 2 * p, x.shape[2] + 2 * p
    xf = jnp.fft.rfft2(jnp.pad(x.astype(jnp.float32), ((0, 0), (p, p), (p, p), (0, 0))),
                       axes=(1, 2))
    gf = jnp.fft.rfft2(g.astype(jnp.float32), s=(h, w), axes=(1, 2))
    corr = jnp.einsum("byxi,byxo->yxio", xf, jnp.conj(gf))
    return jnp.fft.irfft2(corr, s=(h, w), axes=(0, 1))[:k, :k].astype(x.dtype)


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
    precision: Precision = None
    dtype: Dtype = jnp.float32
    fft: bool = False  # see conv2d

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
        return conv2d(x.astype(self.dtype), kernel, bias, groups=self.groups,
                      precision=self.precision, fft=self.fft)


def rim_effective_kernel(base: Array, convmap: Array, scale: Array) -> Array:
    """RIM's re-parameterised kernel K = W + convmap(W) * (scale * W).

    base: (k, k, I, O) frozen kernel W; convmap: (3, 3, I, O), one 3x3 filter
    per 2-D kernel applied with zero padding 1 (cross-correlation, as torch);
    scale: (I, O), one factor per 2-D kernel (torch's `linear` 1x1 conv).
    Returns (k, k, I, O).
    """
    k = base.shape[0]
    padded = jnp.pad(base, ((1, 1), (1, 1), (0, 0), (0, 0)))
    mapped = sum(
        convmap[dy, dx] * padded[dy:dy + k, dx:dx + k]
        for dy in range(3)
        for dx in range(3)
    )
    return base + mapped * (scale * base)


class RIMConv(nn.Module):
    """Re-Interaction Module conv (official `RiM`, groups=1, map_k=3).

    The base kernel `W` lives in the FROZEN collection and gets no gradient;
    `convmap`, `scale` (torch `linear`) and `bias` are learnable.
    """

    features: int
    kernel_size: int
    init_scheme: str = "torch"  # init of convmap/scale, see Conv
    precision: Precision = None
    dtype: Dtype = jnp.float32
    fft: bool = False  # see conv2d

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
            cm_init, sc_init = fan_out_normal_init(3, 1, 1), fan_out_normal_init(1, 1, 1)
        else:  # torch default: fan_in = 9 and 1
            cm_init = _uniform_init(1.0 / 3.0)
            sc_init = _uniform_init(1.0)
        convmap = self.param("convmap", cm_init, (3, 3, cin, cout), jnp.float32)
        scale = self.param("scale", sc_init, (cin, cout), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (cout,), jnp.float32)
        kernel = rim_effective_kernel(base, convmap, scale)
        return conv2d(x.astype(self.dtype), kernel, bias, precision=self.precision, fft=self.fft)


def _uniform_init(bound: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over the last axis.

    Training normalises with the biased batch variance and updates the running
    variance with the unbiased one, as torch does (flax's BatchNorm uses the
    biased variance for both). momentum is torch's (new-value weight).
    """

    eps: float = 1e-5
    momentum: float = 0.1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
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
        inv = jax.lax.rsqrt(var + self.eps) * scale
        return ((x - mean.astype(x.dtype)) * inv.astype(x.dtype) + bias.astype(x.dtype))


def bn_fold_factors(stats: dict, params: dict, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier, offset) such that BN(y) == y * multiplier + offset (eval mode)."""
    inv = params["scale"] / np.sqrt(stats["var"] + eps)
    return inv, params["bias"] - stats["mean"] * inv


def channel_groups(x: Array, sizes: Sequence[int]) -> list[Array]:
    """Split the channel axis into consecutive groups of the given sizes."""
    idx = np.cumsum(sizes)[:-1].tolist()
    return jnp.split(x, idx, axis=-1)
