"""Stride-1 'same' 2-D convolution, NHWC x HWIO, with per-platform kernels.

The forward pass is XLA's convolution (or, for large kernels where asked, an
FFT product). What differs per platform is the kernel gradient: XLA:CPU
lowers d(loss)/d(kernel) as a convolution whose "kernel" is the whole output
gradient, 5-100x slower than the forward for 1x1, grouped and large kernels.
On CPU the kernel gradient is instead a dense matmul, k*k shifted matmuls or
an FFT cross-correlation, chosen by shape; GPUs and TPUs keep XLA's rule.

How: `conv2d` is a `jax.custom_jvp` whose tangent in the kernel is written,
on CPU, in a form whose transpose (what reverse-mode autodiff computes) *is*
the fast method. Forward mode (`jax.jvp`, `jax.jacfwd`) therefore works, and
the CPU/accelerator choice is `jax.lax.platform_dependent`, resolved when the
program is lowered: a program lowered for TPU on a CPU host contains only the
accelerator branch.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from msit_jax.ops.runtime import CONV_IMPLS, CPU_FFT_MIN_KERNEL, FFT_AUTO

Array = jax.Array
Precision = jax.lax.Precision


def smooth_size(n: int) -> int:
    """The smallest 2/3/5-smooth integer >= n (FFT lengths with small prime factors)."""
    m = max(int(n), 1)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def conv2d(x: Array, kernel: Array, bias: Optional[Array], *, groups: int = 1,
           padding: Optional[int] = None, precision: Precision = Precision.HIGHEST,
           fft_min_kernel: int = 0, impl: str = "auto") -> Array:
    """torch's Conv2d(stride=1, padding) in NHWC: x (B, H, W, Cin), kernel
    (k, k, Cin/groups, Cout), bias (Cout,) or None -> (B, H', W', Cout).

    padding defaults to k // 2 ('same'). fft_min_kernel: ungrouped 'same'
    convs with k >= it run as FFT products on every platform (the same sums,
    ~5e-7 relative rounding difference); 0 never; -1 (FFT_AUTO) on CPU from
    CPU_FFT_MIN_KERNEL, never on GPU/TPU.
    impl: 'auto' (per-platform kernel gradients, as above) or 'xla' (XLA's
    convolution and its autodiff on every platform: what GPUs and TPUs run;
    FFT only where fft_min_kernel > 0 asks for it).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl={impl!r}, expected one of {CONV_IMPLS}")
    k = kernel.shape[0]
    p = k // 2 if padding is None else padding
    kernel = kernel.astype(x.dtype)
    fft_ok = groups == 1 and p == k // 2
    if fft_ok and fft_min_kernel > 0 and k >= fft_min_kernel:
        y = conv2d_fft(x, kernel, precision)
    elif impl == "xla":
        y = lax_conv(x, kernel, groups, p, precision)
    elif fft_ok and fft_min_kernel == FFT_AUTO and k >= CPU_FFT_MIN_KERNEL:
        y = jax.lax.platform_dependent(
            x, kernel,
            cpu=lambda x, w: conv2d_fft(x, w, precision),
            default=lambda x, w: _conv(x, w, groups, p, precision))
    else:
        y = _conv(x, kernel, groups, p, precision)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def conv2d_fft(x: Array, kernel: Array, precision: Precision = Precision.HIGHEST) -> Array:
    """'same' cross-correlation of x (B, H, W, Cin) with kernel (k, k, Cin, Cout)
    as an rFFT product -> (B, H, W, Cout), computed in float32.

    FFT lengths are the 2/3/5-smooth sizes >= H + k - 1: the circular
    correlation then has no wrap-around at the H x W outputs. Gradients (both
    modes) follow by autodiff.
    """
    k = kernel.shape[0]
    p = k // 2
    h, w = x.shape[1], x.shape[2]
    size = (smooth_size(h + 2 * p), smooth_size(w + 2 * p))
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (p, p), (p, p), (0, 0)))
    xf = jnp.fft.rfft2(xp, s=size, axes=(1, 2))
    kf = jnp.fft.rfft2(kernel.astype(jnp.float32), s=size, axes=(0, 1))
    yf = jnp.einsum("byxi,yxio->byxo", xf, jnp.conj(kf), precision=precision)
    return jnp.fft.irfft2(yf, s=size, axes=(1, 2))[:, :h, :w].astype(x.dtype)


def lax_conv(x: Array, w: Array, groups: int, p: int, precision: Precision) -> Array:
    """XLA's convolution with symmetric zero padding p."""
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, w: Array, groups: int, p: int, precision: Precision) -> Array:
    return lax_conv(x, w, groups, p, precision)


