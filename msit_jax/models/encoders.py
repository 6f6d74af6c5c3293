"""Feature encoders without upsampler: EDSR(-baseline), RDN and RCAN. NHWC in and out.

Every encoder the model knows is one entry of `ENCODERS` (an `EncoderSpec`): its
official registry name, the model-config sub-dict that holds its sizes and their
official defaults, the Flax module, the mapping to and from the official
`encoder_spec.args`, the bound of its sizes by stored tensors (for untrusted
configs) and its ONNX graph. Adding an encoder is one entry here.

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

from msit_jax.models.layers import Conv, Precision

Array = jax.Array

# The official RDNconfig presets: (blocks D, conv layers per block C, growth G).
RDN_PRESETS = {"A": (20, 6, 32), "B": (16, 8, 64)}


class ResBlock(nn.Module):
    features: int
    res_scale: float = 1.0
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = lambda name: Conv(self.features, 3, precision=self.precision,
                                 dtype=self.dtype, impl=self.impl, name=name)
        y = conv("body_2")(nn.relu(conv("body_0")(x)))
        return x + y * self.res_scale if self.res_scale != 1.0 else x + y


class EDSR(nn.Module):
    """EDSR body (official `edsr-baseline` and `edsr`, which differ only in their
    defaults): (B, H, W, 3) -> (B, H, W, n_feats). No mean shift, no upsampler."""

    n_resblocks: int = 16
    n_feats: int = 64
    res_scale: float = 1.0
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
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
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
        y = x
        for c in range(self.n_layers):
            out = nn.relu(_RDBConv(self.growth, self.kernel_size, name=f"convs_{c}", **kw)(y))
            y = jnp.concatenate([y, out], axis=-1)
        return Conv(self.g0, 1, name="LFF", **kw)(y) + x


class _RDBConv(nn.Module):
    growth: int
    kernel_size: int
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return Conv(self.growth, self.kernel_size, precision=self.precision,
                    dtype=self.dtype, impl=self.impl, name="conv_0")(x)


class RDN(nn.Module):
    """RDN body: (B, H, W, 3) -> (B, H, W, G0)."""

    g0: int = 64
    kernel_size: int = 3
    n_blocks: int = 16
    n_layers: int = 8
    growth: int = 64
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"  # conv implementation, see msit_jax.ops.conv2d

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, c, g = self.n_blocks, self.n_layers, self.growth
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
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
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
        y = jnp.mean(x, axis=(1, 2), keepdims=True)
        y = nn.relu(Conv(self.features // self.reduction, 1, name="conv_du_0", **kw)(y))
        y = jax.nn.sigmoid(Conv(self.features, 1, name="conv_du_2", **kw)(y))
        return x * y


class RCAB(nn.Module):
    """Residual channel attention block: conv, ReLU, conv, CA, local skip (no scaling:
    the official RCAB ignores its res_scale)."""

    features: int
    reduction: int
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
        y = nn.relu(Conv(self.features, 3, name="body_0", **kw)(x))
        y = Conv(self.features, 3, name="body_2", **kw)(y)
        return x + CALayer(self.features, self.reduction, name="body_3", **kw)(y)


class ResidualGroup(nn.Module):
    """n_resblocks RCABs, a conv, a group skip."""

    features: int
    reduction: int
    n_resblocks: int
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
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
    precision: Precision = Precision.HIGHEST
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(precision=self.precision, dtype=self.dtype, impl=self.impl)
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
    module       (sub, precision, dtype, impl) -> the Flax module (named 'encoder')
    out_features sub -> the encoder's output width
    check        (sub, need) -> None; need(ok, message) rejects a field
    from_official  official encoder args -> sub-config values (ValueError if unsupported)
    to_official    sub -> official encoder args (ValueError if not expressible)
    family       stored-tensor layout family (same family: same state_dict keys)
    detect       tensor names -> whether they hold this family's encoder
    bound        (sub, Bounds) -> compares every size field with the stored tensors
    graph        (g, x, sub, params) -> ONNX output name; g has conv(x, p), op(...), f(v)
    radius       sub -> LR pixels of context per side, None when global (pooling)
    describe     sub -> a short human-readable size
    mean_shift   the official module holds the (unused) MeanShift constants
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

def _edsr_module(e, precision, dtype, impl):
    return EDSR(e.n_resblocks, e.n_feats, e.res_scale, precision, dtype, impl, name="encoder")


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

def _rdn_module(e, precision, dtype, impl):
    return RDN(e.g0, e.kernel_size, e.n_blocks, e.n_layers, e.growth, precision, dtype, impl,
               name="encoder")


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

def _rcan_module(e, precision, dtype, impl):
    return RCAN(e.n_resgroups, e.n_resblocks, e.n_feats, e.reduction, precision, dtype, impl,
                name="encoder")


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


ENCODERS: dict[str, EncoderSpec] = {spec.name: spec for spec in (
    _edsr_spec("edsr-baseline", dict(n_resblocks=16, n_feats=64, res_scale=1.0),
               "EDSR-baseline"),
    _edsr_spec("edsr", dict(n_resblocks=32, n_feats=256, res_scale=0.1), "EDSR"),
    _RDN,
    _RCAN,
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


def make_encoder(cfg, precision: Precision, dtype: Any, impl: str = "auto") -> nn.Module:
    """Encoder module from the model config's `encoder` and its sub-config."""
    spec = encoder_spec(cfg.encoder)
    return spec.module(cfg[spec.sub_config], precision, dtype, impl)
