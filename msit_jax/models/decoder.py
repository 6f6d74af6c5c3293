"""Local implicit decoder (MSSA + MLP), written for one query and lifted with vmap.

For a query x_q with host-computed geometry (`msit_jax.geometry.QueryGeometry`):
  Q   = bilinear(feat_q, x_q)                          (dim,)   zero padding
  K,V = nearest(feat_q / feat_v, 7x7 keys around c_q)  (49, dim) zeros outside
  attn = softmax_49(Q.K / sqrt(dim / heads) + posbias(rel))   per head
  out = MLP([attn-weighted V (49 * dim), rel_cell (2)]) + bilinear_border(inp, x_q)
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msit_jax import ops
from msit_jax.geometry import QueryGeometry
from msit_jax.models import sampling
from msit_jax.models.layers import gelu, torch_default_bias_init, torch_default_kernel_init
from msit_jax.ops.runtime import RuntimeOptions

Array = jax.Array


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: symmetric, filled from both ends (differs from numpy's by 1 ulp)."""
    step = np.float32((end - start) / (steps - 1))
    i = np.arange(steps, dtype=np.float32)
    half = steps // 2
    return np.where(np.arange(steps) < half,
                    np.float32(start) + step * i,
                    np.float32(end) - step * (np.float32(steps - 1) - i)).astype(np.float32)


def posenc_frequencies(posenc_scale: float, dims: int) -> np.ndarray:
    """The sinusoid frequencies b_k = 2**linspace(0, posenc_scale, dims // 4) - 1: (dims // 4,).

    posenc_scale is the log2 range of the frequencies (config `posenc_scale`), not
    the SR factor."""
    return (np.exp2(torch_linspace(0.0, posenc_scale, dims // 4)) - np.float32(1)
            ).astype(np.float32)


def axis_posbias(rel: jax.Array, pb_kernel: jax.Array, freqs: jax.Array, axis: int,
                 precision) -> jax.Array:
    """Positional-bias share of one axis: rel (N, 2r+1) -> (N, 2r+1, heads).

    The bias input is [sin y*b, sin x*b, cos y*b, cos x*b]; its Linear splits
    into a row term and a column term (the Linear's bias is added once, later).
    """
    f = freqs.shape[0]
    ang = rel[..., None] * freqs
    w_sin = pb_kernel[axis * f:(axis + 1) * f]
    w_cos = pb_kernel[(2 + axis) * f:(3 + axis) * f]
    return (jnp.dot(jnp.sin(ang), w_sin, precision=precision)
            + jnp.dot(jnp.cos(ang), w_cos, precision=precision))


class Dense(nn.Module):
    """torch.nn.Linear (torch default init); kernel is (in, out).

    `x` may be a tuple of parts whose concatenation is the input: each part
    meets its own rows of the kernel, so the concatenated input is never
    materialised (the decoder's first layer would otherwise copy a
    (queries, 12546) array to append two cell values).
    """

    features: int
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x) -> Array:
        dtype, precision = self.runtime.compute_dtype, self.runtime.lax_precision
        parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        fan_in = sum(part.shape[-1] for part in parts)
        kernel = self.param("kernel", torch_default_kernel_init(), (fan_in, self.features),
                            jnp.float32)
        bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,), jnp.float32)
        kernel = kernel.astype(dtype)
        y, start = None, 0
        for part in parts:
            n = part.shape[-1]
            part = part.astype(dtype)
            rows = kernel[start:start + n]
            term = ops.dot(part, rows, precision)
            y = term if y is None else y + term
            start += n
        return y + bias


class MLP(nn.Module):
    """Linear layers with exact GELU between; names mirror torch's Sequential indices."""

    hidden: Sequence[int]
    out_dim: int = 3
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x) -> Array:
        """x: (in,) or a tuple of parts whose concatenation is the input."""
        for i, h in enumerate(self.hidden):
            x = gelu(Dense(h, self.runtime, name=f"layers_{2 * i}")(x))
        return Dense(self.out_dim, self.runtime, name=f"layers_{2 * len(self.hidden)}")(x)


class PositionalBias(nn.Module):
    """Linear(posenc(rel)) for the (2r+1)^2 keys: (2r+1,), (2r+1,) -> ((2r+1)^2, heads).

    The encoding of key (i, j) is [sin(y_i b), sin(x_j b), cos(y_i b), cos(x_j b)],
    so the Linear splits into a row term plus a column term; evaluating it that
    way costs 2(2r+1) small products instead of (2r+1)^2. Parameters are those
    of torch's Linear(posenc_dims, heads).
    """

    heads: int
    posenc_scale: float
    posenc_dims: int
    runtime: RuntimeOptions = RuntimeOptions()  # its precision; the bias is float32

    @nn.compact
    def __call__(self, rel_y: Array, rel_x: Array) -> Array:
        dims = self.posenc_dims
        kernel = self.param("kernel", torch_default_kernel_init(), (dims, self.heads),
                            jnp.float32)
        bias = self.param("bias", torch_default_bias_init(dims), (self.heads,), jnp.float32)
        freqs = jnp.asarray(posenc_frequencies(self.posenc_scale, dims))
        prec = self.runtime.lax_precision
        row = axis_posbias(rel_y, kernel, freqs, 0, prec)
        col = axis_posbias(rel_x, kernel, freqs, 1, prec)
        return (row[:, None, :] + col[None, :, :] + bias).reshape(-1, self.heads)


