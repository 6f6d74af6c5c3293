"""MSIT as one self-contained ONNX graph: LR image and output size in, SR image out.

    model = build_graph(model_cfg, variables)          # a folded model (reparam.fold)
    onnx.save(model, "msit.onnx")
    up = msit_jax.export.onnx_runner.load("msit.onnx")  # onnxruntime; PIL / uint8 / float
    sr = up(image, scale=3.5)

Graph interface (opset `OPSET`, batch 1, NCHW; the runner checks it as
`onnx_runner.GRAPH_INPUTS` / `GRAPH_OUTPUTS`):

  input  lr        float32 [1, 3, height, width]   RGB in [0, 1]; height, width dynamic
  input  out_size  int64   [2]                      (out_height, out_width), each >= 1
  output sr        float32 [1, 3, out_height, out_width]  in [0, 1] (clamped; a graph
                   built with clamp=False returns the raw prediction)

Everything happens in the graph: normalisation, the encoder, the query
geometry, the per-query decoder and the output clamp. The HR pixels are
decoded by a `Loop` over fixed-size chunks of `chunk` queries (raster order,
the last chunk padded by repeating its last query), so memory is bounded by
the chunk, not the output size.

The query geometry is written with one ONNX op per float32 operation, in the
order `msit_jax.geometry` (and the reference) rounds them: the axis constants
-1 + 1/n and 2/n in float64, then float32 products and sums, `Round` (half to
even) for the nearest lookup. A runtime that evaluates each op with one float32
rounding (onnxruntime's CPU kernels do) therefore reproduces the exact .5 ties
of non-integer scales; the measured agreement is in the README.

Written with the `onnx` helper API: the model's operations are few (Conv,
Gather, MatMul, Softmax, Erf, elementwise), and the chunk loop and the
value-dependent output size need ONNX's own `Loop` and shape ops, which JAX
traces cannot express.

Imports: `onnx` is an optional dependency, imported where a graph is built (the
export command imports this module without it). The runner is
`msit_jax.export.onnx_runner`, which needs none of this module.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from msit_jax.inference.frontend import DEFAULT_CHUNK
from msit_jax.models.decoder import posenc_frequencies
from msit_jax.models.encoders import encoder_spec
from msit_jax.models.msno import lem_mask

OPSET = 17
f32 = np.float32


class _Builder:
    """Accumulates nodes; initialisers are shared with the parent graph (a Loop
    body reads the weights from the outer scope)."""

    def __init__(self, parent: Optional["_Builder"] = None):
        self.nodes: list = []
        self.inits: list = parent.inits if parent else []
        self._count = parent._count if parent else [0]

    def name(self, hint: str) -> str:
        self._count[0] += 1
        return f"{hint}_{self._count[0]}"

    def const(self, value: Any, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def f(self, value: float) -> str:
        return self.const(np.array(value, f32), "f")

    def d(self, value: float) -> str:
        return self.const(np.array(value, np.float64), "d")

    def i(self, value: Any) -> str:
        return self.const(np.asarray(value, np.int64), "i")

    def op(self, op_type: str, *inputs: str, hint: Optional[str] = None, n_out: int = 1,
           **attrs) -> Any:
        from onnx import helper

        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=self.name("node_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs


# --- encoder (NCHW) ---------------------------------------------------------------

def _conv(b: _Builder, x: str, p: dict, groups: int = 1) -> str:
    kernel = np.asarray(p["kernel"], f32)  # HWIO
    k = kernel.shape[0]
    inputs = [x, b.const(np.transpose(kernel, (3, 2, 0, 1)), "w")]
    if "bias" in p:
        inputs.append(b.const(np.asarray(p["bias"], f32), "b"))
    return b.op("Conv", *inputs, kernel_shape=[k, k], pads=[k // 2] * 4, group=groups)


def _gelu(b: _Builder, x: str) -> str:
    """Exact (erf) GELU as jax.nn.gelu(approximate=False): x * (erf(x / sqrt 2) + 1) / 2."""
    e = b.op("Erf", b.op("Div", x, b.f(np.sqrt(2.0))))
    return b.op("Div", b.op("Mul", x, b.op("Add", e, b.f(1.0))), b.f(2.0))


def _wrap_pad(b: _Builder, x: str, axis: int) -> str:
    """Circular padding by 1 on one axis (Slice + Concat: valid in every opset)."""
    last = b.op("Slice", x, b.i([-1]), b.i([np.iinfo(np.int64).max]), b.i([axis]))
    first = b.op("Slice", x, b.i([0]), b.i([1]), b.i([axis]))
    return b.op("Concat", last, x, first, axis=axis)


def _lem(b: _Builder, x: str, dim: int) -> str:
    """LEM pixel shift: a depthwise 3x3 conv with the fixed 0/1 mask on the circularly
    padded map (each output is a sum of one or two inputs, exact as msno.lem_shift)."""
    xp = _wrap_pad(b, _wrap_pad(b, x, 2), 3)
    w = b.const(lem_mask(dim)[:, None], "lem")
    return b.op("Conv", xp, w, kernel_shape=[3, 3], pads=[0, 0, 0, 0], group=dim)


def _multiscale(b: _Builder, x: str, p: dict, heads: int, dim: int, fmt: str) -> str:
    parts = b.op("Split", x, b.i([dim // heads] * heads), axis=1, n_out=heads)
    parts = [parts] if heads == 1 else parts
    return b.op("Concat", *[_conv(b, xi, p[fmt.format(i + 1)]) for i, xi in enumerate(parts)],
                axis=1)


class _GraphOps:
    """What an encoder's ONNX writer (`EncoderSpec.graph`) builds with."""

    def __init__(self, b: _Builder):
        self.b = b

    def conv(self, x: str, p: dict) -> str:
        return _conv(self.b, x, p)

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.b.op(op_type, *inputs, **attrs)

    def f(self, value: float) -> str:
        return self.b.f(value)

    def i(self, value: Any) -> str:
        """An int64 constant (scalar or vector): shape arithmetic, Slice/Gather indices."""
        return self.b.i(value)

    def const(self, value: Any, hint: str = "c") -> str:
        """An initialiser holding `value` as given (its dtype kept)."""
        return self.b.const(value, hint)

    def gelu(self, x: str) -> str:
        return _gelu(self.b, x)

    def dim(self, x: str, axis: int) -> str:
        """The runtime size of x on `axis`: an int64 scalar."""
        return self.b.op("Gather", self.b.op("Shape", x), self.b.i(axis), axis=0)

    def vec(self, *parts: Any) -> str:
        """An int64 vector (a shape or pad list) from ints and int64 scalar names."""
        items = [self.b.op("Unsqueeze", p, self.b.i([0])) if isinstance(p, str)
                 else self.b.i([int(p)]) for p in parts]
        return items[0] if len(items) == 1 else self.b.op("Concat", *items, axis=0)


