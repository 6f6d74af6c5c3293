"""Contractions with float32 accumulation on every backend.

bf16 x bf16 products accumulate and return float32 on GPU and TPU
(`preferred_element_type`). XLA:CPU has no bf16 x bf16 -> f32 dot, so the CPU
branch upcasts the operands first: the same products (a bf16 product is exact
in float32) and float32 sums, so CPU tests exercise the accelerator numerics.
The branch is picked when the program is lowered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _low(*xs) -> bool:
    return any(jnp.dtype(x.dtype) != jnp.float32 for x in xs)


def einsum(spec: str, a: Array, b: Array, precision: jax.lax.Precision) -> Array:
    """jnp.einsum of two operands with a float32 result (and accumulation)."""
    if not _low(a, b):
        return jnp.einsum(spec, a, b, precision=precision)

    def upcast(a, b):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32),
                          precision=precision)

    def native(a, b):
        return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)

    return jax.lax.platform_dependent(a, b, cpu=upcast, default=native)


def dot(a: Array, b: Array, precision: jax.lax.Precision) -> Array:
    """a (..., K) @ b (K, N) -> (..., N) float32."""
    if not _low(a, b):
        return jnp.dot(a, b, precision=precision)

    def upcast(a, b):
        return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=precision)

    def native(a, b):
        return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)

    return jax.lax.platform_dependent(a, b, cpu=upcast, default=native)