class QueryDecoder(nn.Module):
    """Decodes ONE query. Lifted to (B, Q) queries by `BatchedDecoder`.

    Inputs (one image's maps, one query's geometry):
      feat_q (H, W, dim), feat_v (H, W, dim), inp (H, W, 3) normalised LR,
      geom: QueryGeometry of one query: coord (2,), key_idx (2, 2r+1) int32,
      rel (2, 2r+1), rel_cell (2,).
    Returns (3,) in normalised space.
    """

    heads: int
    posenc_scale: float
    posenc_dims: int
    mlp_hidden: Sequence[int]
    use_cell: bool = True
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, feat_q: Array, feat_v: Array, inp: Array, geom: QueryGeometry) -> Array:
        coord, key_idx, rel = geom.coord, geom.key_idx, geom.rel
        dim = feat_q.shape[-1]
        hd = dim // self.heads
        n_keys = key_idx.shape[-1] ** 2

        q = sampling.bilinear(feat_q, coord).reshape(self.heads, hd)
        k, valid = sampling.nearest_clipped(feat_q, key_idx[0], key_idx[1])
        v, _ = sampling.nearest_clipped(feat_v, key_idx[0], key_idx[1])
        k = k.reshape(n_keys, self.heads, hd)
        v = v.reshape(n_keys, self.heads, hd)
        valid = valid.reshape(n_keys, 1)

        pos_bias = PositionalBias(self.heads, self.posenc_scale, self.posenc_dims,
                                  self.runtime, name="pb_proj")(rel[0], rel[1])

        # A key outside the image is a zero vector in the reference: its logit
        # is exactly 0 (+ bias) and its value contributes exactly 0.
        logits = ops.einsum("hc,khc->kh", q, k, self.runtime.lax_precision)
        logits = jnp.where(valid, logits, 0.0) / np.float32(np.sqrt(hd))
        attn = jax.nn.softmax(logits + pos_bias, axis=0)  # over the keys
        attn = jnp.where(valid, attn, 0.0)
        feat_in = (v * attn[..., None].astype(v.dtype)).reshape(-1)
        if self.use_cell:
            feat_in = (feat_in, geom.rel_cell)
        pred = MLP(tuple(self.mlp_hidden), 3, self.runtime, name="mlp")(feat_in)
        return pred + sampling.bilinear(inp, coord, border=True)


class BatchedDecoder(nn.Module):
    """QueryDecoder over (B, Q) queries: vmap over queries, then over images.

    feat_q, feat_v: (B, H, W, dim); inp (B, H, W, 3); geom: QueryGeometry with
    coord (B, Q, 2), key_idx (B, Q, 2, 2r+1), rel (B, Q, 2, 2r+1), rel_cell (B, 2)
    -> (B, Q, 3).

    runtime.remat_decoder > 0: the queries run in chunks of that many (a scan; the last chunk
    padded by repeating the last query), each chunk recomputed in the backward pass
    (`nn.remat`). Only one chunk's activations (its (B, chunk, 49 * dim) MLP input
    and K/V neighbourhoods) are then alive at a time in the backward; the outputs
    and parameters are those of the unchunked decoder.
    """

    heads: int
    posenc_scale: float
    posenc_dims: int
    mlp_hidden: Sequence[int]
    use_cell: bool = True
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, feat_q: Array, feat_v: Array, inp: Array, geom: QueryGeometry) -> Array:
        # rel_cell is per image: shared by the queries of one image.
        query_axes = QueryGeometry(coord=0, key_idx=0, rel=0, rel_cell=None)
        per_query = nn.vmap(QueryDecoder, in_axes=(None, None, None, query_axes),
                            variable_axes={"params": None}, split_rngs={"params": False})
        per_image = nn.vmap(per_query, in_axes=(0, 0, 0, 0),
                            variable_axes={"params": None}, split_rngs={"params": False})
        decoder = per_image(self.heads, self.posenc_scale, self.posenc_dims,
                            tuple(self.mlp_hidden), self.use_cell, self.runtime, name="query")
        chunk = self.runtime.remat_decoder
        if not chunk:
            return decoder(feat_q, feat_v, inp, geom)
        return _chunked(decoder, int(chunk), feat_q, feat_v, inp, geom)


def _chunked(decoder: nn.Module, chunk: int, feat_q: Array, feat_v: Array, inp: Array,
             geom: QueryGeometry) -> Array:
    """`decoder` over query chunks: a scan of rematerialised chunk decodes, with the
    decoder's parameters (and their path) shared by every chunk."""
    b, q = geom.coord.shape[:2]
    c = min(chunk, q)
    n = -(-q // c)

    def split(x: Array) -> Array:  # (B, Q, ...) -> (n, B, c, ...)
        if n * c > q:
            x = jnp.concatenate([x, jnp.repeat(x[:, -1:], n * c - q, axis=1)], axis=1)
        return jnp.swapaxes(x.reshape((b, n, c) + x.shape[2:]), 0, 1)

    def body(module, carry, xs):
        coord, key_idx, rel = xs
        return carry, module(feat_q, feat_v, inp, QueryGeometry(coord, key_idx, rel,
                                                                geom.rel_cell))

    scan = nn.scan(nn.remat(body), variable_broadcast="params", split_rngs={"params": False},
                   length=n)
    _, out = scan(decoder, None, (split(geom.coord), split(geom.key_idx), split(geom.rel)))
    return jnp.swapaxes(out, 0, 1).reshape(b, n * c, -1)[:, :q]