def _encoder(b: _Builder, x: str, cfg, p: dict) -> str:
    spec = encoder_spec(cfg.encoder)
    return spec.graph(_GraphOps(b), x, cfg[spec.sub_config], p["encoder"])


def _features(b: _Builder, inp: str, cfg, p: dict) -> tuple[str, str]:
    """Normalised LR (1, 3, h, w) -> (feat_q, feat_v), each (1, dim, h, w)."""
    d = cfg.dim
    feat = _conv(b, _encoder(b, inp, cfg, p), p["conv_ch"])
    a = p["amsno"]
    v = _conv(b, feat, a["v"])
    s = _conv(b, feat, a["s"])
    if cfg.use_lem:
        s = _lem(b, s, d)
    s = _multiscale(b, s, a["msc"], cfg.msno_heads, d, "Ms_conv_{}")
    s = _conv(b, _gelu(b, _conv(b, s, a["sim"]["sim0"], groups=cfg.msno_heads)), a["sim"]["sim1"])
    feat = _conv(b, b.op("Mul", s, v), a["proj"])
    q = p["multi_conv_qs_0"]
    y = _multiscale(b, _conv(b, feat, q["proj0"]), q["msc"], cfg.qk_heads, d, "local_conv_{}")
    y = _conv(b, _gelu(b, _conv(b, y, q["mix"]["proj1"], groups=d // cfg.qk_heads)),
              q["mix"]["proj2"])
    return y, _conv(b, feat, p["conv_vs_0"])


# --- geometry (float32 op by op, as msit_jax.geometry) ------------------------------

class _Axis:
    """One axis of n pixels (n an int64 scalar in the graph): its float32 size and the
    coordinate constants -1 + 1/n and 2/n rounded from float64, as coord_axis does."""

    def __init__(self, b: _Builder, n: str):
        self.n = n
        self.nf = b.op("Cast", n, to=1)  # FLOAT
        nd = b.op("Cast", n, to=11)  # DOUBLE
        r = b.op("Div", b.d(1.0), nd)
        self.c0 = b.op("Cast", b.op("Add", b.d(-1.0), r), to=1)
        self.c1 = b.op("Cast", b.op("Mul", b.d(2.0), r), to=1)
        self.step = b.op("Cast", b.op("Div", b.d(2.0), nd), to=1)  # f32(2 / n)
        self.last = b.op("Sub", n, b.i(1))
        self.lastf = b.op("Sub", self.nf, b.f(1.0))

    def coord(self, b: _Builder, idx: str) -> str:
        """Pixel-centre coordinate of integer indices: c0 + c1 * idx (float32)."""
        return b.op("Add", self.c0, b.op("Mul", self.c1, b.op("Cast", idx, to=1)))

    def unnormalize(self, b: _Builder, c: str) -> str:
        """u = ((c + 1) * n - 1) / 2, one float32 rounding per op."""
        return b.op("Div", b.op("Sub", b.op("Mul", b.op("Add", c, b.f(1.0)), self.nf),
                                b.f(1.0)), b.f(2.0))

    def nearest(self, b: _Builder, c: str) -> str:
        """grid_sample nearest index (int64; Round is half to even, as numpy.rint)."""
        return b.op("Cast", b.op("Round", self.unnormalize(b, c)), to=7)  # INT64

    def inside(self, b: _Builder, idx: str) -> str:
        return b.op("And", b.op("GreaterOrEqual", idx, b.i(0)), b.op("Less", idx, self.n))

    def clip(self, b: _Builder, idx: str) -> str:
        return b.op("Max", b.op("Min", idx, self.last), b.i(0))

    def taps(self, b: _Builder, c: str, border: bool) -> tuple[list[str], list[str]]:
        """Bilinear taps of coordinates c (Q,) as sampling.axis_taps: clipped int64
        indices and weights (zero for taps outside the image), two each."""
        u = self.unnormalize(b, c)
        if border:
            u = b.op("Clip", u, b.f(0.0), self.lastf)
        i0 = b.op("Floor", u)
        i1 = b.op("Add", i0, b.f(1.0))
        idx, wgt = [], []
        for i, w in ((i0, b.op("Sub", i1, u)), (i1, b.op("Sub", u, i0))):
            ok = b.op("And", b.op("GreaterOrEqual", i, b.f(0.0)),
                      b.op("LessOrEqual", i, self.lastf))
            wgt.append(b.op("Where", ok, w, b.f(0.0)))
            idx.append(self.clip(b, b.op("Cast", i, to=7)))
        return idx, wgt


def _bilinear(b: _Builder, table: str, ay: _Axis, ax: _Axis, y: str, x: str, w: str,
              border: bool) -> str:
    """Bilinear samples of a flat (h * w, C) map at coordinates (y, x), each (Q,) -> (Q, C)."""
    iy, wy = ay.taps(b, y, border)
    ix, wx = ax.taps(b, x, border)
    idx, wgt = [], []
    for a in range(2):
        for c in range(2):
            idx.append(b.op("Unsqueeze", b.op("Add", b.op("Mul", iy[a], w), ix[c]), b.i([1])))
            wgt.append(b.op("Unsqueeze", b.op("Mul", wy[a], wx[c]), b.i([1])))
    corners = b.op("Gather", table, b.op("Concat", *idx, axis=1), axis=0)  # (Q, 4, C)
    weights = b.op("Unsqueeze", b.op("Concat", *wgt, axis=1), b.i([2]))  # (Q, 4, 1)
    return b.op("ReduceSum", b.op("Mul", weights, corners), b.i([1]), keepdims=0)


def _axis_posbias(b: _Builder, rel: str, kernel: np.ndarray, freqs: np.ndarray,
                  axis: int) -> str:
    """Positional-bias share of one axis: rel (Q, 2r+1) -> (Q, 2r+1, heads)."""
    f = freqs.shape[0]
    ang = b.op("Mul", b.op("Unsqueeze", rel, b.i([2])), b.const(freqs, "freqs"))
    w_sin = b.const(kernel[axis * f:(axis + 1) * f], "pb_sin")
    w_cos = b.const(kernel[(2 + axis) * f:(3 + axis) * f], "pb_cos")
    return b.op("Add", b.op("MatMul", b.op("Sin", ang), w_sin),
                b.op("MatMul", b.op("Cos", ang), w_cos))


# --- the graph -------------------------------------------------------------------------

def _check_folded(model_cfg) -> None:
    if model_cfg.conv != "plain" or model_cfg.batch_norm:
        raise ValueError("the ONNX graph is built from a folded model (conv='plain', "
                         f"batch_norm=False), got conv={model_cfg.conv!r}, batch_norm="
                         f"{model_cfg.batch_norm}: call msit_jax.models.reparam.fold first")


class _Ctx:
    """What both decoders read from the outer graph: flat feature maps, the four axes,
    the decoder weights (as initialiser names) and sizes."""

    def __init__(self, b: _Builder, cfg, p: dict, fq: str, fv: str, inp: str, chunk: int):
        self.cfg, self.chunk = cfg, chunk
        self.dim, self.heads, self.r = cfg.dim, cfg.heads, cfg.radius
        self.hd, self.k1 = self.dim // self.heads, 2 * self.r + 1
        self.n_keys = self.k1 * self.k1

        def flat(x: str, c: int) -> str:  # (1, C, h, w) -> (h * w, C)
            return b.op("Reshape", b.op("Transpose", x, perm=[0, 2, 3, 1]), b.i([-1, c]))

        self.fq, self.fv, self.inp = flat(fq, self.dim), flat(fv, self.dim), flat(inp, 3)
        shape = b.op("Shape", "lr")
        self.h = b.op("Gather", shape, b.i(2), axis=0)
        self.w = b.op("Gather", shape, b.i(3), axis=0)
        self.out_h = b.op("Gather", "out_size", b.i(0), axis=0)
        self.out_w = b.op("Gather", "out_size", b.i(1), axis=0)
        self.ay, self.ax = _Axis(b, self.h), _Axis(b, self.w)
        self.oy, self.ox = _Axis(b, self.out_h), _Axis(b, self.out_w)
        self.total = b.op("Mul", self.out_h, self.out_w)
        offsets = b.const(np.arange(-self.r, self.r + 1, dtype=f32), "offsets")
        self.off_y, self.off_x = b.op("Mul", offsets, self.ay.step), b.op("Mul", offsets,
                                                                           self.ax.step)

        dec = p["decoder"]["query"]
        mlp = dec["mlp"]
        w1 = np.asarray(mlp["layers_0"]["kernel"], f32)
        split = self.n_keys * self.dim
        self.w1 = b.const(w1[:split], "w1")  # (K * dim, hidden), rows key-major, then head
        # (heads, K, hd, hidden) for the grid decoder: derived in the graph (onnxruntime
        # folds it when loading), not stored twice
        self.w1_blocks = b.op("Transpose", b.op("Reshape", self.w1, b.i(
            [self.n_keys, self.heads, self.hd, -1])), perm=[1, 0, 2, 3])
        self.b1 = b.const(np.asarray(mlp["layers_0"]["bias"], f32), "b1")
        self.rest = [(b.const(np.asarray(mlp[f"layers_{2 * i}"]["kernel"], f32), "wl"),
                      b.const(np.asarray(mlp[f"layers_{2 * i}"]["bias"], f32), "bl"))
                     for i in range(1, len(cfg.mlp_hidden) + 1)]
        self.freqs = posenc_frequencies(cfg.posenc_scale, cfg.posenc_dims)
        self.pb_kernel = np.asarray(dec["pb_proj"]["kernel"], f32)
        self.pb_bias = np.asarray(dec["pb_proj"]["bias"], f32)
        # rel_cell = f32(2 / out_n) * f32(n) per axis, through its rows of the first
        # layer: once per image (the Dense layer's separate cell part).
        self.cell_term = None
        if cfg.use_cell:
            rc = b.op("Concat", b.op("Unsqueeze", b.op("Mul", self.oy.step, self.ay.nf), b.i([0])),
                      b.op("Unsqueeze", b.op("Mul", self.ox.step, self.ax.nf), b.i([0])), axis=0)
            self.cell_term = b.op("MatMul", b.op("Unsqueeze", rc, b.i([0])),
                                  b.const(w1[split:], "w1_cell"))  # (1, hidden)

    def mlp_tail(self, g: _Builder, hidden: str) -> str:
        """First-layer output (..., hidden) -> the MLP's prediction (..., 3)."""
        if self.cell_term is not None:
            hidden = g.op("Add", hidden, self.cell_term)
        hidden = g.op("Add", hidden, self.b1)
        for kernel, bias in self.rest:
            hidden = g.op("Add", g.op("MatMul", _gelu(g, hidden), kernel), bias)
        return hidden


def _loop(b: _Builder, g: _Builder, trips: str, it: str, cond: str, out: str, out_shape):
    """A Loop of `trips` iterations of body g (inputs it, cond; scan output `out`)."""
    from onnx import TensorProto, helper

    cond_out = g.op("Identity", cond, hint="cond_out")
    body = helper.make_graph(
        g.nodes, b.name("body"),
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)])
    return b.op("Loop", trips, b.const(np.array(True), "true"), body=body, hint="chunks")


