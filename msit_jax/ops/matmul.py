"""Contractions with float32 accumulation on every backend.

bf16 x bf16 products accumulate and return float32 on GPU and TPU
(`preferred_element_type`). XLA:CPU has no bf16 x bf16 -> f32 dot, so the CPU
branch upcasts the operands first: the same products (a bf16 product is exact
in float32) and float32 sums, so CPU tests exercise the accelerator numerics.
The branch is picked when the program is lowered.

Backward in the compute dtype. When both operands are in a low-precision
compute dtype (bf16), the float32 cotangent of the result is rounded to that
dtype before the two backward contractions, which then run bf16 x bf16 with
float32 accumulation like the forward. Left to autodiff, they would be
f32 x bf16 dots: on a TPU at `HIGHEST` that is the 6-pass float32 algorithm for
operands whose other side has no low bits (predicted 31% of the bf16 train
step, the decoder MLP's backward). The operand cotangents are returned in the
operands' dtype, as autodiff returns them. The cost is one bf16 rounding of
each cotangent (relative error 2^-9), the mixed-precision convention of
bf16 training; float32 programs are unchanged.
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


def _split(spec: str) -> tuple[str, str, str]:
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


def _transposable(spec: str) -> bool:
    """Each operand's cotangent is one einsum of the result's cotangent with the other
    operand: every index of an operand appears in the result or the other operand,
    and no index repeats within an operand (no traces, no diagonals)."""
    a, b, out = _split(spec)
    return (len(set(a)) == len(a) and len(set(b)) == len(b)
            and set(a) <= set(out) | set(b) and set(b) <= set(out) | set(a))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum_low_backward(spec: str, precision: jax.lax.Precision, a: Array, b: Array) -> Array:
    return _einsum_f32(spec, a, b, precision)


def _fwd(spec, precision, a, b):
    return _einsum_f32(spec, a, b, precision), (a, b)


def _bwd(spec, precision, res, g):
    a, b = res
    sa, sb, so = _split(spec)
    g = g.astype(a.dtype)  # both operands share the low dtype (see einsum)
    da = _einsum_f32(f"{so},{sb}->{sa}", g, b, precision).astype(a.dtype)
    db = _einsum_f32(f"{so},{sa}->{sb}", g, a, precision).astype(b.dtype)
    return da, db


_einsum_low_backward.defvjp(_fwd, _bwd)


def einsum(spec: str, a: Array, b: Array, precision: jax.lax.Precision) -> Array:
    """jnp.einsum of two operands with a float32 result (and accumulation); with both
    operands in one low-precision dtype, the backward runs in that dtype too (above)."""
    low = jnp.dtype(a.dtype)
    if (low != jnp.float32 and jnp.dtype(b.dtype) == low
            and jnp.issubdtype(low, jnp.floating) and _transposable(spec)):
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
