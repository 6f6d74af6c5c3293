"""The SwinIR encoder (msit_jax.models.swinir) as ONNX nodes, op by op as the Flax module.

    swinir_graph(g, x, sub, params)    x (1, 3, h, w) NCHW -> (1, num_feat, h, w)

`g` is `msit_jax.export.onnx_graph._GraphOps`; h and w are dynamic, so the padding, the
window partition and the shifted-window mask are computed in the graph from the
runtime sizes (Shape / Gather / integer arithmetic). The token stream is kept
NHWC, (1, Hp, Wp, C), where LayerNorm and the (in, out) Linear kernels apply
directly; the convs transpose to NCHW and back.

Only numpy is imported here: the nodes are made by `g`, which imports onnx where
a graph is built (this module is imported by the registry, `_swinir_graph`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from msit_jax.models.swinir import (CONV3_SLOPE, LN_EPS, MASK_VALUE, OUT_SLOPE,
                                    relative_position_index)

f32 = np.float32
NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


class _Sizes:
    """Runtime sizes of the padded map: hp, wp and the window counts nh, nw (int64
    scalars), from the input (1, C, h, w) and the window w: hp = ceil(h / w) * w."""

    def __init__(self, g, x: str, window: int):
        self.h, self.w = g.dim(x, 2), g.dim(x, 3)
        ws = g.i(window)
        up = lambda n: g.op("Div", g.op("Add", n, g.i(window - 1)), ws)  # ceil(n / w), n > 0
        self.nh, self.nw = up(self.h), up(self.w)
        self.hp, self.wp = g.op("Mul", self.nh, ws), g.op("Mul", self.nw, ws)


def _reflect_pad(g, x: str, s: _Sizes) -> str:
    """Reflect-pad (1, C, h, w) at the bottom/right to (1, C, hp, wp) (torch's 'reflect')."""
    pads = g.vec(0, 0, 0, 0, 0, 0, g.op("Sub", s.hp, s.h), g.op("Sub", s.wp, s.w))
    return g.op("Pad", x, pads, mode="reflect")


def _layer_norm(g, x: str, p: Mapping) -> str:
    """LayerNorm over the last axis as swinir.LayerNorm: mean and biased variance
    (ReduceSum / C: valid in every opset >= 13), (x - mean) * rsqrt(var + eps) * scale + bias."""
    c = g.f(float(np.asarray(p["scale"]).shape[0]))
    axes = g.i([-1])
    mean = g.op("Div", g.op("ReduceSum", x, axes, keepdims=1), c)
    d = g.op("Sub", x, mean)
    var = g.op("Div", g.op("ReduceSum", g.op("Mul", d, d), axes, keepdims=1), c)
    rs = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.f(LN_EPS))))
    y = g.op("Mul", g.op("Mul", d, rs), g.const(np.asarray(p["scale"], f32), "ln_scale"))
    return g.op("Add", y, g.const(np.asarray(p["bias"], f32), "ln_bias"))


def _linear(g, x: str, p: Mapping) -> str:
    """x (..., in) @ kernel (in, out) [+ bias]."""
    y = g.op("MatMul", x, g.const(np.asarray(p["kernel"], f32), "lin_w"))
    if "bias" in p:
        y = g.op("Add", y, g.const(np.asarray(p["bias"], f32), "lin_b"))
    return y


def _roll(g, x: str, shift: int) -> str:
    """jnp.roll(x, (shift, shift), axis=(1, 2)) of (1, Hp, Wp, C): y[i] = x[i - shift]
    (Slice + Concat; |shift| < the window <= Hp, Wp)."""
    big = np.iinfo(np.int64).max
    for axis in (1, 2):
        cut = -shift  # the first output rows are x[cut:], then x[:cut]
        tail = g.op("Slice", x, g.i([cut]), g.i([big]), g.i([axis]))
        head = g.op("Slice", x, g.i([0]), g.i([cut]), g.i([axis]))
        x = g.op("Concat", tail, head, axis=axis)
    return x