def _query_decoder(b: _Builder, c: _Ctx) -> str:
    """Per-query decoder (the reference formulation): a Loop over chunks of `chunk`
    HR pixels in raster order -> raw predictions (out_h * out_w, 3)."""
    chunk, heads, hd, n_keys = c.chunk, c.heads, c.hd, c.n_keys
    g = _Builder(b)
    it, cond = g.name("chunk_index"), g.name("cond_in")
    last = g.op("Sub", c.total, g.i(1))
    q = g.op("Min", g.op("Add", g.op("Mul", it, g.i(chunk)), g.i(np.arange(chunk))), last)
    row = g.op("Div", q, c.out_w)
    col = g.op("Sub", q, g.op("Mul", row, c.out_w))
    y, x = c.oy.coord(g, row), c.ox.coord(g, col)  # (Q,) query coordinates

    iy, ix = c.ay.nearest(g, y), c.ax.nearest(g, x)
    inside = g.op("And", c.ay.inside(g, iy), c.ax.inside(g, ix))
    zero = g.f(0.0)
    keys_idx, rels, valids = [], [], []
    for a, idx, coord, off in ((c.ay, iy, y, c.off_y), (c.ax, ix, x, c.off_x)):
        centre = g.op("Where", inside, a.coord(g, a.clip(g, idx)), zero)
        keys = g.op("Add", g.op("Unsqueeze", centre, g.i([1])), off)  # (Q, 2r+1)
        kidx = a.nearest(g, keys)
        rels.append(g.op("Mul", g.op("Sub", g.op("Unsqueeze", coord, g.i([1])), keys), a.nf))
        valids.append(a.inside(g, kidx))
        keys_idx.append(a.clip(g, kidx))
    flat_keys = g.op("Add", g.op("Mul", g.op("Unsqueeze", keys_idx[0], g.i([2])), c.w),
                     g.op("Unsqueeze", keys_idx[1], g.i([1])))  # (Q, k1, k1)
    valid = g.op("Reshape", g.op("And", g.op("Unsqueeze", valids[0], g.i([2])),
                                 g.op("Unsqueeze", valids[1], g.i([1]))),
                 g.i([chunk, n_keys, 1]))

    qv = g.op("Reshape", _bilinear(g, c.fq, c.ay, c.ax, y, x, c.w, border=False),
              g.i([chunk, 1, heads, hd]))
    kv = g.op("Reshape", g.op("Gather", c.fq, flat_keys, axis=0),
              g.i([chunk, n_keys, heads, hd]))
    vv = g.op("Reshape", g.op("Gather", c.fv, flat_keys, axis=0),
              g.i([chunk, n_keys, heads, hd]))
    logits = g.op("ReduceSum", g.op("Mul", kv, qv), g.i([3]), keepdims=0)  # (Q, K, heads)
    logits = g.op("Div", g.op("Where", valid, logits, zero), g.f(np.sqrt(hd)))

    row_b = _axis_posbias(g, rels[0], c.pb_kernel, c.freqs, 0)
    col_b = _axis_posbias(g, rels[1], c.pb_kernel, c.freqs, 1)
    bias = g.op("Add", g.op("Add", g.op("Unsqueeze", row_b, g.i([2])),
                            g.op("Unsqueeze", col_b, g.i([1]))), g.const(c.pb_bias, "pb_bias"))
    bias = g.op("Reshape", bias, g.i([chunk, n_keys, heads]))
    attn = g.op("Softmax", g.op("Add", logits, bias), axis=1)
    attn = g.op("Where", valid, attn, zero)

    feat_in = g.op("Reshape", g.op("Mul", vv, g.op("Unsqueeze", attn, g.i([3]))),
                   g.i([chunk, n_keys * c.dim]))
    hidden = c.mlp_tail(g, g.op("MatMul", feat_in, c.w1))
    pred = g.op("Add", hidden, _bilinear(g, c.inp, c.ay, c.ax, y, x, c.w, border=True),
                hint="pred")
    trips = b.op("Div", b.op("Add", c.total, b.i(chunk - 1)), b.i(chunk))
    preds = _loop(b, g, trips, it, cond, pred, [chunk, 3])
    return b.op("Slice", b.op("Reshape", preds, b.i([-1, 3])), b.i([0]),
                b.op("Unsqueeze", c.total, b.i([0])), b.i([0]))


