"""The lean host->device encoding of training batches (the training pipeline's default).

A `protocol.Batch` carries float32 pixels and a float32/int32 neighbourhood
geometry per query: 331,792 bytes per example at the paper's sizes, 83% of it
geometry. Almost all of it is redundant:

* pixels are uint8 before normalisation, and normalisation is a function of
  the byte: a 256-entry float32 table (`norm_table`) gathered on the device
  gives `protocol.normalize_uint8` exactly;
* the queries are HR pixel centres of the hr x hr crop and the LR side is
  inp_size for every example, so each query's coord / key_idx / rel on an axis
  is a function of its HR row (resp. column) index alone (the nearest LR centre
  of a training query is always inside the patch: `geometry_table` checks it,
  so `query_geometry`'s zero-padding branch never mixes the axes). One scale,
  hence one hr, per batch makes one small table serve the whole batch.

A lean example is {'inp_u8' (h, h, 3) uint8, 'gt_u8' (Q, 3) uint8, 'q_rc' (Q, 2)
int16, 'hr' () int32} (`protocol.make_lean_example`: the same draws as
`make_example`); a lean batch stacks them and adds the table of its hr
(`add_table`): 'geo_coord' (T,) float32, 'geo_key_idx' (T, n) int32, 'geo_rel'
(T, n) float32, 'geo_rel_cell' (2,) float32 and 'norm' (256,) float32, with
T = hr_max(protocol) rows (padded: a static shape, one compilation). `expand`
turns it into the `Batch` that `make_example` + `collate` gives, bit for bit: it
only gathers and stacks, which round nothing on any backend. The table is built
on the host in numpy float32 like every tie-sensitive quantity
(docs/design.md#3-query-geometry-and-tie-rules).

Sharding: the per-example arrays are sharded over the batch axis as before; the
table has no batch axis and is replicated (`to_global` in `pipeline`, the
train step's in_shardings in `training.step`). Every host builds the same table
from the step's hr, so multi-host runs need no communication for it.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import numpy as np

from msit_jax import geometry
from msit_jax.data.protocol import Batch, Protocol, crop_size, normalize_uint8

f32 = np.float32

EXAMPLE_KEYS = ("inp_u8", "gt_u8", "q_rc")
# Flat-dict keys of the per-batch table, in `GeometryTable` field order.
TABLE_KEYS = ("geo_coord", "geo_key_idx", "geo_rel", "geo_rel_cell", "norm")


class GeometryTable(NamedTuple):
    """Per-batch lookup tables (T rows, n = 2r+1; rows >= hr are padding, never read):
      coord    (T,) float32      pixel-centre coordinate of HR row/col i of the crop
      key_idx  (T, n) int32      LR key indices of a query on HR row/col i
      rel      (T, n) float32    its (query - key) * h per key
      rel_cell (2,) float32      the batch's rel_cell
      norm     (256,) float32    protocol.normalize_uint8 of each byte value
    """

    coord: Any
    key_idx: Any
    rel: Any
    rel_cell: Any
    norm: Any


class LeanBatch(NamedTuple):
    """A lean training batch (a pytree: it passes through jit and shardings as it is).

      inp_u8 (B, h, h, 3) uint8   LR patches
      gt_u8  (B, Q, 3) uint8      HR values at the queries
      q_rc   (B, Q, 2) int16      (row, col) of each query in the hr x hr crop
      table  GeometryTable        shared by the batch (no batch axis: replicated)
    """

    inp_u8: Any
    gt_u8: Any
    q_rc: Any
    table: GeometryTable

    @classmethod
    def from_flat(cls, arrays: Mapping[str, Any]) -> "LeanBatch":
        """From a pipeline batch (`EXAMPLE_KEYS` + `TABLE_KEYS`; 'hr', 'step' left out)."""
        return cls(*(arrays[k] for k in EXAMPLE_KEYS),
                   GeometryTable(*(arrays[k] for k in TABLE_KEYS)))

    def to_flat(self) -> dict[str, Any]:
        return dict(zip(EXAMPLE_KEYS, self[:3]), **dict(zip(TABLE_KEYS, self.table)))


def is_lean(arrays: Mapping[str, Any]) -> bool:
    """Whether a flat example/batch dict is in the lean encoding."""
    return "q_rc" in arrays


def hr_max(p: Protocol) -> int:
    """Table rows: the largest crop side of the protocol (shrink_scale only shrinks)."""
    return crop_size(p.scale_max, p.inp_size)


@functools.lru_cache(maxsize=1)
def norm_table() -> np.ndarray:
    """(256,) float32: normalize_uint8 of every byte value (read-only)."""
    t = normalize_uint8(np.arange(256, dtype=np.uint8))
    t.setflags(write=False)
    return t


@functools.lru_cache(maxsize=64)
def geometry_table(hr: int, inp_size: int, radius: int, rows: int) -> GeometryTable:
    """The table of crop side hr (LR side inp_size), padded to `rows` rows (read-only
    arrays; cached, since a run has few distinct hr). Pure function of its arguments.

    Row i holds what `geometry.query_geometry` gives a query on HR row i
    (`geometry.axis_geometry`: the same call, so the same float32 roundings); by
    symmetry of the square crop and patch, the same for column i.
    """
    if not 1 <= hr <= rows:
        raise ValueError(f"crop side {hr} is outside the table's 1..{rows} rows "
                         "(data.scale_max sets them)")
    ys = geometry.coord_axis(hr)
    near = geometry.nearest_index(ys, inp_size)
    if near.min() < 0 or near.max() >= inp_size:
        # query_geometry zeroes the centre of a query outside on *either* axis, which
        # would make an axis depend on the other one: the table could not express it.
        raise ValueError(f"crop side {hr}: a query's nearest LR centre falls outside the "
                         f"{inp_size}-pixel patch")
    n = 2 * radius + 1
    coord = np.zeros(rows, f32)
    key_idx = np.zeros((rows, n), np.int32)
    rel = np.zeros((rows, n), f32)
    coord[:hr], key_idx[:hr], rel[:hr] = geometry.axis_geometry(hr, inp_size, radius)
    table = GeometryTable(coord, key_idx, rel,
                          geometry.rel_cell((hr, hr), (inp_size, inp_size)), norm_table())
    for a in table:
        a.setflags(write=False)
    return table


def batch_table(hr: np.ndarray, p: Protocol) -> GeometryTable:
    """The table of a (local) batch from its hr (B,) int32, which must be one value."""
    hr = np.asarray(hr)
    if hr.size == 0 or (hr != hr.flat[0]).any():
        raise ValueError(f"a lean batch needs one crop side, got {np.unique(hr)}")
    return geometry_table(int(hr.flat[0]), p.inp_size, p.radius, hr_max(p))


class AddTable:
    """Batch map (grain): a stacked lean batch -> the same dict plus its table's keys.
    A pure function of the batch's hr, so the stream stays a function of
    (seed, step, row) and the iterator state is unchanged."""

    def __init__(self, protocol: Protocol):
        self.protocol = protocol

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(batch, **dict(zip(TABLE_KEYS, batch_table(batch["hr"], self.protocol))))


def expand(lean: LeanBatch) -> Batch:
    """The `Batch` of a lean batch: (B, h, h, 3) / geometry / (B, Q, 3), bit-identical to
    `make_example` + `collate` of the same draws.

    Gathers and stacks only (no arithmetic), so it is exact on any backend and under
    jit. numpy arrays give numpy; jax arrays or tracers give jax.numpy (inside the
    jitted train step: only the lean arrays cross host->device).
    """
    leaves = (lean.inp_u8, lean.gt_u8, lean.q_rc, *lean.table)
    if all(isinstance(x, np.ndarray) for x in leaves):
        xp = np
    else:
        import jax.numpy as xp
    t = lean.table
    q = lean.q_rc.astype(np.int32)
    r, c = q[..., 0], q[..., 1]

    def both(a, axis):  # (T, ...) table -> (B, Q, 2, ...) by row and by column
        return xp.stack([xp.take(a, r, axis=0), xp.take(a, c, axis=0)], axis=axis)

    geom = geometry.QueryGeometry(
        coord=both(t.coord, -1),
        key_idx=both(t.key_idx, -2),
        rel=both(t.rel, -2),
        rel_cell=xp.repeat(t.rel_cell[None], q.shape[0], axis=0),
    )
    norm = t.norm
    inp = xp.take(norm, lean.inp_u8.astype(np.int32), axis=0)
    gt = xp.take(norm, lean.gt_u8.astype(np.int32), axis=0)
    return Batch(inp, geom, gt)


def step_input(arrays: Mapping[str, Any]) -> Any:
    """A pipeline batch (flat dict) -> the train step's input: a `LeanBatch` for a lean
    batch (expanded inside the jitted step), else a `Batch`."""
    return LeanBatch.from_flat(arrays) if is_lean(arrays) else Batch.from_flat(arrays)
