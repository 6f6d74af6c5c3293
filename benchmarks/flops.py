"""Analytic multiply-add counts of MSIT in its reference (direct) formulation.

These are the model's nominal costs, independent of how an implementation
re-associates them (the grid decoder executes far fewer); GFLOP/s figures in
the benchmarks divide these nominal FLOPs (2 x MACs) by wall time.
"""

from __future__ import annotations

import ml_collections

from msit_jax.models.encoders import encoder_spec


def _conv(cin: int, cout: int, k: int, groups: int = 1) -> int:
    return k * k * cin * cout // groups


def _edsr_macs(e) -> int:
    f = e.n_feats
    return _conv(3, f, 3) + e.n_resblocks * 2 * _conv(f, f, 3) + _conv(f, f, 3)


def _rcan_macs(r) -> int:
    # Channel attention's 1x1 convs run on the pooled 1x1 map: nothing per pixel.
    f = r.n_feats
    group = r.n_resblocks * 2 * _conv(f, f, 3) + _conv(f, f, 3)
    return _conv(3, f, 3) + r.n_resgroups * group + _conv(f, f, 3)


def _rdn_macs(r) -> int:
    g0, g, c = r.g0, r.growth, r.n_layers
    block = sum(_conv(g0 + i * g, g, r.kernel_size) for i in range(c)) + _conv(g0 + c * g, g0, 1)
    return (_conv(3, g0, r.kernel_size) + _conv(g0, g0, r.kernel_size) + r.n_blocks * block
            + _conv(r.n_blocks * g0, g0, 1) + _conv(g0, g0, r.kernel_size))


def _swinir_res_conv(resi_connection: str, c: int) -> int:
    if resi_connection == "3conv":
        return _conv(c, c // 4, 3) + _conv(c // 4, c // 4, 1) + _conv(c // 4, c, 3)
    return _conv(c, c, 3)


def _swinir_macs(s) -> int:
    """Per token of the unpadded map (the padding to a multiple of the window is not
    counted): per block qkv, Q.K and A.V over the window's w^2 keys, the projection and
    the MLP; a residual conv per stage, conv_after_body and conv_before_upsample."""
    c, n = s.embed_dim, s.window_size ** 2
    block = 3 * c * c + 2 * n * c + c * c + 2 * c * int(c * s.mlp_ratio)
    stages = sum(depth * block + _swinir_res_conv(s.resi_connection, c) for depth in s.depths)
    return (_conv(3, c, 3) + stages + _swinir_res_conv(s.resi_connection, c)
            + _conv(c, s.num_feat, 3))


# Per-pixel encoder multiply-adds by layout family (encoders of one family, e.g.
# edsr-baseline and edsr, differ only in their sizes).
ENCODER_MACS = {"edsr": _edsr_macs, "rcan": _rcan_macs, "rdn": _rdn_macs, "swinir": _swinir_macs}


def encoder_macs_per_pixel(cfg: ml_collections.ConfigDict) -> int:
    """Encoder + conv_ch + MSNO + V + Q/K branches, per LR pixel."""
    spec = encoder_spec(cfg.encoder)
    if spec.family not in ENCODER_MACS:
        raise ValueError(f"no multiply-add count for the {cfg.encoder!r} encoder "
                         f"(family {spec.family!r})")
    sizes = cfg[spec.sub_config]
    enc, f = ENCODER_MACS[spec.family](sizes), spec.out_features(sizes)
    d = cfg.dim
    hc, qc = d // cfg.msno_heads, d // cfg.qk_heads
    msno = (2 * _conv(d, d, 1) + sum(_conv(hc, hc, 3 + 2 * i) for i in range(cfg.msno_heads))
            + _conv(d, 2 * d, 1, cfg.msno_heads) + _conv(2 * d, d, 1) + _conv(d, d, 1))
    v = _conv(d, d, 3)
    qk = (_conv(d, d, 1) + sum(_conv(qc, qc, 3 + 2 * i) for i in range(cfg.qk_heads))
          + _conv(d, 2 * d, 1, d // cfg.qk_heads) + _conv(2 * d, d, 1))
    return enc + _conv(f, d, 1) + msno + v + qk


def decoder_macs_per_query(cfg: ml_collections.ConfigDict) -> int:
    """Attention (Q.K, positional bias, weighting) and the MLP, per HR query."""
    n = (2 * cfg.radius + 1) ** 2
    d = cfg.dim
    attn = n * d + n * cfg.posenc_dims * cfg.heads + n * d
    dims = [n * d + (2 if cfg.use_cell else 0), *cfg.mlp_hidden, 3]
    mlp = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return attn + mlp


def inference_flops(cfg: ml_collections.ConfigDict, lr_hw: tuple[int, int],
                    out_hw: tuple[int, int]) -> float:
    return 2.0 * (lr_hw[0] * lr_hw[1] * encoder_macs_per_pixel(cfg)
                  + out_hw[0] * out_hw[1] * decoder_macs_per_query(cfg))


def train_step_flops(cfg: ml_collections.ConfigDict, batch: int, lr_size: int, queries: int
                     ) -> float:
    """Forward + backward, counted as 3x the forward (input and weight gradients)."""
    fwd = batch * (lr_size * lr_size * encoder_macs_per_pixel(cfg)
                   + queries * decoder_macs_per_query(cfg))
    return 2.0 * 3 * fwd