class _GridAxis:
    """One HR axis grouped by nearest LR index, as grid_decoder.plan_axis, in the graph:
    every HR index's nearest LR index `idx` (monotone), each LR index's first member
    `start` and member count, the padded group width G and per-HR-index taps and
    positional-bias terms."""

    def __init__(self, b: _Builder, hr: _Axis, lr: _Axis, c: _Ctx, axis: int):
        n_hr = hr.n
        pos = b.op("Range", b.i(0), n_hr, b.i(1))  # (N,)
        self.coord = hr.coord(b, pos)
        nearest = lr.nearest(b, self.coord)
        inside = lr.inside(b, nearest)
        self.idx = lr.clip(b, nearest)
        centre = b.op("Where", inside, lr.coord(b, self.idx), b.f(0.0))
        keys = b.op("Add", b.op("Unsqueeze", centre, b.i([1])),
                    c.off_y if axis == 0 else c.off_x)
        rel = b.op("Mul", b.op("Sub", b.op("Unsqueeze", self.coord, b.i([1])), keys), lr.nf)
        self.posbias = _axis_posbias(b, rel, c.pb_kernel, c.freqs, axis)  # (N, k1, heads)
        lr_pos = b.op("Unsqueeze", b.op("Range", b.i(0), lr.n, b.i(1)), b.i([1]))  # (n, 1)
        idx_row = b.op("Unsqueeze", self.idx, b.i([0]))  # (1, N)
        count = b.op("ReduceSum", b.op("Cast", b.op("Equal", idx_row, lr_pos), to=7),
                     b.i([1]), keepdims=0)  # (n,)
        self.start = b.op("ReduceSum", b.op("Cast", b.op("Less", idx_row, lr_pos), to=7),
                          b.i([1]), keepdims=0)
        self.width = b.op("Max", b.op("ReduceMax", count, keepdims=0), b.i(1))  # G
        g = b.op("Unsqueeze", b.op("Range", b.i(0), self.width, b.i(1)), b.i([0]))  # (1, G)
        member = b.op("Min", g, b.op("Unsqueeze", b.op("Sub", count, b.i(1)), b.i([1])))
        # groups (n, G): HR indices of each LR index, padded by repeating a member (an
        # empty group points anywhere valid: no output reads it)
        self.groups = hr.clip(b, b.op("Add", b.op("Unsqueeze", self.start, b.i([1])), member))
        self.taps = {border: lr.taps(b, self.coord, border) for border in (False, True)}


