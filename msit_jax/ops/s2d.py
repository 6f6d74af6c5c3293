"""A large-kernel 'same' convolution as a space-to-depth convolution (for MXUs).

MSNO's scale heads are 16 -> 16-channel convs with kernels 3..33. On a TPU a
convolution's output features are the MXU's columns, so N = 16 fills 1/8 of a
128-wide array whatever the kernel size (BENCHMARKS.md, bottleneck 1). Folding
each s x s pixel block into channels turns the conv into one on an (H/s, W/s)
grid with s^2 * Cin inputs and s^2 * Cout outputs (256 at s = 4), a kernel of
ceil-ish (k + s - 1) / s blocks, and the same sums:

    y[s*i + a, s*j + b, o] = sum_{m, n, (a', b', c)} xs[i + m, j + n, (a', b', c)]
                             * K'[m, n, (a', b', c), (a, b, o)]
    K'[m, n, (a', b', c), (a, b, o)] = w[s*m + a' - a + p, s*n + b' - b + p, c, o]
                                       (zero outside the k x k kernel)

where xs is x zero-padded at the bottom/right to multiples of s and folded
into blocks, p = k // 2. The MACs grow by the zero taps of K' (about 1.2x at
k = 33, 1.4x at 17, 1.8x at 9, 5-7x below 9); products are the same, sums are
in another order (float32 rounding differences only).

The kernel transform is a gather of the weight (weight-sized, inside the
program), so gradients reach `w` by autodiff; x's by XLA's conv transpose.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


Array = jax.Array
Precision = jax.lax.Precision

BLOCK = 4  # 4 x 4 blocks: 16 x 16 = 256 output features, a v5e/v4 MXU's 128 twice over


@functools.lru_cache(maxsize=None)
def block_taps(k: int, s: int) -> tuple[np.ndarray, int, int]:
    """(index, lo, hi) for one axis of a k-tap 'same' conv on s-pixel blocks.

    index (kb, s, s) int: the tap of w at block offset m (from lo), input phase a'
    and output phase a, or k (a zero tap) where that offset is outside the kernel;
    lo <= 0 and hi the block offsets of the first and last block row (kb = hi - lo + 1),
    i.e. the block conv's padding (-lo, hi)."""
    p = k // 2
    lo, hi = -((p + s - 1) // s), (s - 1 + p) // s
    m = np.arange(lo, hi + 1)[:, None, None]
    a_in = np.arange(s)[None, :, None]
    a_out = np.arange(s)[None, None, :]
    d = s * m + a_in - a_out  # the input offset dy of that tap
    index = np.where(np.abs(d) <= p, d + p, k)
    return index.astype(np.int32), int(lo), int(hi)


def block_kernel(w: Array, s: int = BLOCK) -> Array:
    """(k, k, Cin, Cout) -> (kb, kb, s*s*Cin, s*s*Cout), channels ordered (a, b, c)."""
    k, _, cin, cout = w.shape
    index, _, _ = block_taps(k, s)
    kb = index.shape[0]
    wz = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))  # tap k is zero
    iy = index[:, :, :, None, None, None]  # (m, a', a, 1, 1, 1)
    ix = index[None, None, None, :, :, :]  # (1, 1, 1, n, b', b)
    kk = wz[iy, ix]  # (m, a', a, n, b', b, Cin, Cout)
    kk = jnp.transpose(kk, (0, 3, 1, 4, 6, 2, 5, 7))  # (m, n, a', b', c, a, b, o)
    return kk.reshape(kb, kb, s * s * cin, s * s * cout)


def space_to_depth(x: Array, s: int) -> Array:
    """(B, H, W, C), H and W multiples of s -> (B, H/s, W/s, s*s*C), channels (a, b, c)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // s, w // s, s * s * c)


def depth_to_space(x: Array, s: int) -> Array:
    """The inverse of space_to_depth."""
    b, hb, wb, cs = x.shape
    c = cs // (s * s)
    x = x.reshape(b, hb, wb, s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hb * s, wb * s, c)


def conv2d_s2d(x: Array, kernel: Array, precision: Precision = Precision.HIGHEST,
               s: int = BLOCK) -> Array:
    """'same' cross-correlation, x (B, H, W, Cin) with kernel (k, k, Cin, Cout), k odd,
    computed on s x s pixel blocks (module doc) -> (B, H, W, Cout), x's dtype."""
    k = kernel.shape[0]
    if k % 2 == 0 or kernel.shape[1] != k:
        raise ValueError(f"space-to-depth conv needs an odd square kernel, got {kernel.shape}")
    _, h, w, _ = x.shape
    hp, wp = -(-h // s) * s, -(-w // s) * s
    xs = space_to_depth(jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0))), s)
    _, lo, hi = block_taps(k, s)
    y = jax.lax.conv_general_dilated(
        xs, block_kernel(kernel.astype(x.dtype), s), window_strides=(1, 1),
        padding=((-lo, hi), (-lo, hi)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision)
    return depth_to_space(y, s)[:, :h, :w]


__all__ = ["BLOCK", "block_kernel", "block_taps", "conv2d_s2d", "depth_to_space",
           "space_to_depth"]
