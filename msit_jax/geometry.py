"""Host-side (numpy float32) query geometry, bit-exact with the reference.

The decoder's nearest-centre lookup is a discontinuous function of the query
coordinate: at non-integer scales many HR pixel centres sit exactly halfway
between two LR centres, and the winner depends on the float32 rounding of the
coordinate arithmetic. XLA fuses such chains into FMAs, which flips ties, so
every tie-sensitive quantity is computed here in numpy float32 with exactly one
rounding per operation, in the reference's order (docs/design.md#3-query-geometry-and-tie-rules).

Coordinates are pixel centres in [-1, 1], ordered (row, col).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

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
    """The decoder's query input: where each query sits and which LR keys it reads.

    One type for every consumer (the model, the decoders, inference, tiling,
    training batches, lowered programs). It is a NamedTuple, so it is a JAX
    pytree: it passes through `jax.jit`, `jax.vmap` and shardings as it is, and
    numpy-only code (this module, the exported-artifact runners) needs no JAX.

    Shapes, for B images of Q queries each and n = 2r+1 neighbour slots per axis
    (host code also uses one image, without the leading B):
      coord:    (B, Q, 2) float32 query coordinate (row, col) in [-1, 1].
      key_idx:  (B, Q, 2, n) int32 LR row / col index of each neighbour slot
                (outside [0, H) / [0, W) means a zero key and value).
      rel:      (B, Q, 2, n) float32 (query - key) per axis, in units where one
                LR pixel is 2.
      rel_cell: (B, 2) float32 the decoder's cell input, one per image:
                cell * (H_lr, W_lr) with cell = 2 / (H_hr, W_hr) (see `rel_cell`).
    """

    coord: np.ndarray
    key_idx: np.ndarray
    rel: np.ndarray
    rel_cell: np.ndarray

    def add_batch_axis(self) -> "QueryGeometry":
        """The geometry of one image as a batch of one: every field gets a leading axis 1."""
        return QueryGeometry(*(np.asarray(x)[None] for x in self))


def query_geometry(coord: np.ndarray, lr_hw: tuple[int, int], radius: int,
                   rel_cell: np.ndarray) -> QueryGeometry:
    """Neighbourhood geometry of queries `coord` (..., Q, 2) on an LR grid (H, W).

    rel_cell: (..., 2), the cell input of each image (usually `rel_cell(out_hw,
    lr_hw)`); its leading dims are those of `coord` without the query axis.

    Mirrors the reference step by step: nearest LR centre c_q (zero when the
    nearest lookup falls outside the image, as grid_sample's zero padding
    does), keys c_q + offsets, key indices by nearest lookup,
    rel = (x_q - key) * n.
    """
    coord = np.asarray(coord, f32)
    rel_cell = np.asarray(rel_cell, f32)
    if coord.ndim < 2 or coord.shape[-1] != 2:
        raise ValueError(f"coord must be (..., Q, 2) (row, col), got shape {coord.shape}")
    if rel_cell.shape != coord.shape[:-2] + (2,):
        raise ValueError(f"rel_cell must be {coord.shape[:-2] + (2,)} for coord "
                         f"{coord.shape}, got {rel_cell.shape}")
    h, w = lr_hw
    iy = nearest_index(coord[..., 0], h)
    ix = nearest_index(coord[..., 1], w)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    ys, xs = coord_axis(h), coord_axis(w)
    cy = np.where(inside, ys[np.clip(iy, 0, h - 1)], f32(0))
    cx = np.where(inside, xs[np.clip(ix, 0, w - 1)], f32(0))

    key_idx = np.empty(coord.shape[:-1] + (2, 2 * radius + 1), np.int32)
    rel = np.empty(coord.shape[:-1] + (2, 2 * radius + 1), f32)
    for axis, (c, n) in enumerate(((cy, h), (cx, w))):
        keys = c[..., None] + neighbour_offsets(n, radius)
        key_idx[..., axis, :] = nearest_index(keys, n)
        rel[..., axis, :] = (coord[..., axis, None] - keys) * f32(n)
    return QueryGeometry(coord, key_idx, rel, rel_cell)


def axis_geometry(n_hr: int, n_lr: int, radius: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis's geometry for the pixel centres of an HR axis of n_hr on an LR axis of
    n_lr: coord (n_hr,), key_idx (n_hr, 2r+1) and rel (n_hr, 2r+1), what
    `query_geometry` gives a query on HR row i of a square grid (the axis as that grid's
    diagonal: the same call, so the same float32 roundings).

    On a grid a query's row geometry depends on its row alone, provided its nearest LR
    centre lies inside the image on both axes (`query_geometry` zeroes the centre
    otherwise); the callers (the grid decoder's plans, the lean training batches) check it.
    """
    coord = coord_axis(n_hr)
    g = query_geometry(np.stack([coord, coord], -1), (n_lr, n_lr), radius,
                       rel_cell((n_hr, n_hr), (n_lr, n_lr)))
    return coord, g.key_idx[:, 0], g.rel[:, 0]


def rel_cell(out_hw: tuple[int, int], lr_hw: tuple[int, int]) -> np.ndarray:
    """The decoder's cell input, cell * (H_lr, W_lr) with cell = 2 / HR size: (2,)."""
    cell = np.array([2.0 / out_hw[0], 2.0 / out_hw[1]], f32)
    return cell * np.array(lr_hw, f32)


def query_chunks(out_hw: tuple[int, int], lr_hw: tuple[int, int], radius: int, chunk: int,
                 region: Optional[tuple[tuple[int, int], tuple[int, int]]] = None
                 ) -> Iterator[tuple[int, int, QueryGeometry]]:
    """(start, count, geometry of `chunk` queries) over an HR grid (H, W) in raster order.

    region: ((y0, y1), (x0, x1)), the HR rows [y0, y1) and columns [x0, x1) to
    cover (default: all of them); `start` counts queries in the region's raster
    order, so query k of the region is pixel (y0 + k // (x1 - x0), x0 + k % (x1 - x0)).
    The last chunk is padded by repeating its last real query (its outputs are
    dropped), so every chunk has the same shape and one compiled decoder serves
    all. Each geometry is one image's (coord (chunk, 2), ..., rel_cell (2,)).
    """
    (y0, y1), (x0, x1) = region if region is not None else ((0, out_hw[0]), (0, out_hw[1]))
    ys, xs = coord_axis(out_hw[0])[y0:y1], coord_axis(out_hw[1])[x0:x1]
    w = len(xs)
    total = len(ys) * w
    cell = rel_cell(out_hw, lr_hw)
    for start in range(0, total, chunk):
        idx = np.arange(start, start + chunk)
        count = min(chunk, total - start)
        idx[count:] = idx[count - 1]
        coord = np.stack([ys[idx // w], xs[idx % w]], axis=-1)
        yield start, count, query_geometry(coord, lr_hw, radius, cell)


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