def _grid_block(g: _Builder, table: str, gy: _GridAxis, gx: _GridAxis, ry: str, rx: str,
                w: str, border: bool) -> str:
    """Bilinear samples of a flat (h * w, C) map at the HR grid rows ry (P, Gy) x
    cols rx (P, Gx) -> (P, Gy, Gx, C)."""
    (iy, wy), (ix, wx) = gy.taps[border], gx.taps[border]
    idx, wgt = [], []
    for a in range(2):
        ya, wya = g.op("Gather", iy[a], ry, axis=0), g.op("Gather", wy[a], ry, axis=0)
        for c in range(2):
            xc, wxc = g.op("Gather", ix[c], rx, axis=0), g.op("Gather", wx[c], rx, axis=0)
            flat = g.op("Add", g.op("Unsqueeze", g.op("Mul", ya, w), g.i([2])),
                        g.op("Unsqueeze", xc, g.i([1])))  # (P, Gy, Gx)
            idx.append(g.op("Unsqueeze", flat, g.i([3])))
            wgt.append(g.op("Unsqueeze", g.op("Mul", g.op("Unsqueeze", wya, g.i([2])),
                                              g.op("Unsqueeze", wxc, g.i([1]))), g.i([3])))
    corners = g.op("Gather", table, g.op("Concat", *idx, axis=3), axis=0)  # (P, Gy, Gx, 4, C)
    weights = g.op("Unsqueeze", g.op("Concat", *wgt, axis=3), g.i([4]))
    return g.op("ReduceSum", g.op("Mul", weights, corners), g.i([3]), keepdims=0)


