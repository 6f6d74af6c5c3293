"""Host-side (numpy float32) query geometry, bit-exact with the reference.

The decoder's nearest-centre lookup is a discontinuous function of the query
coordinate: at non-integer scales many HR pixel centres sit exactly halfway
between two LR centres, and the winner depends on the float32 rounding of the
coordinate arithmetic. XLA fuses such chains into FMAs, which flips ties, so
every tie-sensitive quantity is computed here in numpy float32 with exactly one
rounding per operation, in the reference's order (DESIGN.md section 3).

Coordinates are pixel centres in [-1, 1], ordered (row, col).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

f32 = np.float32


def coord_axis(n: int) -> np.ndarray:
    """Pixel-centre coordinates of an axis of size n: (n,) float32.

    The reference computes `(-1 + r) + (2 r) * arange(n)` with r = 1/n in
    float64 and the products/sums in float32.
    """
    if n <= 0:
        raise ValueError(f"axis size must be positive, got {n}")
    r = 1.0 / n
    return f32(-1.0 + r) + f32(2.0 * r) * np.arange(n, dtype=f32)


def make_coord(hw: tuple[int, int]) -> np.ndarray:
    """Pixel-centre grid of an (H, W) image: (H, W, 2) float32, (row, col)."""
    ys, xs = coord_axis(hw[0]), coord_axis(hw[1])
    grid = np.empty((hw[0], hw[1], 2), f32)
    grid[..., 0] = ys[:, None]
    grid[..., 1] = xs[None, :]
    return grid


def nearest_index(c: np.ndarray, n: int) -> np.ndarray:
    """grid_sample(mode='nearest', align_corners=False) index along one axis.

    u = ((c + 1) * n - 1) / 2 in float32, rounded half to even. The result may
    fall outside [0, n-1]; the caller treats such samples as zeros.
    """
    c = np.asarray(c, f32)
    u = ((c + f32(1)) * f32(n) - f32(1)) / f32(2)
    return np.rint(u).astype(np.int32)


def neighbour_offsets(n: int, r: int) -> np.ndarray:
    """(2r+1,) float32 offsets a * (2/n), a = -r..r, as the reference rounds them."""
    return np.arange(-r, r + 1, dtype=f32) * f32(2.0 / n)


class QueryGeometry(NamedTuple):
    """Per-query geometry for the local decoder; leading dims (...) are queries.

    coord:   (..., 2) float32 query coordinate (row, col).
    key_idx: (..., 2, 2r+1) int32 LR row / col index of each neighbour slot
             (outside [0, n) means a zero key/value).
    rel:     (..., 2, 2r+1) float32 (query - key) in units where one LR pixel
             is 2, per axis.
    """

    coord: np.ndarray
    key_idx: np.ndarray
    rel: np.ndarray


def query_geometry(coord: np.ndarray, lr_hw: tuple[int, int], r: int) -> QueryGeometry:
    """Neighbourhood geometry of queries `coord` (..., 2) on an LR grid (H, W).

    Mirrors the reference step by step: nearest LR centre c_q (zero when the
    nearest lookup falls outside the image, as grid_sample's zero padding
    does), keys c_q + offsets, key indices by nearest lookup,
    rel = (x_q - key) * n.
    """
    coord = np.asarray(coord, f32)
    if coord.shape[-1] != 2:
        raise ValueError(f"coord must end in 2 (row, col), got shape {coord.shape}")
    h, w = lr_hw
    iy = nearest_index(coord[..., 0], h)
    ix = nearest_index(coord[..., 1], w)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    ys, xs = coord_axis(h), coord_axis(w)
    cy = np.where(inside, ys[np.clip(iy, 0, h - 1)], f32(0))
    cx = np.where(inside, xs[np.clip(ix, 0, w - 1)], f32(0))

    key_idx = np.empty(coord.shape[:-1] + (2, 2 * r + 1), np.int32)
    rel = np.empty(coord.shape[:-1] + (2, 2 * r + 1), f32)
    for axis, (c, n) in enumerate(((cy, h), (cx, w))):
        keys = c[..., None] + neighbour_offsets(n, r)
        key_idx[..., axis, :] = nearest_index(keys, n)
        rel[..., axis, :] = (coord[..., axis, None] - keys) * f32(n)
    return QueryGeometry(coord, key_idx, rel)


def rel_cell(out_hw: tuple[int, int], lr_hw: tuple[int, int]) -> np.ndarray:
    """The decoder's cell input, cell * (H_lr, W_lr) with cell = 2 / HR size: (2,)."""
    cell = np.array([2.0 / out_hw[0], 2.0 / out_hw[1]], f32)
    return cell * np.array(lr_hw, f32)


def query_chunks(out_hw: tuple[int, int], lr_hw: tuple[int, int], radius: int, chunk: int
                 ) -> Iterator[tuple[int, int, QueryGeometry]]:
    """(start, count, geometry padded to `chunk` queries) for the HR grid in raster order.

    The last chunk is padded by repeating its last real query (its outputs are
    dropped), so every chunk has the same shape and one compiled decoder serves all.
    """
    h, w = out_hw
    ys, xs = coord_axis(h), coord_axis(w)
    total = h * w
    for start in range(0, total, chunk):
        idx = np.arange(start, start + chunk)
        count = min(chunk, total - start)
        idx[count:] = idx[count - 1]
        coord = np.stack([ys[idx // w], xs[idx % w]], axis=-1)
        yield start, count, query_geometry(coord, lr_hw, radius)


def tie_mask(out_hw: tuple[int, int], lr_hw: tuple[int, int]) -> np.ndarray:
    """(out_h, out_w) bool: HR pixels whose nearest-LR-centre lookup is an exact .5 tie
    on either axis (u = ((c + 1) n - 1) / 2 in float32 has fraction 0.5).

    At such pixels the chosen centre depends on the last float32 rounding of the
    coordinate arithmetic; an implementation that fuses operations (FMA) may pick
    the other centre. Non-integer scales have them, integer scales have none.
    """
    ties = []
    for n_hr, n_lr in zip(out_hw, lr_hw):
        c = coord_axis(n_hr)
        u = ((c + f32(1)) * f32(n_lr) - f32(1)) / f32(2)
        ties.append(u - np.floor(u) == f32(0.5))
    return ties[0][:, None] | ties[1][None, :]
