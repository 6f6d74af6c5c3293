"""Tiled inference for LR inputs whose encoder activations don't fit in memory.

    up = TiledUpscaler(model_cfg, variables, tile=256)
    sr = up(lr, (out_h, out_w))          # float32 (out_h, out_w, 3) in [0, 1]

The LR image is cut into `tile` x `tile` cores. For each core the encoder runs
on the core plus a halo of `halo(cfg)` LR pixels (clamped to the image), and
the decoder handles exactly the HR pixels whose nearest LR centre lies in the
core, reading features from the core plus `radius + 1` pixels. Memory is set
by the tile (and the chunk), not by the image; the output array is the only
full-size buffer.

Exactness. Convolutions are zero-padded, so a feature is unchanged by cropping
as long as its receptive field (`receptive_radius`) stays inside the window or
meets the window only where the window meets the image border; the halo
guarantees that for every feature the decoder reads. The exception is MSNO's
LEM shift, which pads *circularly*: on the full image, pixels within
`wrap_radius(cfg)` LR pixels of an image border read the opposite border,
while in a window that does not span the whole axis they read the window's
opposite edge. Tiled outputs therefore equal untiled ones (to float32
round-off) except in HR pixels that lie within that many LR pixels of an
image border along an axis split into several tiles; there they are close
approximations (the reference has no tiling; use tile >= the image size, or
the untiled `msit_jax.inference.Engine`, where that matters).

Encoding and decoding use the untiled path's jitted `inference.encode` /
`inference.decode` (one compilation per window size), with query geometry from
`msit_jax.geometry.query_chunks` computed for the full image (tie-exact) and
moved into each window (`window_geometry`).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from msit_jax import geometry

from msit_jax.inference import engine as inference
from msit_jax.inference.engine import Engine
from msit_jax.models.encoders import encoder_sizes, encoder_spec
from msit_jax.ops.runtime import RuntimeOptions
from msit_jax.inference.frontend import Progress, denormalize, normalize

f32 = np.float32


def encoder_radius(cfg: ml_collections.ConfigDict) -> Optional[int]:
    """LR pixels of context per side seen by the encoder backbone (3x3 convs: 1 each);
    None for an encoder with a global receptive field (RCAN's channel attention, SwinIR's
    shifted windows over the padded image)."""
    return encoder_spec(cfg.encoder).radius(encoder_sizes(cfg))


def tileable(cfg: ml_collections.ConfigDict) -> bool:
    """Whether tiles can reproduce the untiled output (a finite receptive field)."""
    return encoder_radius(cfg) is not None


def wrap_radius(cfg: ml_collections.ConfigDict) -> int:
    """Context from the LEM shift on: LEM 1 + MSC (kernel 1 + 2 * heads) + max(Q/K, V)."""
    return int(cfg.use_lem) + cfg.msno_heads + max(cfg.qk_heads, 1)


def receptive_radius(cfg: ml_collections.ConfigDict) -> int:
    """LR pixels of context per side behind one feature of (feat_q, feat_v); ValueError
    for an encoder with a global receptive field (see `tileable`)."""
    enc = encoder_radius(cfg)
    if enc is None:
        raise ValueError(f"the {cfg.encoder} encoder {encoder_spec(cfg.encoder).untiled}, "
                         "so tiles cannot reproduce its output: use tile 0")
    return enc + wrap_radius(cfg)


def halo(cfg: ml_collections.ConfigDict) -> int:
    """Encoder halo around a tile core: the receptive field plus the decoder's reach (r + 1)."""
    return receptive_radius(cfg) + cfg.radius + 1


def axis_tiles(n: int, tile: int) -> list[tuple[int, int]]:
    """[start, stop) cores covering 0..n in steps of `tile`."""
    return [(s, min(s + tile, n)) for s in range(0, n, tile)]


def hr_span(hr_n: int, lr_n: int, core: tuple[int, int]) -> tuple[int, int]:
    """HR indices [a, b) whose nearest LR centre (as the decoder rounds it) is in `core`."""
    idx = geometry.nearest_index(geometry.coord_axis(hr_n), lr_n)
    # Centres of in-image queries never round outside [0, lr_n); clip for safety.
    idx = np.clip(idx, 0, lr_n - 1)
    sel = np.nonzero((idx >= core[0]) & (idx < core[1]))[0]
    return (int(sel[0]), int(sel[-1]) + 1) if sel.size else (0, 0)


def window_coord(c: np.ndarray, n: int, origin: int, n_win: int) -> np.ndarray:
    """A full-image coordinate on an axis of n pixels -> the same point in a window
    [origin, origin + n_win): keeps u = ((c + 1) n - 1) / 2 - origin (float64, then float32)."""
    u = ((c.astype(np.float64) + 1.0) * n - 1.0) / 2.0 - origin
    return ((2.0 * u + 1.0) / n_win - 1.0).astype(f32)


def window_geometry(geom: geometry.QueryGeometry, lr_hw: tuple[int, int],
                    origin: tuple[int, int], win_hw: tuple[int, int]) -> geometry.QueryGeometry:
    """Full-image query geometry (one image: coord (Q, 2), ...) -> the same queries in
    the window of size win_hw at `origin` (row, col) of an lr_hw image: coordinates
    re-expressed by `window_coord`, key indices shifted; rel and rel_cell unchanged."""
    coord = np.stack([window_coord(geom.coord[:, a], lr_hw[a], origin[a], win_hw[a])
                      for a in range(2)], axis=-1)
    key_idx = geom.key_idx - np.asarray(origin, np.int32)[:, None]
    return geom._replace(coord=coord, key_idx=key_idx)


