"""Feature encoders without upsampler: EDSR(-baseline), RDN, RCAN and SwinIR (its module is
`msit_jax.models.swinir`). NHWC in and out.

Every encoder the model knows is one entry of `ENCODERS` (an `EncoderSpec`): its
official registry name, the model-config sub-dict that holds its sizes and their
official defaults, the Flax module, the mapping to and from the official
`encoder_spec.args`, the bound of its sizes by stored tensors (for untrusted
configs) and its ONNX graph. Adding an encoder is one entry here (SwinIR, a
transformer with LayerNorms and buffers, also has its LTE names and buffers mapped in
`msit_jax.io.torch_io`; its ONNX graph is written by `msit_jax.models.swinir_onnx`).

As the official MSIT uses them: no upsampler (`no_upsampling=True`), and the
MeanShift layers that the official EDSR / RCAN define are never applied (their
forward has them commented out); their constant tensors stay in the official
state_dict (see `EncoderSpec.mean_shift`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from msit_jax.models.layers import Conv
from msit_jax.models.swinir import SWINIR_DEFAULTS, SwinIREncoder, validate_swinir_config
from msit_jax.models.swinir_onnx import swinir_graph
from msit_jax.ops.runtime import RuntimeOptions

Array = jax.Array

# The official RDNconfig presets: (blocks D, conv layers per block C, growth G).
RDN_PRESETS = {"A": (20, 6, 32), "B": (16, 8, 64)}


class ResBlock(nn.Module):
    features: int
    res_scale: float = 1.0
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = lambda name: Conv(self.features, 3, runtime=self.runtime, name=name)
        y = conv("body_2")(nn.relu(conv("body_0")(x)))
        return x + y * self.res_scale if self.res_scale != 1.0 else x + y


class EDSR(nn.Module):
    """EDSR body (official `edsr-baseline` and `edsr`, which differ only in their
    defaults): (B, H, W, 3) -> (B, H, W, n_feats). No mean shift, no upsampler."""

    n_resblocks: int = 16
    n_feats: int = 64
    res_scale: float = 1.0
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(runtime=self.runtime)
        h = Conv(self.n_feats, 3, name="head_0", **kw)(x)
        y = h
        for i in range(self.n_resblocks):
            y = ResBlock(self.n_feats, self.res_scale, name=f"body_{i}", **kw)(y)
        y = Conv(self.n_feats, 3, name=f"body_{self.n_resblocks}", **kw)(y)
        return y + h


EDSRBaseline = EDSR  # the name this module had when it was the only EDSR


class RDB(nn.Module):
    """Residual dense block: C densely connected conv+ReLU, 1x1 fusion, local skip."""

    g0: int
    growth: int
    n_layers: int
    kernel_size: int = 3
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(runtime=self.runtime)
        y = x
        for c in range(self.n_layers):
            out = nn.relu(_RDBConv(self.growth, self.kernel_size, name=f"convs_{c}", **kw)(y))
            y = jnp.concatenate([y, out], axis=-1)
        return Conv(self.g0, 1, name="LFF", **kw)(y) + x


class _RDBConv(nn.Module):
    growth: int
    kernel_size: int
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return Conv(self.growth, self.kernel_size, runtime=self.runtime, name="conv_0")(x)


class RDN(nn.Module):
    """RDN body: (B, H, W, 3) -> (B, H, W, G0)."""

    g0: int = 64
    kernel_size: int = 3
    n_blocks: int = 16
    n_layers: int = 8
    growth: int = 64
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, c, g = self.n_blocks, self.n_layers, self.growth
        kw = dict(runtime=self.runtime)
        f1 = Conv(self.g0, self.kernel_size, name="SFENet1", **kw)(x)
        y = Conv(self.g0, self.kernel_size, name="SFENet2", **kw)(f1)
        outs = []
        for i in range(d):
            y = RDB(self.g0, g, c, self.kernel_size, name=f"RDBs_{i}", **kw)(y)
            outs.append(y)
        y = Conv(self.g0, 1, name="GFF_0", **kw)(jnp.concatenate(outs, axis=-1))
        y = Conv(self.g0, self.kernel_size, name="GFF_1", **kw)(y)
        return y + f1


class CALayer(nn.Module):
    """RCAN channel attention: x * sigmoid(W2 relu(W1 mean_hw(x))), 1x1 convs."""

    features: int
    reduction: int
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(runtime=self.runtime)
        y = jnp.mean(x, axis=(1, 2), keepdims=True)
        y = nn.relu(Conv(self.features // self.reduction, 1, name="conv_du_0", **kw)(y))
        y = jax.nn.sigmoid(Conv(self.features, 1, name="conv_du_2", **kw)(y))
        return x * y


class RCAB(nn.Module):
    """Residual channel attention block: conv, ReLU, conv, CA, local skip (no scaling:
    the official RCAB ignores its res_scale)."""

    features: int
    reduction: int
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(runtime=self.runtime)
        y = nn.relu(Conv(self.features, 3, name="body_0", **kw)(x))
        y = Conv(self.features, 3, name="body_2", **kw)(y)
        return x + CALayer(self.features, self.reduction, name="body_3", **kw)(y)


class ResidualGroup(nn.Module):
    """n_resblocks RCABs, a conv, a group skip."""

    features: int
    reduction: int
    n_resblocks: int
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(runtime=self.runtime)
        y = x
        for i in range(self.n_resblocks):
            y = RCAB(self.features, self.reduction, name=f"body_{i}", **kw)(y)
        return x + Conv(self.features, 3, name=f"body_{self.n_resblocks}", **kw)(y)


class RCAN(nn.Module):
    """RCAN body: (B, H, W, 3) -> (B, H, W, n_feats). No mean shift, no upsampler.
    Channel attention pools over the whole map: every output sees the whole input."""

    n_resgroups: int = 10
    n_resblocks: int = 20
    n_feats: int = 64
    reduction: int = 16
    runtime: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(runtime=self.runtime)
        h = Conv(self.n_feats, 3, name="head_0", **kw)(x)
        y = h
        for g in range(self.n_resgroups):
            y = ResidualGroup(self.n_feats, self.reduction, self.n_resblocks, name=f"body_{g}",
                              **kw)(y)
        return h + Conv(self.n_feats, 3, name=f"body_{self.n_resgroups}", **kw)(y)


# --- the registry -------------------------------------------------------------------

Sub = Mapping[str, Any]  # an encoder's sub-config (ml_collections.ConfigDict)


class Bounds:
    """What `EncoderSpec.bound` uses to compare a sub-config with stored tensors
    (built by `msit_jax.io.config_check`): names and shapes only, nothing allocated.

    compare(field, want, got, held, key=None) records a mismatch and returns False;
    count(fmt, start=0) counts consecutive indices with a tensor fmt.format(i);
    dim(key, axis=0, ndim=4) is that tensor's size on `axis`, None if absent;
    fail(text) records a mismatch; label(key) names a stored tensor in a message."""

    def __init__(self, compare: Callable, count: Callable, dim: Callable, fail: Callable,
                 label: Callable):
        self.compare, self.count, self.dim = compare, count, dim
        self.fail, self.label = fail, label


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """One encoder: everything the package needs to know about it.

    name         the official registry name (`encoder_spec.name`), the config's `encoder`
    sub_config   the model-config sub-dict holding its sizes ('edsr', 'rdn', ...);
                 encoders of one family share it (edsr-baseline and edsr)
    defaults     the official defaults of those sizes (the paper model)
    tiny         sizes for `tiny_model_config`
    module       (sub, runtime) -> the Flax module (named 'encoder'), RuntimeOptions as given
    out_features sub -> the encoder's output width
    check        (sub, need) -> None; need(ok, message) rejects a field
    from_official  official encoder args -> sub-config values (ValueError if unsupported)
    to_official    sub -> official encoder args (ValueError if not expressible)
    family       stored-tensor layout family (same family: same state_dict keys)
    detect       tensor names -> whether they hold this family's encoder
    bound        (sub, Bounds) -> compares every size field with the stored tensors
    graph        (g, x, sub, params) -> ONNX output name; g (onnx_graph._GraphOps) has
                 conv(x, p), op(...), f(v), i(v), const(v), gelu(x), dim(x, axis), vec(...)
    radius       sub -> LR pixels of context per side, None when global (pooling)
    describe     sub -> a short human-readable size
    mean_shift   the official module holds the (unused) MeanShift constants
    untiled      why tiles cannot reproduce it, for messages (when radius is None)
    dropout      sub -> whether training it is stochastic (SwinIR's stochastic depth):
                 the module then takes `train` and, training, a 'dropout' rng
    bytes_per_pixel  sub -> peak float32 activation bytes of its forward per LR pixel, for
                 `msit_jax.inference.budget.memory_estimate`; None: the convolutional rule there
                 (64 bytes x the model dim per pixel) covers it
    """

    name: str
    sub_config: str
    defaults: dict
    tiny: dict
    module: Callable
    out_features: Callable
    check: Callable
    from_official: Callable
    to_official: Callable
    family: str
    detect: Callable
    bound: Callable
    graph: Callable
    radius: Callable
    describe: Callable
    mean_shift: bool = False
    untiled: str = "pools over the whole image (channel attention)"
    dropout: Callable = lambda e: False
    bytes_per_pixel: Optional[Callable] = None


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(need, sub_name: str, sub, *keys) -> None:
    for k in keys:
        need(_int(sub[k]) and sub[k] > 0, f"{sub_name}.{k}={sub[k]!r} must be a positive integer")


def _official_int(args: Mapping, key: str, default: int) -> int:
    v = args.get(key, default)
    try:
        if isinstance(v, bool) or int(v) != v:
            raise ValueError
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"encoder arg {key}={v!r} is not an integer") from None


# EDSR (edsr-baseline, edsr) ------------------------------------------------------------

def _edsr_module(e, runtime: RuntimeOptions) -> nn.Module:
    return EDSR(e.n_resblocks, e.n_feats, e.res_scale, runtime, name="encoder")


def _edsr_check(e, need) -> None:
    need(_int(e.n_resblocks) and e.n_resblocks >= 0,
         f"edsr.n_resblocks={e.n_resblocks!r} must be an integer >= 0")
    _positive(need, "edsr", e, "n_feats")
    need(isinstance(e.res_scale, (int, float)) and not isinstance(e.res_scale, bool)
         and math.isfinite(e.res_scale), f"edsr.res_scale={e.res_scale!r} must be finite")


def _edsr_from_official(defaults: dict) -> Callable:
    def convert(args: Mapping) -> dict:
        return dict(n_resblocks=_official_int(args, "n_resblocks", defaults["n_resblocks"]),
                    n_feats=_official_int(args, "n_feats", defaults["n_feats"]),
                    res_scale=float(args.get("res_scale", defaults["res_scale"])))
    return convert


def _edsr_to_official(e) -> dict:
    return {"no_upsampling": True, "n_resblocks": int(e.n_resblocks),
            "n_feats": int(e.n_feats), "res_scale": float(e.res_scale)}


def _rcan_layout(names) -> bool:
    return "encoder.body.0.body.0.body.3.conv_du.0.weight" in names


def _edsr_detect(names) -> bool:
    return "encoder.head.0.weight" in names and not _rcan_layout(names)


def _edsr_bound(e, b: Bounds) -> None:
    head = "encoder.head.0.weight"
    b.compare("edsr.n_resblocks", e.n_resblocks, b.count("encoder.body.{}.body.0.weight"),
              "{} residual block(s) (encoder.body.N.body.0.weight)")
    b.compare("edsr.n_feats", e.n_feats, b.dim(head), "width {}", head)


def _edsr_graph(g, x, e, p):
    h = g.conv(x, p["head_0"])
    y = h
    for i in range(e.n_resblocks):
        blk = p[f"body_{i}"]
        r = g.conv(g.op("Relu", g.conv(y, blk["body_0"])), blk["body_2"])
        if e.res_scale != 1.0:
            r = g.op("Mul", r, g.f(e.res_scale))
        y = g.op("Add", y, r)
    return g.op("Add", g.conv(y, p[f"body_{e.n_resblocks}"]), h)


def _edsr_spec(name: str, defaults: dict, label: str) -> EncoderSpec:
    return EncoderSpec(
        name=name, sub_config="edsr", defaults=defaults,
        tiny=dict(n_resblocks=1, n_feats=8), module=_edsr_module,
        out_features=lambda e: e.n_feats, check=_edsr_check,
        from_official=_edsr_from_official(defaults), to_official=_edsr_to_official,
        family="edsr", detect=_edsr_detect, bound=_edsr_bound, graph=_edsr_graph,
        radius=lambda e: 2 * e.n_resblocks + 2,  # head, 2 per block, body tail
        describe=lambda e: (f"{label}, {e.n_resblocks} residual blocks x {e.n_feats} features"
                            + (f", res_scale {e.res_scale:g}" if e.res_scale != 1 else "")),
        mean_shift=True)


# RDN --------------------------------------------------------------------------------

def _rdn_module(e, runtime: RuntimeOptions) -> nn.Module:
    return RDN(e.g0, e.kernel_size, e.n_blocks, e.n_layers, e.growth, runtime, name="encoder")


def _rdn_from_official(args: Mapping) -> dict:
    preset = args.get("RDNconfig", "B")
    if preset not in RDN_PRESETS:
        raise ValueError(f"RDNconfig {preset!r}")
    d, c, g = RDN_PRESETS[preset]
    return dict(g0=_official_int(args, "G0", 64), kernel_size=_official_int(args, "RDNkSize", 3),
                n_blocks=d, n_layers=c, growth=g)


def _rdn_to_official(e) -> dict:
    sizes = (e.n_blocks, e.n_layers, e.growth)
    preset = [k for k, v in RDN_PRESETS.items() if tuple(v) == tuple(sizes)]
    if not preset:
        raise ValueError(f"RDN blocks/layers/growth {sizes} match no RDNconfig preset "
                         f"({', '.join(f'{k}={v}' for k, v in RDN_PRESETS.items())})")
    return {"no_upsampling": True, "G0": int(e.g0), "RDNkSize": int(e.kernel_size),
            "RDNconfig": preset[0]}


def _rdn_bound(e, b: Bounds) -> None:
    first = "encoder.SFENet1.weight"
    b.compare("rdn.g0", e.g0, b.dim(first), "width {}", first)
    b.compare("rdn.kernel_size", e.kernel_size, b.dim(first, 2), "kernel size {}", first)
    if b.compare("rdn.n_blocks", e.n_blocks, b.count("encoder.RDBs.{}.LFF.weight"),
                 "{} dense block(s) (encoder.RDBs.N.LFF.weight)"):
        conv0 = "encoder.RDBs.0.convs.0.conv.0.weight"
        if b.compare("rdn.n_layers", e.n_layers,
                     b.count("encoder.RDBs.0.convs.{}.conv.0.weight"),
                     "{} layers per block (encoder.RDBs.0.convs.N.conv.0.weight)"):
            b.compare("rdn.growth", e.growth, b.dim(conv0), "growth {}", conv0)


def _rdn_graph(g, x, e, p):
    f1 = g.conv(x, p["SFENet1"])
    y = g.conv(f1, p["SFENet2"])
    outs = []
    for i in range(e.n_blocks):
        blk = p[f"RDBs_{i}"]
        z = y
        for c in range(e.n_layers):
            z = g.op("Concat", z, g.op("Relu", g.conv(z, blk[f"convs_{c}"]["conv_0"])), axis=1)
        y = g.op("Add", g.conv(z, blk["LFF"]), y)
        outs.append(y)
    y = g.conv(g.conv(g.op("Concat", *outs, axis=1), p["GFF_0"]), p["GFF_1"])
    return g.op("Add", y, f1)


_RDN = EncoderSpec(
    name="rdn", sub_config="rdn",
    defaults=dict(g0=64, kernel_size=3, n_blocks=16, n_layers=8, growth=64),
    tiny=dict(g0=8, n_blocks=2, n_layers=2, growth=8), module=_rdn_module,
    out_features=lambda e: e.g0,
    check=lambda e, need: _positive(need, "rdn", e, "g0", "kernel_size", "n_blocks",
                                    "n_layers", "growth"),
    from_official=_rdn_from_official, to_official=_rdn_to_official, family="rdn",
    detect=lambda names: "encoder.SFENet1.weight" in names, bound=_rdn_bound, graph=_rdn_graph,
    # SFE1/2, RDB convs, GFF_1
    radius=lambda e: e.kernel_size // 2 * (2 + e.n_blocks * e.n_layers + 1),
    describe=lambda e: (f"RDN, {e.n_blocks} blocks x {e.n_layers} layers, growth {e.growth}, "
                        f"G0 {e.g0}"))


# RCAN -------------------------------------------------------------------------------

def _rcan_module(e, runtime: RuntimeOptions) -> nn.Module:
    return RCAN(e.n_resgroups, e.n_resblocks, e.n_feats, e.reduction, runtime, name="encoder")


def _rcan_check(e, need) -> None:
    _positive(need, "rcan", e, "n_resgroups", "n_resblocks", "n_feats", "reduction")
    need(e.n_feats // e.reduction >= 1, f"rcan.reduction={e.reduction} leaves no channel-"
         f"attention width (n_feats // reduction = {e.n_feats} // {e.reduction} = 0)")


def _rcan_from_official(args: Mapping) -> dict:
    return dict(n_resgroups=_official_int(args, "n_resgroups", 10),
                n_resblocks=_official_int(args, "n_resblocks", 20),
                n_feats=_official_int(args, "n_feats", 64),
                reduction=_official_int(args, "reduction", 16))


def _rcan_to_official(e) -> dict:
    return {"no_upsampling": True, "n_resgroups": int(e.n_resgroups),
            "n_resblocks": int(e.n_resblocks), "n_feats": int(e.n_feats),
            "reduction": int(e.reduction)}


def _rcan_bound(e, b: Bounds) -> None:
    head = "encoder.head.0.weight"
    b.compare("rcan.n_resgroups", e.n_resgroups,
              b.count("encoder.body.{}.body.0.body.0.weight"),
              "{} residual group(s) (encoder.body.N.body.0.body.0.weight)")
    b.compare("rcan.n_resblocks", e.n_resblocks,
              b.count("encoder.body.0.body.{}.body.0.weight"),
              "{} blocks in group 0 (encoder.body.0.body.N.body.0.weight)")
    if b.compare("rcan.n_feats", e.n_feats, b.dim(head), "width {}", head) \
            and _int(e.reduction) and e.reduction > 0:
        du = "encoder.body.0.body.0.body.3.conv_du.0.weight"
        got = b.dim(du)  # the attention width n_feats // reduction is what the tensors fix
        if got != e.n_feats // e.reduction:
            b.fail(f"rcan.reduction={e.reduction!r}: needs the channel-attention width "
                   f"n_feats // reduction = {e.n_feats // e.reduction}, the tensors hold "
                   + (f"width {got} ({b.label(du)})" if got is not None else f"no {du}"))


def _rcan_graph(g, x, e, p):
    h = g.conv(x, p["head_0"])
    y = h
    for gi in range(e.n_resgroups):
        grp = p[f"body_{gi}"]
        z = y
        for bi in range(e.n_resblocks):
            blk = grp[f"body_{bi}"]
            r = g.conv(g.op("Relu", g.conv(z, blk["body_0"])), blk["body_2"])
            ca = blk["body_3"]
            a = g.op("GlobalAveragePool", r)  # (1, C, 1, 1) in every opset
            a = g.op("Relu", g.conv(a, ca["conv_du_0"]))
            a = g.op("Sigmoid", g.conv(a, ca["conv_du_2"]))
            z = g.op("Add", z, g.op("Mul", r, a))
        y = g.op("Add", y, g.conv(z, grp[f"body_{e.n_resblocks}"]))
    return g.op("Add", h, g.conv(y, p[f"body_{e.n_resgroups}"]))


_RCAN = EncoderSpec(
    name="rcan", sub_config="rcan",
    defaults=dict(n_resgroups=10, n_resblocks=20, n_feats=64, reduction=16),
    tiny=dict(n_resgroups=2, n_resblocks=2, n_feats=8, reduction=4), module=_rcan_module,
    out_features=lambda e: e.n_feats, check=_rcan_check,
    from_official=_rcan_from_official, to_official=_rcan_to_official, family="rcan",
    detect=_rcan_layout, bound=_rcan_bound, graph=_rcan_graph,
    radius=lambda e: None,  # channel attention averages over the whole map
    describe=lambda e: (f"RCAN, {e.n_resgroups} residual groups x {e.n_resblocks} blocks, "
                        f"{e.n_feats} features, reduction {e.reduction}"),
    mean_shift=True)


# SwinIR (LTE's `swinir` encoder; the module is msit_jax.models.swinir) ----------------

# LTE's make_swinir ignores its arguments but no_upsampling: nothing official sizes it.
_SWINIR_SIZES = ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias",
                 "patch_norm", "resi_connection", "num_feat")
_SWINIR_DETECT = "encoder.layers.0.residual_group.blocks.0.attn.relative_position_bias_table"


def _swinir_module(e, runtime: RuntimeOptions) -> nn.Module:
    return SwinIREncoder.from_config(dict(e), runtime, name="encoder")


def _swinir_check(e, need) -> None:
    unknown = sorted(set(e) - set(SWINIR_DEFAULTS))
    need(not unknown, f"swinir has unknown keys {unknown}; known: {sorted(SWINIR_DEFAULTS)}")
    for k in ("depths", "num_heads"):
        v = e[k]
        ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(_int(d) and d > 0 for d in v)
        text = repr(tuple(v[:4])) + f"... ({len(v)} items)" if ok is False and isinstance(
            v, (tuple, list)) and len(v) > 8 else repr(v)
        need(ok, f"swinir.{k}={text} must be a non-empty tuple of positive integers")
    _positive(need, "swinir", e, "embed_dim", "window_size", "num_feat")
    for k in ("mlp_ratio", "drop_path_rate"):
        v = e[k]
        need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
             f"swinir.{k}={v!r} must be a finite number")
    for k in ("qkv_bias", "patch_norm"):
        need(isinstance(e[k], bool), f"swinir.{k}={e[k]!r} must be true or false")
    try:
        validate_swinir_config(dict(e))
    except (ValueError, TypeError) as err:
        need(False, f"swinir: {err}")


def _swinir_defaults() -> dict:
    return dict(SWINIR_DEFAULTS)


def _swinir_from_official(args: Mapping) -> dict:
    other = sorted(set(args) - {"no_upsampling"})
    if other:  # LTE's make_swinir(no_upsampling) takes nothing else
        raise ValueError(f"swinir encoder args {other}: LTE's make_swinir takes only "
                         "no_upsampling (it always builds the paper size)")
    return _swinir_defaults()


def _swinir_to_official(e) -> dict:
    d = _swinir_defaults()
    diff = [f"{k}={_tuple(e[k])!r} (official {d[k]!r})" for k in _SWINIR_SIZES
            if _tuple(e[k]) != d[k]]
    if diff:
        raise ValueError("the official (LTE) swinir encoder ignores its arguments and always "
                         "builds the paper size; this one differs: " + ", ".join(diff))
    return {"no_upsampling": True}


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _swinir_bound(e, b: Bounds) -> None:
    pre = "encoder."
    first = pre + "conv_first.weight"
    if not b.compare("swinir.embed_dim", e.embed_dim, b.dim(first), "width {}", first):
        return
    stages = b.count(pre + "layers.{}.residual_group.blocks.0.norm1.weight")
    depths, heads = _tuple(e.depths), _tuple(e.num_heads)
    if not isinstance(depths, tuple) or not isinstance(heads, tuple):
        b.fail(f"swinir.depths / num_heads must be tuples, got {type(depths).__name__}")
        return
    if len(depths) != stages:
        b.compare("swinir.depths", depths, stages,
                  "{} stage(s) (encoder.layers.N.residual_group.blocks.0)")
        return
    if len(heads) != stages:
        b.compare("swinir.num_heads", heads, stages,
                  "{} stage(s) (encoder.layers.N.residual_group.blocks.0)")
        return
    ok = True
    for i, d in enumerate(depths):
        blk = pre + f"layers.{i}.residual_group.blocks.{{}}.norm1.weight"
        ok &= b.compare(f"swinir.depths[{i}]", d, b.count(blk),
                        f"{{}} block(s) in stage {i} (encoder.layers.{i}.residual_group."
                        "blocks.N)")
    if not ok:
        return
    for i, h in enumerate(heads):
        table = pre + f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"
        b.compare(f"swinir.num_heads[{i}]", h, b.dim(table, 1, 2), "{} heads", table)
    table = pre + "layers.0.residual_group.blocks.0.attn.relative_position_bias_table"
    rows = b.dim(table, 0, 2)
    w = e.window_size
    got_w = None
    if rows is not None:
        side = math.isqrt(rows)
        got_w = (side + 1) // 2 if side * side == rows and side % 2 == 1 else -1
    b.compare("swinir.window_size", w, got_w, "window {} ((2w-1)^2 bias rows)", table)
    fc1 = pre + "layers.0.residual_group.blocks.0.mlp.fc1.weight"
    hidden = b.dim(fc1, 0, 2)
    if _int(e.embed_dim) and isinstance(e.mlp_ratio, (int, float)) and math.isfinite(e.mlp_ratio):
        want = int(e.embed_dim * e.mlp_ratio)
        if hidden != want:
            b.fail(f"swinir.mlp_ratio={e.mlp_ratio!r}: needs an MLP width embed_dim * "
                   f"mlp_ratio = {want}, the tensors hold "
                   + (f"width {hidden} ({b.label(fc1)})" if hidden is not None else f"no {fc1}"))
    else:
        b.fail(f"swinir.mlp_ratio={e.mlp_ratio!r} must be a finite number")
    out = pre + "conv_before_upsample.0.weight"
    b.compare("swinir.num_feat", e.num_feat, b.dim(out), "width {}", out)
    stored = ("3conv" if b.dim(pre + "conv_after_body.0.weight") is not None else
              "1conv" if b.dim(pre + "conv_after_body.weight") is not None else None)
    if e.resi_connection != stored:
        b.fail(f"swinir.resi_connection={e.resi_connection!r}: the tensors hold "
               + (f"the {stored!r} layout (encoder.conv_after_body"
                  + (".0" if stored == "3conv" else "") + ".weight)" if stored else
                  "no encoder.conv_after_body"))
    qkv_bias = b.dim(pre + "layers.0.residual_group.blocks.0.attn.qkv.bias", 0, 1) is not None
    if bool(e.qkv_bias) != qkv_bias:
        b.fail(f"swinir.qkv_bias={e.qkv_bias!r}: the tensors hold "
               + ("a" if qkv_bias else "no") + " qkv bias")
    patch_norm = b.dim(pre + "patch_embed.norm.weight", 0, 1) is not None
    if bool(e.patch_norm) != patch_norm:
        b.fail(f"swinir.patch_norm={e.patch_norm!r}: the tensors hold "
               + ("a" if patch_norm else "no") + " patch_embed.norm")


def _swinir_graph(g, x, e, p):
    return swinir_graph(g, x, e, p)


def _swinir_bytes_per_pixel(e) -> float:
    """Peak live float32 values per (padded) LR pixel of a SwinIR forward, x 4 bytes.

    The peak is a block's window attention. Per pixel, with C = embed_dim, heads h
    (the widest stage) and N = window_size ** 2 tokens per window:
      3C   held across it: conv_first's output (the final residual), the RSTB's input
           and the block's input (its residual)
      8C   the normed, shifted and partitioned tokens (C), qkv (3C), q / k / v laid
           out per head (3C), the attention output (C)
      2hN  the scores and their softmax: each pixel is a query of h x N scores
      N    the shifted-window mask, (nW, N, N) over nW = pixels / N windows
    The MLP's (5 + 2 mlp_ratio) C is smaller at SwinIR's ratio 2 (9C < 11C + 2hN).
    Measured (slope of the peak RSS of one jitted encoder forward between two sizes, CPU,
    two blocks): C 180 / h 6 / window 8: 11356 B/px (this: 11248); window 16: 19796
    (21232); C 60 / h 6 / window 8: 6514 (5968); window 16: 14475 (15952)."""
    c, n = int(e.embed_dim), int(e.window_size) ** 2
    heads = max(int(h) for h in _tuple(e.num_heads))
    attention = 11 * c + 2 * heads * n + n
    mlp = (5 + 2 * float(e.mlp_ratio)) * c
    return 4.0 * max(attention, mlp)


def _swinir_describe(e) -> str:
    depths = _tuple(e.depths)
    return (f"SwinIR, {len(depths)} stages x {'/'.join(map(str, depths))} blocks, embed "
            f"{e.embed_dim}, heads {'/'.join(map(str, _tuple(e.num_heads)))}, window "
            f"{e.window_size}, {e.num_feat} features")


_SWINIR = EncoderSpec(
    name="swinir", sub_config="swinir", defaults=_swinir_defaults(),
    tiny=dict(embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, num_feat=8,
              drop_path_rate=0.1),
    module=_swinir_module, out_features=lambda e: e.num_feat, check=_swinir_check,
    from_official=_swinir_from_official, to_official=_swinir_to_official, family="swinir",
    detect=lambda names: _SWINIR_DETECT in names, bound=_swinir_bound, graph=_swinir_graph,
    # shifted windows, and padding to a multiple of the window: no exact tile halo
    radius=lambda e: None, describe=_swinir_describe,
    untiled="attends within shifted windows laid over the whole (padded) image",
    dropout=lambda e: float(e.drop_path_rate) > 0.0, bytes_per_pixel=_swinir_bytes_per_pixel)


ENCODERS: dict[str, EncoderSpec] = {spec.name: spec for spec in (
    _edsr_spec("edsr-baseline", dict(n_resblocks=16, n_feats=64, res_scale=1.0),
               "EDSR-baseline"),
    _edsr_spec("edsr", dict(n_resblocks=32, n_feats=256, res_scale=0.1), "EDSR"),
    _RDN,
    _RCAN,
    _SWINIR,
)}


def encoder_spec(name: str) -> EncoderSpec:
    """The registry entry of `name`; ValueError listing the known encoders."""
    try:
        return ENCODERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown encoder {name!r}; choose one of {tuple(ENCODERS)}") from None


def sub_config_defaults(encoder: str) -> dict[str, dict]:
    """Every encoder sub-config with its defaults, the chosen encoder's own defaults
    for its sub-config (the first registered encoder of a sub-config sets the others)."""
    out: dict[str, dict] = {}
    for spec in ENCODERS.values():
        out.setdefault(spec.sub_config, dict(spec.defaults))
    spec = encoder_spec(encoder)
    out[spec.sub_config] = dict(spec.defaults)
    return out


def unused_sub_configs(encoder: str) -> frozenset[str]:
    """The model-config sub-dicts that do not shape `encoder`: the other families' sizes
    (every config carries them all, so a family added later is absent from older ones)."""
    return frozenset(s.sub_config for s in ENCODERS.values()) - {encoder_spec(encoder).sub_config}


def stored_family(names) -> Optional[str]:
    """The layout family of the encoder tensors among `names`, None if none."""
    for spec in ENCODERS.values():
        if spec.detect(names):
            return spec.family
    return None


def encoder_sizes(cfg) -> Any:
    """The model config's sub-config for its encoder."""
    return cfg[encoder_spec(cfg.encoder).sub_config]


def encoder_dropout(cfg) -> bool:
    """Whether the model config's encoder is stochastic in training (then its module
    takes `train`, and a training apply needs a 'dropout' rng)."""
    spec = encoder_spec(cfg.encoder)
    return bool(spec.dropout(cfg[spec.sub_config]))


def make_encoder(cfg, runtime: RuntimeOptions = RuntimeOptions()) -> nn.Module:
    """Encoder module from the model config's `encoder` and its sub-config, running with
    `runtime` as given (MSIT passes `runtime.direct_convs()`)."""
    spec = encoder_spec(cfg.encoder)
    return spec.module(cfg[spec.sub_config], runtime)
