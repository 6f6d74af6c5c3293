"""Fast full-grid decoding: queries grouped by their nearest LR centre.

Computes exactly what `decoder.QueryDecoder` computes for every pixel of an HR
grid, re-associated so that the expensive part is shared:

* Every query whose nearest LR centre is p attends to the same 49 keys and
  values. The MLP's first layer acts linearly on the attention-weighted values,
      W1 . concat_{k,h}(attn[k,h] V[p+o_k, h]) = sum_{k,h} attn[k,h] (W1[k,h] V[p+o_k, h]),
  so Z[p, k, h] = W1[k,h] V[p+o_k, h] (49 x heads vectors of width 256) is
  computed once per centre and each query only mixes Z with its 49 x heads
  attention weights: ~0.1 M multiply-adds per query instead of 3.2 M, plus
  3.2 M per LR centre (a win for any scale above ~1.1).
* On a grid the geometry is separable: a query's key rows depend only on its
  HR row, key columns only on its HR column, and the positional bias is a
  per-row term plus a per-column term.

Query geometry (nearest centres, offsets) is computed on the host in numpy
float32 exactly as in `msit_jax.geometry`, so exact-tie queries pick the same
centre as the reference. Results match the per-query path to float32
re-association error (tested to 1e-5).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msit_jax import geometry, ops
from msit_jax.models.decoder import axis_posbias, posenc_frequencies
from msit_jax.models.layers import gelu
from msit_jax.ops.runtime import RuntimeOptions
from msit_jax.models.sampling import axis_taps


class AxisPlan(NamedTuple):
    """One axis of an HR grid grouped by nearest LR index (host arrays).

    coord:  (N,) HR pixel-centre coordinates.
    rel:    (N, 2r+1) (query - key) * n for the key offsets -r..r.
    groups: (n, G) HR indices whose nearest LR index is i, padded by repeating
            the group's first member; `valid` (n, G) marks the real ones.
    """

    coord: np.ndarray
    rel: np.ndarray
    groups: np.ndarray
    valid: np.ndarray


def plan_axis(n_hr: int, n_lr: int, radius: int) -> AxisPlan:
    """The plan of one HR axis of n_hr pixels over an LR axis of n_lr pixels."""
    coord, key_idx, rel = geometry.axis_geometry(n_hr, n_lr, radius)
    idx = geometry.nearest_index(coord, n_lr)
    # On a grid every query lies inside the image, so its nearest centre is valid
    # and key a sits at centre + a. Checked, not assumed: the keys came from the
    # reference's float32 arithmetic in `query_geometry`.
    if idx.min() < 0 or idx.max() >= n_lr or not np.array_equal(
            key_idx, idx[:, None] + np.arange(-radius, radius + 1)):
        raise AssertionError("grid geometry is not centre + offset; use the per-query decoder")
    counts = np.bincount(idx, minlength=n_lr)
    width = max(1, int(counts.max()))
    groups = np.zeros((n_lr, width), np.int32)
    valid = np.zeros((n_lr, width), bool)
    for i in np.nonzero(counts)[0]:
        members = np.nonzero(idx == i)[0]
        groups[i] = np.concatenate([members, np.full(width - len(members), members[0])])
        valid[i, :len(members)] = True
    return AxisPlan(coord, rel, groups, valid)


def split_decoder_params(params: Any, cfg: ml_collections.ConfigDict) -> dict:
    """The decoder's weights, with the first MLP layer split by (key, head)."""
    dec = params["decoder"]["query"]
    mlp = dec["mlp"]
    n_keys = (2 * cfg.radius + 1) ** 2
    hd = cfg.dim // cfg.heads
    w1 = mlp["layers_0"]["kernel"]
    layers = [mlp[f"layers_{2 * i}"] for i in range(1, len(cfg.mlp_hidden) + 1)]
    return dict(
        w1=w1[:n_keys * cfg.dim].reshape(n_keys, cfg.heads, hd, -1),
        w1_cell=w1[n_keys * cfg.dim:],  # (2, hidden) when use_cell, else (0, hidden)
        b1=mlp["layers_0"]["bias"],
        rest=[(l["kernel"], l["bias"]) for l in layers],
        pb_kernel=dec["pb_proj"]["kernel"],
        pb_bias=dec["pb_proj"]["bias"],
    )