def _partition(g, x: str, s: _Sizes, w: int, c: int) -> str:
    """(1, Hp, Wp, C) -> (1, nW, w*w, C), windows row-major, tokens row-major."""
    y = g.op("Reshape", x, g.vec(1, s.nh, w, s.nw, w, c))
    y = g.op("Transpose", y, perm=[0, 1, 3, 2, 4, 5])
    return g.op("Reshape", y, g.i([1, -1, w * w, c]))


def _unpartition(g, x: str, s: _Sizes, w: int, c: int) -> str:
    """(1, nW, w*w, C) -> (1, Hp, Wp, C), the inverse of `_partition`."""
    y = g.op("Reshape", x, g.vec(1, s.nh, s.nw, w, w, c))
    y = g.op("Transpose", y, perm=[0, 1, 3, 2, 4, 5])
    return g.op("Reshape", y, g.vec(1, s.hp, s.wp, c))


def _bands(g, n: str, w: int, shift: int) -> str:
    """Region band of each of n positions (int64 (n,)): 0 below n - w, 1 below
    n - shift, 2 after (swinir.attention_mask's bands)."""
    p = g.op("Range", g.i(0), n, g.i(1))
    one = lambda lim: g.op("Cast", g.op("GreaterOrEqual", p, g.op("Sub", n, g.i(lim))), to=7)
    return g.op("Add", one(w), one(shift))


def shift_mask(g, s: _Sizes, w: int, shift: int) -> str:
    """The additive mask of the shifted windows of the padded map, (nW, 1, N, N) float32,
    0 within a region and MASK_VALUE across (swinir.shift_attention_mask), from hp, wp."""
    bh = g.op("Unsqueeze", _bands(g, s.hp, w, shift), g.i([1]))  # (hp, 1)
    bw = g.op("Unsqueeze", _bands(g, s.wp, w, shift), g.i([0]))  # (1, wp)
    region = g.op("Add", g.op("Mul", bh, g.i(3)), bw)  # (hp, wp)
    win = g.op("Reshape", region, g.vec(s.nh, w, s.nw, w))
    win = g.op("Reshape", g.op("Transpose", win, perm=[0, 2, 1, 3]), g.i([-1, w * w]))
    diff = g.op("Not", g.op("Equal", g.op("Unsqueeze", win, g.i([1])),
                            g.op("Unsqueeze", win, g.i([2]))))  # (nW, N, N)
    mask = g.op("Where", diff, g.f(MASK_VALUE), g.f(0.0))
    return g.op("Unsqueeze", mask, g.i([1]))  # broadcast over heads


def _attention(g, x: str, p: Mapping, heads: int, w: int, mask: Any) -> str:
    """WindowAttention: (1, nW, N, C) -> (1, nW, N, C)."""
    n = w * w
    table = np.asarray(p["relative_position_bias_table"], f32)
    c = np.asarray(p["qkv"]["kernel"]).shape[0]
    hd = c // heads
    qkv = g.op("Reshape", _linear(g, x, p["qkv"]), g.i([1, -1, n, 3, heads, hd]))
    part = lambda k, perm: g.op("Transpose", g.op("Gather", qkv, g.i(k), axis=3), perm=perm)
    # (1, nW, N, h, hd) -> q, v (1, nW, h, N, hd), k (1, nW, h, hd, N)
    q = g.op("Mul", part(0, [0, 1, 3, 2, 4]), g.f(hd ** -0.5))
    k, v = part(1, [0, 1, 3, 4, 2]), part(2, [0, 1, 3, 2, 4])
    attn = g.op("MatMul", q, k)  # (1, nW, h, N, N)
    # the bias gather is an exact copy of table entries: done here, stored as (h, N, N)
    bias = table[relative_position_index(w).reshape(-1)].reshape(n, n, heads)
    attn = g.op("Add", attn, g.const(np.ascontiguousarray(bias.transpose(2, 0, 1)), "rel_bias"))
    if mask is not None:
        attn = g.op("Add", attn, mask)
    out = g.op("MatMul", g.op("Softmax", attn, axis=-1), v)  # (1, nW, h, N, hd)
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 1, 3, 2, 4]), g.i([1, -1, n, c]))
    return _linear(g, out, p["proj"])


