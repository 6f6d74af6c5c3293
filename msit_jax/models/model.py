"""MSIT: encoder -> conv_ch -> MSNO -> (V, Q/K) -> local implicit decoder.

Images are NHWC and normalised, `inp = (lr - 0.5) / 0.5`; predictions are in
the same space. Build a model with `build_model(model_cfg, runtime)`: the
model config is the architecture, `RuntimeOptions` how it runs (precision,
compute dtype, FFT threshold, ...): every module takes it as one `runtime` field.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from msit_jax.geometry import QueryGeometry, make_coord, query_geometry, rel_cell
from msit_jax.models.config import validate_model_config
from msit_jax.models.decoder import BatchedDecoder
from msit_jax.models.encoders import encoder_dropout, make_encoder
from msit_jax.models.layers import Conv
from msit_jax.models.msno import MSNO, QKBranch, rim_or_plain_conv
from msit_jax.ops.runtime import RuntimeOptions

Array = jax.Array


class MSIT(nn.Module):
    """The full model: `cfg` the architecture (see `msit_jax.models.config`), `runtime`
    the execution options (see `msit_jax.ops.runtime`)."""

    cfg: ml_collections.FrozenConfigDict
    runtime: RuntimeOptions = RuntimeOptions()

    def setup(self):
        c, rt = self.cfg, self.runtime
        # The FFT and pixel-block thresholds are for the multi-scale convs (MSNO and the
        # Q/K heads); the encoder, conv_ch and conv_vs_0 always convolve directly.
        direct = rt.direct_convs()
        bn = dict(batch_norm=c.batch_norm, bn_eps=c.bn_eps, bn_momentum=c.bn_momentum)
        self.encoder = make_encoder(c, direct)
        self.conv_ch = Conv(c.dim, 1, runtime=direct)
        self.amsno = MSNO(c.dim, c.msno_heads, c.use_lem, c.conv, **bn, runtime=rt)
        self.conv_vs_0 = rim_or_plain_conv(c.conv, c.dim, 3, "torch", "conv_vs_0", direct)
        self.multi_conv_qs_0 = QKBranch(c.dim, c.qk_heads, c.conv, **bn, runtime=rt)
        self.decoder = BatchedDecoder(c.heads, c.posenc_scale, c.posenc_dims,
                                      tuple(c.mlp_hidden), c.use_cell, runtime=rt)

    def encode(self, inp: Array, train: bool = False) -> tuple[Array, Array]:
        """Feature maps for the decoder: inp (B, H, W, 3) -> (feat_q, feat_v), each (B, H, W, dim)."""
        # SwinIR's stochastic depth in training (a 'dropout' rng: training.step)
        enc = self.encoder(inp, train) if encoder_dropout(self.cfg) else self.encoder(inp)
        feat = self.amsno(self.conv_ch(enc), train)
        return self.multi_conv_qs_0(feat, train), self.conv_vs_0(feat)

    def decode(self, feats: tuple[Array, Array], inp: Array, geom: QueryGeometry) -> Array:
        """Predictions at queries: (B, Q, 3). feats from `encode`, inp (B, H, W, 3),
        geom with coord (B, Q, 2) ... rel_cell (B, 2) (see `QueryGeometry`)."""
        feat_q, feat_v = feats
        return self.decoder(feat_q, feat_v, inp, geom)

    def __call__(self, inp: Array, geom: QueryGeometry, train: bool = False) -> Array:
        """inp (B, H, W, 3) and its queries' geometry (coord (B, Q, 2), ...) -> (B, Q, 3)."""
        return self.decode(self.encode(inp, train), inp, geom)


def build_model(model_cfg: ml_collections.ConfigDict,
                runtime: Optional[RuntimeOptions] = None) -> MSIT:
    """An MSIT module for a model config (validated, frozen so it hashes for jit)
    and execution options (default: float32, precision 'highest', per-platform FFT)."""
    validate_model_config(model_cfg)
    return MSIT(ml_collections.FrozenConfigDict(model_cfg), runtime or RuntimeOptions())


def dummy_inputs(model_cfg: ml_collections.ConfigDict, inp_hw: tuple[int, int],
                 num_queries: int) -> tuple[np.ndarray, QueryGeometry]:
    """Model inputs of the given shapes for `model.init` / `jax.eval_shape`: (inp, geom).

    A batch of one: inp (1, H, W, 3) zeros and the geometry of `num_queries`
    pixel centres of an H x W output (identity scale). Only the shapes and dtypes
    matter: no variable's shape or initial value depends on the input sizes.
    """
    h, w = inp_hw
    coord = np.resize(make_coord((h, w)).reshape(-1, 2), (num_queries, 2))
    geom = query_geometry(coord, (h, w), model_cfg.radius, rel_cell((h, w), (h, w)))
    return np.zeros((1, h, w, 3), np.float32), geom.add_batch_axis()


def variable_shapes(model_cfg: ml_collections.ConfigDict) -> dict:
    """Shapes of every variable of the configured model (no compute, no memory)."""
    model = build_model(model_cfg)
    inputs = dummy_inputs(model_cfg, (4, 4), 16)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    return jax.tree_util.tree_map(lambda s: s.shape, shapes)
