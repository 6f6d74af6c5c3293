"""MSIT: encoder -> conv_ch -> MSNO -> (V, Q/K) -> local implicit decoder.

Images are NHWC and normalised, `inp = (lr - 0.5) / 0.5`; predictions are in
the same space. Build a model with `build_model(model_cfg)`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msit_jax.decoder import BatchedDecoder
from msit_jax.encoders import make_encoder
from msit_jax.layers import Conv, Precision, parse_precision
from msit_jax.msno import MSNO, QKBranch, scale_conv

Array = jax.Array


class MSIT(nn.Module):
    """The full model. Fields mirror the model config (see `msit_jax.config`)."""

    cfg: ml_collections.FrozenConfigDict

    def setup(self):
        c = self.cfg
        prec = parse_precision(c.precision)
        dtype = jnp.dtype(c.dtype)
        kw = dict(precision=prec, dtype=dtype)
        bn = dict(batch_norm=c.batch_norm, bn_eps=c.bn_eps, bn_momentum=c.bn_momentum)
        self.encoder = make_encoder(c, prec, dtype)
        self.conv_ch = Conv(c.dim, 1, **kw)
        fft = dict(fft_min_kernel=c.fft_min_kernel)
        self.amsno = MSNO(c.dim, c.msno_heads, c.use_lem, c.conv, **bn, **kw, **fft)
        self.conv_vs_0 = scale_conv(c.conv, c.dim, 3, "torch", "conv_vs_0", prec, dtype)
        self.multi_conv_qs_0 = QKBranch(c.dim, c.qk_heads, c.conv, **bn, **kw, **fft)
        self.decoder = BatchedDecoder(c.heads, c.posenc_scale, c.posenc_dims,
                                      tuple(c.mlp_hidden), c.use_cell, **kw)

    def encode(self, inp: Array, train: bool = False) -> tuple[Array, Array]:
        """Feature maps for the decoder: inp (B, H, W, 3) -> (feat_q, feat_v), each (B, H, W, dim)."""
        feat = self.amsno(self.conv_ch(self.encoder(inp)), train)
        return self.multi_conv_qs_0(feat, train), self.conv_vs_0(feat)

    def decode(self, feats: tuple[Array, Array], inp: Array, coord: Array, key_idx: Array,
               rel: Array, rel_cell: Array) -> Array:
        """Predictions at queries: (B, Q, 3). Geometry as in `BatchedDecoder`."""
        feat_q, feat_v = feats
        return self.decoder(feat_q, feat_v, inp, coord, key_idx, rel, rel_cell)

    def __call__(self, inp: Array, coord: Array, key_idx: Array, rel: Array, rel_cell: Array,
                 train: bool = False) -> Array:
        """inp (B, H, W, 3) and query geometry (B, Q, ...) -> (B, Q, 3)."""
        return self.decode(self.encode(inp, train), inp, coord, key_idx, rel, rel_cell)


def build_model(model_cfg: ml_collections.ConfigDict) -> MSIT:
    """An MSIT module for a model config (validated, frozen so it hashes for jit)."""
    from msit_jax.config import validate_model_config

    validate_model_config(model_cfg)
    return MSIT(ml_collections.FrozenConfigDict(model_cfg))