def _block(g, x: str, p: Mapping, s: _Sizes, heads: int, w: int, shift: int,
           mask: Any) -> str:
    """SwinBlock on (1, Hp, Wp, C): shifted-window attention, then the GELU MLP."""
    c = np.asarray(p["norm1"]["scale"]).shape[0]
    y = _layer_norm(g, x, p["norm1"])
    if shift:
        y = _roll(g, y, -shift)
    y = _attention(g, _partition(g, y, s, w, c), p["attn"], heads, w, mask if shift else None)
    y = _unpartition(g, y, s, w, c)
    if shift:
        y = _roll(g, y, shift)
    x = g.op("Add", x, y)
    y = _linear(g, g.gelu(_linear(g, _layer_norm(g, x, p["norm2"]), p["fc1"])), p["fc2"])
    return g.op("Add", x, y)


def _res_conv(g, x: str, p: Mapping, prefix: str, resi: str) -> str:
    """swinir._res_conv on NCHW: '1conv' or the '3conv' chain (LeakyReLU 0.2)."""
    if resi == "1conv":
        return g.conv(x, p[prefix])
    act = lambda t: g.op("LeakyRelu", t, alpha=CONV3_SLOPE)
    y = act(g.conv(x, p[f"{prefix}_0"]))
    return g.conv(act(g.conv(y, p[f"{prefix}_2"])), p[f"{prefix}_4"])


def _nhwc_conv(g, t: str, p: Mapping, prefix: str, resi: str) -> str:
    """A residual conv of the (1, Hp, Wp, C) token map, back in NHWC."""
    y = _res_conv(g, g.op("Transpose", t, perm=NCHW), p, prefix, resi)
    return g.op("Transpose", y, perm=NHWC)


def swinir_graph(g, x: str, e: Mapping, p: Mapping) -> str:
    """The SwinIR encoder: x (1, 3, h, w) -> (1, num_feat, h, w), any h, w at run time
    (h > hp - h and w > wp - w, as the reflect padding needs, as in the Flax module)."""
    ws, resi = int(e["window_size"]), str(e["resi_connection"])
    shift = ws // 2
    s = _Sizes(g, x, ws)
    f = g.conv(_reflect_pad(g, x, s), p["conv_first"])  # (1, E, hp, wp)
    t = g.op("Transpose", f, perm=NHWC)
    if e["patch_norm"]:
        t = _layer_norm(g, t, p["patch_embed_norm"])
    # one mask for every shifted block (same window, shift and padded size)
    mask = shift_mask(g, s, ws, shift) if any(int(d) > 1 for d in e["depths"]) else None
    for i, (depth, heads) in enumerate(zip(e["depths"], e["num_heads"])):
        stage = p[f"layers_{i}"]
        y = t
        for j in range(int(depth)):
            y = _block(g, y, stage[f"blocks_{j}"], s, int(heads), ws, shift if j % 2 else 0,
                       mask)
        t = g.op("Add", _nhwc_conv(g, y, stage, "conv", resi), t)
    t = g.op("Transpose", _layer_norm(g, t, p["norm"]), perm=NCHW)
    y = g.op("Add", _res_conv(g, t, p, "conv_after_body", resi), f)
    y = g.op("LeakyRelu", g.conv(y, p["conv_before_upsample_0"]), alpha=OUT_SLOPE)
    return g.op("Slice", y, g.i([0, 0]), g.vec(s.h, s.w), g.i([2, 3]))  # crop to h x w
