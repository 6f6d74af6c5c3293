"""Model configs (ml_collections). `configs/msit_*.py` wrap these for the CLIs.

Fields:
  encoder        'edsr-baseline' | 'rdn'
  edsr / rdn     encoder sizes (EDSR: n_resblocks, n_feats, res_scale;
                 RDN: g0, kernel_size, n_blocks, n_layers, growth; the official
                 RDNconfig 'B' is 16, 8, 64)
  dim, heads     feature width and attention heads (256, 8)
  radius         neighbourhood radius r (3 -> 7x7 keys)
  msno_heads     MSNO kernel-size heads (16 -> kernels 3..33)
  qk_heads       Q/K kernel-size heads (4 -> kernels 3..9)
  use_lem        LEM pixel shift in MSNO
  mlp_hidden     decoder MLP hidden widths
  posenc_scale, posenc_dims   sinusoid bias: 2**linspace(0, posenc_scale, dims/4) - 1
  use_cell       append rel_cell to the MLP input
  conv           'rim' (stage 2, re-parameterisable) | 'plain' (stage 1 / folded)
  batch_norm     False only for folded models (BN merged into the preceding conv)
  bn_eps, bn_momentum   torch semantics (momentum = new-value weight)

Only the architecture lives here (and in a checkpoint's model_config.json).
Precision, compute dtype and the FFT threshold are execution options:
`msit_jax.ops.runtime.RuntimeOptions`.
"""

from __future__ import annotations

import math

import ml_collections

ENCODERS = ("edsr-baseline", "rdn")
# Execution options that model configs (and model_config.json files) written
# before `msit_jax.ops.runtime` carried; reading such a file drops them.
LEGACY_RUNTIME_FIELDS = ("precision", "dtype", "fft_min_kernel")


def model_config(encoder: str = "edsr-baseline", conv: str = "rim") -> ml_collections.ConfigDict:
    """Paper-size MSIT (dim 256, 8 heads, r 3, 16 MSNO heads, 4 Q/K heads, MLP 4x256)."""
    c = ml_collections.ConfigDict()
    c.encoder = encoder
    c.edsr = ml_collections.ConfigDict(dict(n_resblocks=16, n_feats=64, res_scale=1.0))
    c.rdn = ml_collections.ConfigDict(
        dict(g0=64, kernel_size=3, n_blocks=16, n_layers=8, growth=64))
    c.dim = 256
    c.heads = 8
    c.radius = 3
    c.msno_heads = 16
    c.qk_heads = 4
    c.use_lem = True
    c.mlp_hidden = (256, 256, 256, 256)
    c.posenc_scale = 10.0
    c.posenc_dims = 64
    c.use_cell = True
    c.conv = conv
    c.batch_norm = True
    c.bn_eps = 1e-5
    c.bn_momentum = 0.1
    return c


def tiny_model_config(encoder: str = "edsr-baseline", conv: str = "rim") -> ml_collections.ConfigDict:
    """A few-thousand-parameter MSIT with every component, for tests."""
    c = model_config(encoder, conv)
    c.edsr.n_resblocks, c.edsr.n_feats = 1, 8
    c.rdn.update(g0=8, n_blocks=2, n_layers=2, growth=8)
    c.dim, c.heads = 32, 2
    c.radius = 1
    c.msno_heads, c.qk_heads = 4, 2
    c.mlp_hidden = (16, 16)
    c.posenc_dims = 16
    return c


def validate_model_config(c: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field when a model config is inconsistent."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"invalid model config: {msg}")

    def positive_int(name: str, v) -> None:
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
             f"{name}={v!r} must be a positive integer")

    need(c.encoder in ENCODERS, f"encoder={c.encoder!r}, expected one of {ENCODERS}")
    need(c.conv in ("rim", "plain"), f"conv={c.conv!r}, expected 'rim' or 'plain'")
    # Sizes first: the divisibility rules below divide by them.
    for name in ("dim", "heads", "msno_heads", "qk_heads", "posenc_dims"):
        positive_int(name, c[name])
    need(isinstance(c.radius, int) and c.radius >= 0, f"radius={c.radius!r} must be >= 0")
    for i, h in enumerate(c.mlp_hidden):
        positive_int(f"mlp_hidden[{i}]", h)
    need(math.isfinite(c.posenc_scale), f"posenc_scale={c.posenc_scale!r} must be finite")
    need(math.isfinite(c.bn_eps) and c.bn_eps > 0, f"bn_eps={c.bn_eps!r} must be > 0")
    need(math.isfinite(c.bn_momentum) and 0 <= c.bn_momentum <= 1,
         f"bn_momentum={c.bn_momentum!r} must be in [0, 1]")
    if c.encoder == "edsr-baseline":
        need(isinstance(c.edsr.n_resblocks, int) and c.edsr.n_resblocks >= 0,
             f"edsr.n_resblocks={c.edsr.n_resblocks!r} must be an integer >= 0")
        positive_int("edsr.n_feats", c.edsr.n_feats)
        need(math.isfinite(c.edsr.res_scale), f"edsr.res_scale={c.edsr.res_scale!r} "
             "must be finite")
    need(c.dim % 8 == 0, f"dim={c.dim} must be divisible by 8 (LEM)")
    need(c.dim % c.heads == 0, f"dim={c.dim} not divisible by heads={c.heads}")
    need(c.dim % c.msno_heads == 0, f"dim={c.dim} not divisible by msno_heads={c.msno_heads}")
    need(c.dim % c.qk_heads == 0, f"dim={c.dim} not divisible by qk_heads={c.qk_heads}")
    need(c.radius >= 0, f"radius={c.radius} must be >= 0")
    need(c.posenc_dims % 4 == 0 and c.posenc_dims >= 8,
         f"posenc_dims={c.posenc_dims} must be a multiple of 4, >= 8")
    if c.encoder == "rdn":
        for k in ("g0", "kernel_size", "n_blocks", "n_layers", "growth"):
            positive_int(f"rdn.{k}", c.rdn[k])
