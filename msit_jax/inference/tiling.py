"""Tile geometry for LR inputs whose encoder activations don't fit in memory: pure
functions (window sizes, halo, per-axis tiles, moved query geometry) that
`msit_jax.inference.engine.Engine` runs with its `tile` argument:

    sr = Engine(model_cfg, variables, tile=256)(lr, (out_h, out_w))

The LR image is cut into `tile` x `tile` cores. For each core the encoder runs
on the core plus a halo of `halo(cfg)` LR pixels (clamped to the image), and
the decoder handles exactly the HR pixels whose nearest LR centre lies in the
core, reading features from the core plus `radius + 1` pixels. Memory is set
by the tile (and the chunk), not by the image; the output array is the only
full-size buffer. The tile the memory budget calls for is `budget.auto_tile`.

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
tile 0, where that matters).

Encoding and decoding use the untiled path's jitted `engine.encode` /
`engine.decode` (one compilation per window size), with query geometry from
`msit_jax.geometry.query_chunks` computed for the full image (tie-exact) and
moved into each window (`window_geometry`).
"""

from __future__ import annotations

from typing import Iterator, Optional

import ml_collections
import numpy as np

from msit_jax import geometry
from msit_jax.models.encoders import encoder_sizes, encoder_spec

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


def tiled(lr_hw: tuple[int, int], tile: int) -> bool:
    """Whether `tile` splits an lr_hw image: 0 < tile < its longer side (else one
    window is the whole image, and the untiled path runs)."""
    return 0 < tile < max(lr_hw)


def jobs(lr_hw: tuple[int, int], out_hw: tuple[int, int], tile: int
         ) -> Iterator[tuple[tuple[int, int], ...]]:
    """(core_y, core_x, hr_y, hr_x) per tile, raster order: LR cores [start, stop) and
    the HR spans whose nearest LR centre lies in them (`hr_span`; empty ones included)."""
    for cy in axis_tiles(lr_hw[0], tile):
        hy = hr_span(out_hw[0], lr_hw[0], cy)
        for cx in axis_tiles(lr_hw[1], tile):
            yield cy, cx, hy, hr_span(out_hw[1], lr_hw[1], cx)
