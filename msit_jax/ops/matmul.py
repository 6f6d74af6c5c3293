"""Contractions with float32 accumulation on every backend.

bf16 x bf16 products accumulate and return float32 on GPU and TPU
(`preferred_element_type`). XLA:CPU has no bf16 x bf16 -> f32 dot, so the CPU
branch upcasts the operands first: the same products (a bf16 product is exact
in float32) and float32 sums, so CPU tests exercise the accelerator numerics.
The branch is picked when the program is lowered.

Backward in the compute dtype. When both operands are in a low-precision
compute dtype (bf16), the float32 cotangent of the result is rounded to that
dtype once, and the two backward contractions run low x low with a low-dtype
result (the operands' cotangent dtype anyway; TPU MXUs and cuBLAS's default
bf16 compute type accumulate in float32, and the CPU branch sums in float32). Left
to autodiff, they would be f32 x bf16 dots: on a TPU at `HIGHEST`, the 6-pass
float32 algorithm for operands whose other side has no low bits (predicted 31%
of the bf16 train step, the decoder MLP's backward). The cost is one bf16
rounding of each cotangent (relative 2^-9), the mixed-precision convention of
bf16 training; float32 programs are unchanged. It is written as a JVP rule
whose tangent terms are low-dtype contractions, which JAX transposes (see
`_jvp`); forward-mode tangents are rounded to the low dtype likewise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _low(*xs) -> bool:
    return any(jnp.dtype(x.dtype) != jnp.float32 for x in xs)


def _einsum_f32(spec: str, a: Array, b: Array, precision: jax.lax.Precision) -> Array:
    """The forward contraction: float32 result and accumulation, per platform."""
    if not _low(a, b):
        return jnp.einsum(spec, a, b, precision=precision)

    def upcast(a, b):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32),
                          precision=precision)

    def native(a, b):
        return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)

    return jax.lax.platform_dependent(a, b, cpu=upcast, default=native)


def _einsum_to(spec: str, a: Array, b: Array, precision: jax.lax.Precision, dtype) -> Array:
    """The contraction with a `dtype` result (float32 accumulation), per platform."""
    def upcast(a, b):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32),
                          precision=precision).astype(dtype)

    def native(a, b):
        return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=dtype)

    return jax.lax.platform_dependent(a, b, cpu=upcast, default=native)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _einsum_low_backward(spec: str, precision: jax.lax.Precision, a: Array, b: Array) -> Array:
    return _einsum_f32(spec, a, b, precision)


@_einsum_low_backward.defjvp
def _jvp(spec, precision, primals, tangents):
    # A JVP rule, not a VJP rule: JAX transposes it, so under vmap (the per-query
    # decoder) an unbatched operand's cotangent stays one contraction over the batch
    # axes instead of per-example outer products summed afterwards. Each tangent term
    # is a low-dtype contraction; transposed, the result cotangent is rounded to the
    # low dtype once and each operand's cotangent is a low x low -> low dot.
    a, b = primals
    ta, tb = tangents
    low = a.dtype
    out = _einsum_f32(spec, a, b, precision)
    t = (_einsum_to(spec, ta, b, precision, low).astype(jnp.float32)
         + _einsum_to(spec, a, tb, precision, low).astype(jnp.float32))
    return out, t


def einsum(spec: str, a: Array, b: Array, precision: jax.lax.Precision) -> Array:
    """jnp.einsum of two operands with a float32 result (and accumulation); with both
    operands in one low-precision dtype, the backward runs in that dtype too (above)."""
    low = jnp.dtype(a.dtype)
    if (low != jnp.float32 and jnp.dtype(b.dtype) == low
            and jnp.issubdtype(low, jnp.floating)):
        return _einsum_low_backward(spec, precision, a, b)
    return _einsum_f32(spec, a, b, precision)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def dot(a: Array, b: Array, precision: jax.lax.Precision) -> Array:
    """a (..., K) @ b (K, N) -> (..., N) float32."""
    if not _low(a, b):
        return jnp.dot(a, b, precision=precision)
    if a.ndim < 1 or b.ndim != 2 or a.ndim > len(_LETTERS) - 2:
        raise ValueError(f"dot expects a (..., K) and b (K, N), got {a.shape} and {b.shape}")
    batch = _LETTERS[:a.ndim - 1]
    return einsum(f"{batch}y,yz->{batch}z", a, b, precision)
