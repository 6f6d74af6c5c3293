"""Model configs (ml_collections). `configs/msit_*.py` wrap these for the CLIs.

Fields:
  encoder        'edsr-baseline' | 'edsr' | 'rdn' | 'rcan' | 'swinir' (the official
                 names; the registry is `msit_jax.models.encoders.ENCODERS`)
  edsr / rdn / rcan / swinir   encoder sizes, official argument names and defaults
                 (EDSR: n_resblocks, n_feats, res_scale, for 'edsr-baseline'
                 16, 64, 1 and for 'edsr' 32, 256, 0.1;
                 RDN: g0, kernel_size, n_blocks, n_layers, growth; the official
                 RDNconfig 'B' is 16, 8, 64;
                 RCAN: n_resgroups, n_resblocks, n_feats, reduction: 10, 20, 64, 16;
                 SwinIR: SwinIR's names, `msit_jax.models.swinir.SWINIR_DEFAULTS`,
                 LTE's only size: embed 180, depths 6 x 6, heads 6, window 8, 64 out).
                 Every config carries every sub-dict; only its encoder's is used
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

from msit_jax.models.encoders import ENCODERS as ENCODER_SPECS
from msit_jax.models.encoders import encoder_spec, sub_config_defaults

ENCODERS = tuple(ENCODER_SPECS)
# Execution options that model configs (and model_config.json files) written
# before `msit_jax.ops.runtime` carried; reading such a file drops them.
LEGACY_RUNTIME_FIELDS = ("precision", "dtype", "fft_min_kernel")


def model_config(encoder: str = "edsr-baseline", conv: str = "rim") -> ml_collections.ConfigDict:
    """Paper-size MSIT (dim 256, 8 heads, r 3, 16 MSNO heads, 4 Q/K heads, MLP 4x256)."""
    c = ml_collections.ConfigDict()
    c.encoder = encoder
    for sub, defaults in sub_config_defaults(encoder).items():
        c[sub] = ml_collections.ConfigDict(defaults)
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
    # The EDSR and RDN sizes shrink whatever the encoder (as they always have);
    # any other encoder's only when it is the one chosen.
    for name in {"edsr-baseline", "rdn", encoder}:
        spec = encoder_spec(name)
        c[spec.sub_config].update(spec.tiny)
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

    need(isinstance(c.encoder, str) and c.encoder in ENCODERS,
         f"encoder={c.encoder!r}, expected one of {ENCODERS}")
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
    spec = encoder_spec(c.encoder)
    spec.check(c[spec.sub_config], need)
    need(c.dim % 8 == 0, f"dim={c.dim} must be divisible by 8 (LEM)")
    need(c.dim % c.heads == 0, f"dim={c.dim} not divisible by heads={c.heads}")
    need(c.dim % c.msno_heads == 0, f"dim={c.dim} not divisible by msno_heads={c.msno_heads}")
    need(c.dim % c.qk_heads == 0, f"dim={c.dim} not divisible by qk_heads={c.qk_heads}")
    need(c.radius >= 0, f"radius={c.radius} must be >= 0")
    need(c.posenc_dims % 4 == 0 and c.posenc_dims >= 8,
         f"posenc_dims={c.posenc_dims} must be a multiple of 4, >= 8")