def _conv_jvp(groups, p, precision, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = lax_conv(x, w, groups, p, precision)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(lax_conv(dx, w, groups, p, precision))
    if not isinstance(dw, SymbolicZero):
        terms.append(kernel_tangent(x, dw, groups, p, precision))
    if not terms:  # only reached if JAX asks for a rule with no tangent at all
        return y, jnp.zeros_like(y)
    return y, sum(terms[1:], terms[0])


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def cpu_kernel_method(shape: tuple, cin: int, groups: int, p: int) -> str:
    """The CPU kernel-gradient method for a conv of kernel `shape` (HWIO).

    Measured on 48x48 maps, batch 4 (the training shapes), 2 cores: 'dense'
    (one matmul, block diagonal when grouped) for 1x1; 'fft' for large kernels
    on few channels; 'shifts' (k*k matmuls) for small narrow kernels; 'xla'
    (XLA's own rule) otherwise, 3x3 included: alone, XLA's 3x3 kernel gradient
    costs what the shifts do (16-256 channels, within 5%), and in the paper train
    step it is cheaper (5.3 -> 4.6-4.7 CPU-s per step, 2026-12-03): the shifts'
    padded copy and nine windows, rematerialised, are extra work there.
    """
    k, _, _, cout = shape
    narrow = cin * cout <= 32 * 32
    if k == 1 and p == 0:
        return "dense"
    if groups == 1 and p == k // 2:
        if (k >= 9 and narrow) or k >= 15:
            return "fft"
        if 3 < k <= 7 and narrow:
            return "shifts"
    return "xla"


def kernel_tangent(x: Array, dw: Array, groups: int, p: int, precision: Precision) -> Array:
    """conv(x, dw), the conv's tangent in its kernel; linear in dw.

    Every platform computes the same linear map. The CPU form is chosen so
    that its transpose (the kernel gradient) is the fast method; it is
    rematerialised (`jax.checkpoint`), so the only residual kept for the
    backward pass is x, as for XLA's rule.
    """
    method = cpu_kernel_method(dw.shape, x.shape[-1], groups, p)
    xla = lambda x, dw: lax_conv(x, dw, groups, p, precision)
    if method == "xla":
        return xla(x, dw)
    cpu_form = {"dense": functools.partial(_dense_form, groups=groups),
                "shifts": functools.partial(_shifts_form, p=p),
                "fft": conv2d_fft}[method]
    cpu = jax.checkpoint(lambda x, dw: cpu_form(x, dw, precision=precision))
    return jax.lax.platform_dependent(x, dw, cpu=cpu, default=xla)


def _upcast(x: Array, dw: Array) -> tuple[Array, Array]:
    # XLA:CPU has no bf16 x bf16 -> f32 dot; float32 operands give float32 sums.
    return x.astype(jnp.float32), dw.astype(jnp.float32)


def _dense_form(x: Array, dw: Array, groups: int, precision: Precision) -> Array:
    """1x1 conv as x (BHW, Cin) @ D (Cin, Cout), D = block-diag(dw) when grouped.
    Transpose: dD = x^T g, one matmul, then its diagonal blocks."""
    dtype = x.dtype
    x, dw = _upcast(x, dw)
    cin, (cin_g, cout) = x.shape[-1], dw.shape[2:]
    d = dw[0, 0]
    if groups > 1:
        cout_g = cout // groups
        blocks = d.reshape(cin_g, groups, cout_g).transpose(1, 0, 2)  # (G, cin_g, cout_g)
        eye = jnp.eye(groups, dtype=d.dtype)
        # Elementwise, not a dot with the identity: exact at any precision.
        d = (blocks[:, :, None, :] * eye[:, None, :, None]).reshape(cin, cout)
    y = jnp.dot(x.reshape(-1, cin), d, precision=precision)
    return y.reshape(*x.shape[:-1], cout).astype(dtype)


def _shifts_form(x: Array, dw: Array, p: int, precision: Precision) -> Array:
    """sum over taps (i, j) of window_ij(x padded) @ dw[i, j].
    Transpose: dK[i, j] = window_ij^T g, one (Cin x Cout) matmul per tap."""
    dtype = x.dtype
    x, dw = _upcast(x, dw)
    k = dw.shape[0]
    h, w, cin = x.shape[1:]
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    y = None
    for i in range(k):
        for j in range(k):
            term = jnp.dot(xp[:, i:i + h, j:j + w].reshape(-1, cin), dw[i, j],
                           precision=precision)
            y = term if y is None else y + term
    return y.reshape(*x.shape[:-1], -1).astype(dtype)