def window(core: tuple[int, int], margin: int, n: int, tile: int) -> tuple[int, int]:
    """[start, stop) of size min(tile + 2 margin, n) holding core +- margin (clipped to 0..n).

    Every window of an image has one size (shifted inward at the borders rather
    than cut), so the encoder and the decoder compile once per image size. An
    edge of the window is either an image edge or >= margin pixels from the core.
    """
    size = min(tile + 2 * margin, n)
    start = min(max(core[0] - margin, 0), n - size)
    return start, start + size


class _Counter:
    """Per-chunk progress across tiles: a tqdm bar, or progress(done, total) calls."""

    def __init__(self, progress: Progress, total: int):
        self.total, self.done = total, 0
        self.callback = progress if callable(progress) else None
        self.bar = None
        if self.callback is None:
            self.bar = tqdm(total=total, desc="decode (tiled)", unit="chunk", leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TiledUpscaler(Engine):
    """`Engine` that encodes and decodes LR tiles of `tile` x `tile` (see module doc).

    tile <= 0 or tile >= both LR sides runs the untiled `Engine` (with `method`);
    tiles are decoded per query (the reference formulation).
    """

    def __init__(self, model_cfg: ml_collections.ConfigDict, variables: Any,
                 chunk: Optional[int] = None, tile: int = 256, method: str = "auto",
                 runtime: Optional[RuntimeOptions] = None, *, self_ensemble: bool = False):
        super().__init__(model_cfg, variables, chunk, method=method, runtime=runtime,
                         self_ensemble=self_ensemble)
        self.tile = int(tile)

    def predict(self, lr: np.ndarray, out_hw: tuple[int, int],
                progress: Progress = False) -> np.ndarray:
        """One tiled pass, unclamped: lr (H, W, 3) [0, 1] -> (out_h, out_w, 3) float32."""
        if self.tile <= 0 or self.tile >= max(lr.shape[:2]):
            return super().predict(lr, out_hw, progress)
        out = np.empty((out_hw[0], out_hw[1], 3), np.float32)
        jobs = list(self._jobs(lr.shape[:2], out_hw))
        bar = None
        if progress:
            total = sum(-(-(ys[1] - ys[0]) * (xs[1] - xs[0]) // self.chunk)
                        for _, _, ys, xs in jobs)
            bar = _Counter(progress, total)
        inp_full = normalize(lr)
        for core_y, core_x, hr_y, hr_x in jobs:
            if hr_y[1] <= hr_y[0] or hr_x[1] <= hr_x[0]:
                continue
            self._tile(inp_full, out, out_hw, core_y, core_x, hr_y, hr_x, bar)
        if bar is not None:
            bar.close()
        return denormalize(out)

    def _jobs(self, lr_hw, out_hw) -> Iterator[tuple]:
        for cy in axis_tiles(lr_hw[0], self.tile):
            hy = hr_span(out_hw[0], lr_hw[0], cy)
            for cx in axis_tiles(lr_hw[1], self.tile):
                yield cy, cx, hy, hr_span(out_hw[1], lr_hw[1], cx)

    def _tile(self, inp_full, out, out_hw, core_y, core_x, hr_y, hr_x, bar) -> None:
        h, w = inp_full.shape[:2]
        r = self.model_cfg.radius
        pad, reach = halo(self.model_cfg), r + 1
        # Encoder window (core + halo) and decoder window (core + reach), of fixed sizes.
        ey, ex = window(core_y, pad, h, self.tile), window(core_x, pad, w, self.tile)
        dy, dx = window(core_y, reach, h, self.tile), window(core_x, reach, w, self.tile)
        inp_enc = jnp.asarray(inp_full[ey[0]:ey[1], ex[0]:ex[1]][None])
        fq, fv = inference.encode(self.model, self.variables, inp_enc)
        crop = (slice(None), slice(dy[0] - ey[0], dy[1] - ey[0]),
                slice(dx[0] - ex[0], dx[1] - ex[0]))
        feats = (fq[crop], fv[crop])
        inp_dec = jnp.asarray(inp_full[dy[0]:dy[1], dx[0]:dx[1]][None])
        del inp_enc, fq, fv

        tw = hr_x[1] - hr_x[0]
        # Tie-exact geometry on the full image (and its rel_cell), then moved into the
        # decoder window: coordinates re-expressed, key indices shifted by integers.
        for start, count, g in geometry.query_chunks(out_hw, (h, w), r, self.chunk,
                                                     region=(hr_y, hr_x)):
            g = window_geometry(g, (h, w), (dy[0], dx[0]), (dy[1] - dy[0], dx[1] - dx[0]))
            pred = inference.decode(self.model, self.variables, feats, inp_dec,
                                    g.add_batch_axis())
            k = np.arange(start, start + count)  # the chunk's real queries (the rest pad)
            out[hr_y[0] + k // tw, hr_x[0] + k % tw] = np.asarray(pred[0, :count])
            if bar is not None:
                bar.update(1)


def auto_tile(model_cfg: ml_collections.ConfigDict, lr_hw: tuple[int, int],
              budget_bytes: float, bytes_per_px_channel: float = 64.0) -> int:
    """A tile size keeping the encoder's estimated activations under a budget; 0 = no tiling.

    The estimate is `bytes_per_px_channel * dim` per encoder-window pixel (measured
    peak for the paper-size model on CPU: see docs/evaluation.md).
    """
    per_px = bytes_per_px_channel * model_cfg.dim
    if lr_hw[0] * lr_hw[1] * per_px <= budget_bytes or not tileable(model_cfg):
        return 0
    side = int(math.sqrt(budget_bytes / per_px)) - 2 * halo(model_cfg)
    return max(side, 32)