def _grid_decoder(b: _Builder, c: _Ctx) -> str:
    """Grid decoder (msit_jax.models.grid_decoder): HR pixels grouped by their nearest LR centre;
    the first MLP layer runs once per centre on its 49 values (Z = W1 V) and each query
    only mixes Z with its attention weights. A Loop over chunks of P centres, P * Gy * Gx
    ~ `chunk` queries -> raw predictions (out_h * out_w, 3)."""
    heads, hd, n_keys, r = c.heads, c.hd, c.n_keys, c.r
    gy, gx = _GridAxis(b, c.oy, c.ay, c, 0), _GridAxis(b, c.ox, c.ax, c, 1)
    block = b.op("Mul", gy.width, gx.width)
    per_call = b.op("Max", b.op("Div", b.i(c.chunk), block), b.i(1))  # P centres
    n_centres = b.op("Mul", c.h, c.w)
    trips = b.op("Div", b.op("Sub", b.op("Add", n_centres, per_call), b.i(1)), per_call)
    offsets = b.i(np.arange(-r, r + 1))

    g = _Builder(b)
    it, cond = g.name("chunk_index"), g.name("cond_in")
    cid = g.op("Min", g.op("Add", g.op("Mul", it, per_call), g.op("Range", g.i(0), per_call,
                                                                    g.i(1))),
               g.op("Sub", n_centres, g.i(1)))
    ci = g.op("Div", cid, c.w)
    cj = g.op("Sub", cid, g.op("Mul", ci, c.w))
    ry, rx = g.op("Gather", gy.groups, ci, axis=0), g.op("Gather", gx.groups, cj, axis=0)

    # keys / values of the (2r+1)^2 neighbours, zero outside the image
    ny = g.op("Add", g.op("Unsqueeze", ci, g.i([1])), offsets)  # (P, k1)
    nx = g.op("Add", g.op("Unsqueeze", cj, g.i([1])), offsets)
    flat = g.op("Add", g.op("Unsqueeze", g.op("Mul", c.ay.clip(g, ny), c.w), g.i([2])),
                g.op("Unsqueeze", c.ax.clip(g, nx), g.i([1])))  # (P, k1, k1)
    valid = g.op("And", g.op("Unsqueeze", c.ay.inside(g, ny), g.i([2])),
                 g.op("Unsqueeze", c.ax.inside(g, nx), g.i([1])))
    mask = g.op("Reshape", g.op("Cast", valid, to=1), g.i([0, n_keys, 1, 1]))
    keys = g.op("Mul", g.op("Reshape", g.op("Gather", c.fq, flat, axis=0),
                            g.i([0, n_keys, heads, hd])), mask)  # (P, K, heads, hd)
    vals = g.op("Mul", g.op("Reshape", g.op("Gather", c.fv, flat, axis=0),
                            g.i([0, n_keys, heads, hd])), mask)
    # Z[p, h, k] = W1[k, h] . V[p + o_k, h]: (heads, K, P, hd) @ (heads, K, hd, hidden)
    z = g.op("MatMul", g.op("Transpose", vals, perm=[2, 1, 0, 3]), c.w1_blocks)
    z = g.op("Transpose", z, perm=[2, 0, 1, 3])  # (P, heads, K, hidden)
    z = g.op("Reshape", z, g.i([0, heads * n_keys, -1]))

    block_shape = g.op("Concat", g.i([0]), g.op("Unsqueeze", block, g.i([0])), g.i([heads, hd]),
                       axis=0)
    q = g.op("Reshape", _grid_block(g, c.fq, gy, gx, ry, rx, c.w, False), block_shape)
    logits = g.op("MatMul", g.op("Transpose", q, perm=[0, 2, 1, 3]),
                  g.op("Transpose", keys, perm=[0, 2, 3, 1]))  # (P, heads, GyGx, K)
    logits = g.op("Div", logits, g.f(np.sqrt(hd)))
    # positional bias: row term + column term + bias, (P, heads, Gy, Gx, k1, k1)
    pb_r = g.op("Transpose", g.op("Gather", gy.posbias, ry, axis=0), perm=[0, 3, 1, 2])
    pb_c = g.op("Transpose", g.op("Gather", gx.posbias, rx, axis=0), perm=[0, 3, 1, 2])
    pb = g.op("Add", g.op("Unsqueeze", pb_r, g.i([3, 5])), g.op("Unsqueeze", pb_c, g.i([2, 4])))
    pb = g.op("Add", pb, g.const(c.pb_bias.reshape(1, heads, 1, 1, 1, 1), "pb_bias"))
    bias = g.op("Reshape", pb, g.op("Concat", g.i([0, heads]),
                                    g.op("Unsqueeze", block, g.i([0])), g.i([n_keys]), axis=0))
    attn = g.op("Softmax", g.op("Add", logits, bias), axis=-1)  # (P, heads, GyGx, K)
    attn = g.op("Reshape", g.op("Transpose", attn, perm=[0, 2, 1, 3]),
                g.op("Concat", g.i([0]), g.op("Unsqueeze", block, g.i([0])),
                     g.i([heads * n_keys]), axis=0))
    hidden = c.mlp_tail(g, g.op("MatMul", attn, z))  # (P, GyGx, 3)
    skip = g.op("Reshape", _grid_block(g, c.inp, gy, gx, ry, rx, c.w, True),
                g.op("Concat", g.i([0]), g.op("Unsqueeze", block, g.i([0])), g.i([3]), axis=0))
    pred = g.op("Add", hidden, skip, hint="pred")
    preds = _loop(b, g, trips, it, cond, pred, ["P", "block", 3])
    # HR pixel (y, x) is member (y - start[iy], x - start[ix]) of centre iy * w + ix
    my = b.op("Sub", b.op("Range", b.i(0), c.out_h, b.i(1)),
              b.op("Gather", gy.start, gy.idx, axis=0))
    mx = b.op("Sub", b.op("Range", b.i(0), c.out_w, b.i(1)),
              b.op("Gather", gx.start, gx.idx, axis=0))
    centre = b.op("Add", b.op("Unsqueeze", b.op("Mul", gy.idx, c.w), b.i([1])),
                  b.op("Unsqueeze", gx.idx, b.i([0])))  # (out_h, out_w)
    member = b.op("Add", b.op("Unsqueeze", b.op("Mul", my, gx.width), b.i([1])),
                  b.op("Unsqueeze", mx, b.i([0])))
    flat_out = b.op("Add", b.op("Mul", centre, block), member)
    return b.op("Gather", b.op("Reshape", preds, b.i([-1, 3])),
                b.op("Reshape", flat_out, b.i([-1])), axis=0)