def _gather_neighbours(feat: jax.Array, ci: jax.Array, cj: jax.Array, radius: int) -> jax.Array:
    """feat (h, w, D) around centres (P,) -> (P, (2r+1)^2, D), zeros outside."""
    h, w = feat.shape[:2]
    off = jnp.arange(-radius, radius + 1)
    ny, nx = ci[:, None] + off, cj[:, None] + off  # (P, 2r+1)
    vy, vx = (ny >= 0) & (ny < h), (nx >= 0) & (nx < w)
    vals = feat[jnp.clip(ny, 0, h - 1)[:, :, None], jnp.clip(nx, 0, w - 1)[:, None, :]]
    mask = (vy[:, :, None] & vx[:, None, :]).astype(feat.dtype)
    return (vals * mask[..., None]).reshape(ci.shape[0], -1, feat.shape[-1])


def _bilinear_grid(img: jax.Array, cy: jax.Array, cx: jax.Array, border: bool) -> jax.Array:
    """Bilinear samples of img (h, w, C) at the grid cy (P, R) x cx (P, C') -> (P, R, C', C)."""
    h, w = img.shape[:2]
    iy, wy = jax.vmap(jax.vmap(lambda c: axis_taps(c, h, border)))(cy)  # (P, R, 2) each
    ix, wx = jax.vmap(jax.vmap(lambda c: axis_taps(c, w, border)))(cx)
    out = 0.0
    for a in range(2):
        for b in range(2):
            vals = img[iy[:, :, None, a], ix[:, None, :, b]]  # (P, R, C', C)
            out = out + (wy[:, :, None, a] * wx[:, None, :, b])[..., None].astype(img.dtype) * vals
    return out


class _Centres(NamedTuple):
    """Where the queries of P LR centres sit (device arrays, all int32 but cy, cx).

    ci, cj (P,): each centre's LR row / column; ry (P, Gy), rx (P, Gx): its HR
    rows / columns (padded groups); cy (P, Gy), cx (P, Gx): their coordinates.
    """

    ci: jax.Array
    cj: jax.Array
    ry: jax.Array
    rx: jax.Array
    cy: jax.Array
    cx: jax.Array


def _first_layer_einsum(c: _Centres, feat_q: jax.Array, feat_v: jax.Array, pb_rows: jax.Array,
                        pb_cols: jax.Array, pb_bias: jax.Array, w1: jax.Array, *, heads: int,
                        radius: int, dtype: Any, prec: jax.lax.Precision) -> jax.Array:
    """Attention over the 49 neighbours and the MLP's first layer (without its bias)
    for every query of P centres: sum_{k,h} attn[p, y, x, k, h] Z[p, k, h] with
    Z[p, k, h] = W1[k, h] . V[p + o_k, h]. -> (P, Gy, Gx, N) float32.

    feat_q, feat_v (h, w, D); pb_rows (N_hr_rows, K1, heads), pb_cols likewise;
    pb_bias (heads,); w1 (K, heads, hd, N). Z is formed once per centre (P x K x
    heads x N values) and mixed by one contraction: large dots, the accelerators'
    form.
    """
    p, gy, gx = c.ry.shape[0], c.ry.shape[1], c.rx.shape[1]
    hd = feat_q.shape[-1] // heads
    k1 = 2 * radius + 1
    keys = _gather_neighbours(feat_q, c.ci, c.cj, radius).reshape(p, k1 * k1, heads, hd)
    vals = _gather_neighbours(feat_v, c.ci, c.cj, radius).reshape(p, k1 * k1, heads, hd)
    q = _bilinear_grid(feat_q, c.cy, c.cx, border=False).reshape(p, gy, gx, heads, hd)
    logits = ops.einsum("pyxhc,pkhc->pyxkh", q.astype(dtype), keys.astype(dtype),
                        prec) / np.float32(np.sqrt(hd))
    bias = (pb_rows[c.ry][:, :, None, :, None, :] + pb_cols[c.rx][:, None, :, None, :, :]
            ).reshape(p, gy, gx, k1 * k1, heads) + pb_bias
    attn = jax.nn.softmax(logits + bias, axis=3)
    z = ops.einsum("pkhc,khcn->pkhn", vals.astype(dtype), w1.astype(dtype), prec)
    return ops.einsum("pyxkh,pkhn->pyxn", attn.astype(dtype), z.astype(dtype), prec)


