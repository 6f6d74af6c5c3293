"""Analytic multiply-add counts of MSIT in its reference (direct) formulation.

These are the model's nominal costs, independent of how an implementation
re-associates them (the grid decoder executes far fewer); GFLOP/s figures in
the benchmarks divide these nominal FLOPs (2 x MACs) by wall time.
"""

from __future__ import annotations

import ml_collections


def _conv(cin: int, cout: int, k: int, groups: int = 1) -> int:
    return k * k * cin * cout // groups


def encoder_macs_per_pixel(cfg: ml_collections.ConfigDict) -> int:
    """Encoder + conv_ch + MSNO + V + Q/K branches, per LR pixel."""
    d = cfg.dim
    if cfg.encoder in ("edsr-baseline", "edsr"):  # one family, sized by cfg.edsr
        f = cfg.edsr.n_feats
        enc = _conv(3, f, 3) + cfg.edsr.n_resblocks * 2 * _conv(f, f, 3) + _conv(f, f, 3)
    elif cfg.encoder == "rcan":
        # Channel attention's 1x1 convs run on the pooled 1x1 map: nothing per pixel.
        r = cfg.rcan
        f = r.n_feats
        group = r.n_resblocks * 2 * _conv(f, f, 3) + _conv(f, f, 3)
        enc = _conv(3, f, 3) + r.n_resgroups * group + _conv(f, f, 3)
    elif cfg.encoder == "rdn":
        r = cfg.rdn
        g0, g, c = r.g0, r.growth, r.n_layers
        block = sum(_conv(g0 + i * g, g, r.kernel_size) for i in range(c)) + _conv(g0 + c * g, g0, 1)
        enc = (_conv(3, g0, r.kernel_size) + _conv(g0, g0, r.kernel_size) + r.n_blocks * block
               + _conv(r.n_blocks * g0, g0, 1) + _conv(g0, g0, r.kernel_size))
        f = g0
    else:
        raise ValueError(f"no multiply-add count for the {cfg.encoder!r} encoder")
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