DECODERS = ("auto", "grid", "query")
# 'auto': the grid decoder from this many output pixels per input pixel. Measured
# with onnxruntime on 2 CPU cores, paper-size model, 64^2 input: x1.5 (2.25) query
# 3.1 s vs grid 3.8 s; x2 (4) 3.8 vs 3.6 s; x2.5 8.8 vs 4.7 s; x4 13.3 vs 5.5 s.
GRID_MIN_QUERIES_PER_CENTRE = 4.0


def build_graph(model_cfg, variables: Any, chunk: int = DEFAULT_CHUNK, opset: int = OPSET,
                clamp: bool = True, decoder: str = "auto"):
    """The ONNX model (onnx.ModelProto) of a folded MSIT; interface in the module doc.

    chunk: queries per Loop iteration (memory). decoder: 'query' (per-query, the
    reference formulation), 'grid' (queries grouped by nearest LR centre, several
    times fewer FLOPs at large scales) or 'auto' (an `If` in the graph: grid from
    GRID_MIN_QUERIES_PER_CENTRE output pixels per input pixel).
    """
    import onnx
    from onnx import TensorProto, helper

    _check_folded(model_cfg)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if opset < OPSET:
        raise ValueError(f"opset must be >= {OPSET} (Split/ReduceSum with tensor inputs), "
                         f"got {opset}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    cfg = model_cfg
    p = dict(variables["params"])

    b = _Builder()
    inp = b.op("Div", b.op("Sub", "lr", b.f(0.5)), b.f(0.5), hint="inp")  # (1, 3, h, w)
    fq, fv = _features(b, inp, cfg, p)
    c = _Ctx(b, cfg, p, fq, fv, inp, chunk)

    if decoder == "auto":
        branches = []
        for build in (_grid_decoder, _query_decoder):
            sub = _Builder(b)
            out = build(sub, c)
            branches.append(helper.make_graph(
                sub.nodes, b.name(build.__name__.strip("_")), [],
                [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["queries", 3])]))
        ratio = b.op("Div", b.op("Cast", c.total, to=1),
                     b.op("Cast", b.op("Mul", c.h, c.w), to=1))
        use_grid = b.op("GreaterOrEqual", ratio, b.f(GRID_MIN_QUERIES_PER_CENTRE))
        out = b.op("If", use_grid, then_branch=branches[0], else_branch=branches[1])
    else:
        out = (_grid_decoder if decoder == "grid" else _query_decoder)(b, c)

    hw3 = b.op("Concat", "out_size", b.i([3]), axis=0)
    out = b.op("Unsqueeze", b.op("Transpose", b.op("Reshape", out, hw3), perm=[2, 0, 1]),
               b.i([0]))
    out = b.op("Add", b.op("Mul", out, b.f(0.5)), b.f(0.5))
    if clamp:
        out = b.op("Clip", out, b.f(0.0), b.f(1.0))
    b.nodes.append(helper.make_node("Identity", [out], ["sr"], name="output"))

    graph = helper.make_graph(
        b.nodes, "msit",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "height", "width"]),
         helper.make_tensor_value_info("out_size", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT,
                                       [1, 3, "out_height", "out_width"])],
        initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="msit-jax", doc_string=(
                                  "MSIT arbitrary-scale super-resolution. Inputs: lr float32 "
                                  "[1,3,H,W] RGB in [0,1]; out_size int64 [2] (out_h, out_w). "
                                  "Output: sr float32 [1,3,out_h,out_w] in [0,1]."))
    model.ir_version = min(model.ir_version, 8)  # IR 8 carries opset 17: older runtimes read it
    onnx.helper.set_model_props(model, {
        "chunk": str(chunk), "radius": str(cfg.radius), "decoder": decoder,
        "clamp": str(bool(clamp)).lower(), "layout": "NCHW, batch 1"})
    onnx.checker.check_model(model)
    return model