def _first_layer_head_major(c: _Centres, feat_q: jax.Array, feat_v: jax.Array,
                            pb_rows: jax.Array, pb_cols: jax.Array, pb_bias: jax.Array,
                            w1: jax.Array, *, heads: int, radius: int, dtype: Any,
                            prec: jax.lax.Precision) -> jax.Array:
    """`_first_layer_einsum` laid out for XLA:CPU: the same values, re-associated.

    * The maps are made head-major (heads, h, w, hd) once, so queries, keys and
      values are gathered straight into the layouts of their contractions: the
      logits are one dot batched over (head, centre) and need no transposed copy
      of the sampled queries or keys (on XLA:CPU those copies, strided gathers on
      one thread, cost more than the dots).
    * The first layer runs one neighbour offset k at a time (a scan): per head,
      Z[:, k, h] is one plain 2-D GEMM (P, hd) x (hd, N), accumulated into the
      result with its attention weights right away, so the (P, K, heads, N) array
      of Z (103 MB at the paper's size and 256 centres) is never written nor laid
      out again for a batched small-K contraction.
    Float32 sums in another order; in bfloat16, the same operands are rounded
    (Z included) and the products are exact in float32, as in the einsum form.
    """
    p, gy, gx = c.ry.shape[0], c.ry.shape[1], c.rx.shape[1]
    h, w, dim = feat_q.shape
    hd, k1 = dim // heads, 2 * radius + 1
    n_keys, g = k1 * k1, gy * gx

    def head_major(f):  # (h, w, D) -> (heads, h + 2r, w + 2r, hd), zeros around
        f = f.reshape(h, w, heads, hd).transpose(2, 0, 1, 3)
        return jnp.pad(f, ((0, 0), (radius, radius), (radius, radius), (0, 0)))

    fq, fv = head_major(feat_q), head_major(feat_v)
    off = jnp.arange(k1)
    # Padded-map rows / columns of each centre's k1 x k1 keys, flattened: (P, K).
    ky = jnp.broadcast_to((c.ci[:, None] + off)[:, :, None], (p, k1, k1)).reshape(p, n_keys)
    kx = jnp.broadcast_to((c.cj[:, None] + off)[:, None, :], (p, k1, k1)).reshape(p, n_keys)
    keys = fq[:, ky, kx].astype(dtype)  # (heads, P, K, hd)
    vals = fv[:, ky.T, kx.T].astype(dtype)  # (heads, K, P, hd)
    # Bilinear query samples per head, from the unpadded interior (zero padding).
    interior = fq[:, radius:radius + h, radius:radius + w]
    q = jax.vmap(lambda m: _bilinear_grid(m, c.cy, c.cx, border=False))(interior)
    q = q.reshape(heads, p, g, hd)  # (heads, P, Gy x Gx, hd)

    logits = ops.einsum("hpgc,hpkc->hpgk", q.astype(dtype), keys, prec) / np.float32(np.sqrt(hd))
    bias = (pb_rows[c.ry].transpose(3, 0, 1, 2)[:, :, :, None, :, None]
            + pb_cols[c.rx].transpose(3, 0, 1, 2)[:, :, None, :, None, :]
            ).reshape(heads, p, g, n_keys) + pb_bias[:, None, None, None]
    attn = jax.nn.softmax(logits + bias, axis=-1).astype(dtype)  # (heads, P, G, K)

    def offset(y, xs):
        k, w_k = xs
        a_k = jax.lax.dynamic_index_in_dim(attn, k, axis=3, keepdims=False)  # (heads, P, G)
        v_k = jax.lax.dynamic_index_in_dim(vals, k, axis=1, keepdims=False)  # (heads, P, hd)
        for hh in range(heads):
            z = ops.dot(v_k[hh], w_k[hh], prec).astype(dtype).astype(jnp.float32)  # (P, N)
            y = y + a_k[hh][:, :, None].astype(jnp.float32) * z[:, None, :]
        return y, None

    y0 = jnp.zeros((p, g, w1.shape[-1]), jnp.float32)
    y, _ = jax.lax.scan(offset, y0, (jnp.arange(n_keys), w1.astype(dtype)))
    return y.reshape(p, gy, gx, -1)


@functools.partial(jax.jit, static_argnames=("cfg", "runtime"))
def decode_centres(cfg: ml_collections.FrozenConfigDict, runtime: RuntimeOptions, dec: dict,
                   feat_q: jax.Array, feat_v: jax.Array, inp: jax.Array, rows: tuple,
                   cols: tuple, pb_rows: jax.Array, pb_cols: jax.Array, rel_cell: jax.Array,
                   centres: jax.Array) -> jax.Array:
    """Predictions for every query of P LR centres.

    feat_q, feat_v (h, w, D); inp (h, w, 3); rows / cols: (coord (N,), groups
    (n, G)) per axis; pb_rows (N_hr_rows, K1, heads), pb_cols likewise;
    rel_cell (2,); centres (P,) flat LR indices. Returns (P, Gy, Gx, 3).
    Every contraction accumulates in float32; in bfloat16 the operands of the
    three large ones (first layer, attention logits, attention mix) and of the
    MLP are bf16.
    """
    prec = runtime.lax_precision
    dtype = runtime.compute_dtype
    h, w, dim = feat_q.shape
    heads, r = cfg.heads, cfg.radius
    ci, cj = centres // w, centres % w
    ry, rx = rows[1][ci], cols[1][cj]  # (P, Gy), (P, Gx) HR indices
    c = _Centres(ci, cj, ry, rx, rows[0][ry], cols[0][rx])
    kw = dict(heads=heads, radius=r, dtype=dtype, prec=prec)
    y = jax.lax.platform_dependent(
        c, feat_q, feat_v, pb_rows, pb_cols, dec["pb_bias"], dec["w1"],
        cpu=functools.partial(_first_layer_head_major, **kw),
        default=functools.partial(_first_layer_einsum, **kw))
    y = y + dec["b1"]
    if dec["w1_cell"].shape[0]:  # use_cell
        y = y + jnp.dot(rel_cell, dec["w1_cell"], precision=prec)
    for kernel, bias_ in dec["rest"]:
        y = ops.dot(gelu(y).astype(dtype), kernel.astype(dtype), prec) + bias_
    return y + _bilinear_grid(inp, c.cy, c.cx, border=True)


@functools.partial(jax.jit, static_argnames=("cfg", "runtime"))
def axis_biases(cfg: ml_collections.FrozenConfigDict, runtime: RuntimeOptions, dec: dict,
                rel_rows: jax.Array, rel_cols: jax.Array) -> tuple[jax.Array, jax.Array]:
    prec = runtime.lax_precision
    freqs = jnp.asarray(posenc_frequencies(cfg.posenc_scale, cfg.posenc_dims))
    return (axis_posbias(rel_rows, dec["pb_kernel"], freqs, 0, prec),
            axis_posbias(rel_cols, dec["pb_kernel"], freqs, 1, prec))
