"""The official training batch protocol, reproduced exactly (docs/design.md#5-training-batch-protocol).

Reference: `SRImplicitDownsampledCascaded` (train phase, k=1, one scale stage)
of the official code. For one batch of B HR images:

1. one scale s ~ U(scale_min, scale_max) for the whole batch;
2. if inp_size * s exceeds the smallest side m of any image in the batch,
   s <- s * m / (inp_size * s), so the crop just fits;
3. HR crop side hr = round(inp_size * s) (round half to even, as Python);
4. per image: random hflip / vflip / transpose (each p = 0.5) of the whole
   image, then a uniformly random hr x hr crop of the result;
5. LR = Pillow bicubic resize of the uint8 crop to inp_size x inp_size;
6. sample_q HR pixels drawn without replacement; their pixel-centre
   coordinates are the queries and their values the targets;
7. cell = 2 / hr per axis; the model's input is rel_cell = cell * inp_size.

A batch is a `Batch` (inp, geometry: QueryGeometry, gt); see its docstring for
where it is flat and where typed.

The reference flips the whole image before cropping; here the flips are numpy
views and only the crop is copied, which is the same operation without the
full-image copies. Randomness comes from numpy Generators seeded by
(seed, step[, row]) instead of the reference's global RNGs, so a batch is a pure
function of its step: any worker, host or restarted run produces it
identically.

Everything here is host-side numpy; the query geometry is float32 numpy as
docs/design.md#3-query-geometry-and-tie-rules requires (XLA's FMA fusion would flip nearest-centre ties).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from msit_jax import geometry
from msit_jax.images import resize_bicubic, to_float

f32 = np.float32

# Random streams: the tag keeps the per-batch, per-example and per-epoch
# generators of one seed independent of each other.
_BATCH, _EXAMPLE, _EPOCH = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Batch protocol parameters (reference: 48, 2304, [1, 4] or [1, 8], augment on)."""

    inp_size: int = 48
    sample_q: int = 2304
    scale_min: float = 1.0
    scale_max: float = 4.0
    augment: bool = True
    radius: int = 3  # the model's neighbourhood radius (query geometry)

    def __post_init__(self):
        if self.inp_size < 1:
            raise ValueError(f"data.inp_size must be >= 1, got {self.inp_size}")
        if not 1 <= self.sample_q <= self.inp_size ** 2:
            # hr >= inp_size whenever the images are at least inp_size wide, so
            # inp_size**2 queries always exist; more could not be sampled at s = 1.
            raise ValueError(f"data.sample_q={self.sample_q} must be in [1, inp_size**2 = "
                             f"{self.inp_size ** 2}]")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < data.scale_min <= data.scale_max, got "
                             f"{self.scale_min}, {self.scale_max}")


def normalize_uint8(x: np.ndarray) -> np.ndarray:
    """uint8 -> the network's space: (x / 255 - 0.5) / 0.5 in float32, as the reference."""
    return (to_float(x) - f32(0.5)) / f32(0.5)


def shrink_scale(scale: float, inp_size: int, min_side: int) -> float:
    """The reference's fix for small images: scale the scale down so the crop fits."""
    if scale * inp_size > min_side:
        scale *= min_side / (scale * inp_size)
    return scale


def crop_size(scale: float, inp_size: int) -> int:
    """HR crop side round(inp_size * scale), half to even like Python's round."""
    return int(round(inp_size * scale))


def batch_scale(rng: np.random.Generator, p: Protocol, min_side: int) -> tuple[float, int]:
    """(scale, hr crop side) of one batch whose smallest image side is min_side."""
    if min_side < p.inp_size:
        raise ValueError(f"an image of the batch has a {min_side}-pixel side, smaller than "
                         f"the {p.inp_size}-pixel LR patch (data.inp_size)")
    s = shrink_scale(float(rng.uniform(p.scale_min, p.scale_max)), p.inp_size, min_side)
    return s, crop_size(s, p.inp_size)


def augment_view(img: np.ndarray, hflip: bool, vflip: bool, dflip: bool) -> np.ndarray:
    """The reference's augmentation on (H, W, C): flip rows, flip columns, transpose (views)."""
    if hflip:
        img = img[::-1]
    if vflip:
        img = img[:, ::-1]
    if dflip:
        img = img.transpose(1, 0, 2)
    return img


class Batch(NamedTuple):
    """A training batch, the train step's input (`msit_jax.training.step.train_step`).

    Shapes (Q = sample_q, h = inp_size, n = 2 * radius + 1); one example has
    the same fields without the leading B:
      inp       (B, h, h, 3) float32  normalised LR patches
      geometry  QueryGeometry: coord (B, Q, 2) float32 query coordinates (row, col)
                in [-1, 1] of the crop, key_idx (B, Q, 2, n) int32, rel (B, Q, 2, n)
                float32, rel_cell (B, 2) float32 = cell * (h, h), cell = 2 / hr
      gt        (B, Q, 3) float32     normalised HR values at the queries

    Inside the grain pipeline examples and batches travel as flat dicts of
    arrays (`to_flat`): grain stacks them, its workers pickle them, and the
    pipeline adds its own keys (the step). `Batch.from_flat` turns a pipeline
    batch into this typed batch, once, where the training loop hands it to the
    train step.
    """

    inp: np.ndarray
    geometry: geometry.QueryGeometry
    gt: np.ndarray

    def to_flat(self) -> dict[str, np.ndarray]:
        """{'inp', 'coord', 'key_idx', 'rel', 'rel_cell', 'gt'}: arrays, no nesting."""
        return dict(inp=self.inp, **self.geometry._asdict(), gt=self.gt)

    @classmethod
    def from_flat(cls, arrays: Mapping[str, Any]) -> "Batch":
        """The typed batch from a flat dict of `to_flat`'s keys (others, e.g. 'hr' and
        the pipeline's 'step', are left out). A lean batch: `lean.step_input`."""
        geom = geometry.QueryGeometry(*(arrays[k] for k in geometry.QueryGeometry._fields))
        return cls(arrays["inp"], geom, arrays["gt"])


def _draw(img: np.ndarray, hr: int, p: Protocol, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The random part of an example, shared by both encodings (same draws, same order):
    (crop (hr, hr, 3) uint8, LR (h, h, 3) uint8, query pixel indices (Q,) into the
    crop's raster order)."""
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    flips = rng.random(3) < 0.5 if p.augment else np.zeros(3, bool)
    view = augment_view(img, *flips)
    h, w = view.shape[:2]
    if min(h, w) < hr:
        raise ValueError(f"image {img.shape[:2]} is smaller than the {hr}-pixel crop")
    y0 = int(rng.integers(0, h - hr + 1))
    x0 = int(rng.integers(0, w - hr + 1))
    crop = np.ascontiguousarray(view[y0:y0 + hr, x0:x0 + hr])
    lr = resize_bicubic(crop, (p.inp_size, p.inp_size))
    idx = rng.choice(hr * hr, p.sample_q, replace=False)
    return crop, lr, idx


def make_example(img: np.ndarray, hr: int, p: Protocol, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """One training example from an HR image (H, W, 3) uint8 and the batch's crop side hr.

    Returns the example's `Batch` fields flattened (`Batch.to_flat`, shapes
    without B) and hr () int32, the crop side (scale = hr / inp_size).
    `make_lean_example` is the same example in the lean encoding.
    """
    crop, lr, idx = _draw(img, hr, p, rng)
    lr_hw = (p.inp_size, p.inp_size)
    coord = geometry.make_coord((hr, hr)).reshape(-1, 2)[idx]
    geom = geometry.query_geometry(coord, lr_hw, p.radius, geometry.rel_cell((hr, hr), lr_hw))
    example = Batch(normalize_uint8(lr), geom, normalize_uint8(crop.reshape(-1, 3)[idx]))
    return dict(example.to_flat(), hr=np.int32(hr))


def make_lean_example(img: np.ndarray, hr: int, p: Protocol, rng: np.random.Generator
                      ) -> dict[str, np.ndarray]:
    """`make_example`'s example (same draws from `rng`) in the lean encoding
    (`msit_jax.data.lean`): {'inp_u8' (h, h, 3) uint8 LR patch, 'gt_u8' (Q, 3) uint8 HR
    values at the queries, 'q_rc' (Q, 2) int16 (row, col) of each query in the
    crop, 'hr' () int32}. The float geometry and normalisation come from a per-batch
    table (`lean.geometry_table`), expanded on the device (`lean.expand`).
    """
    if hr >= 2 ** 15:  # q_rc is int16
        raise ValueError(f"crop side {hr} does not fit the lean encoding's int16 indices")
    crop, lr, idx = _draw(img, hr, p, rng)
    q_rc = np.empty((len(idx), 2), np.int16)
    q_rc[:, 0], q_rc[:, 1] = np.divmod(idx, hr)  # make_coord's raster order
    return dict(inp_u8=lr, gt_u8=crop.reshape(-1, 3)[idx], q_rc=q_rc, hr=np.int32(hr))


class BatchPlanner:
    """Which images and which scale each global batch uses; a pure function of the step.

    Images are drawn like the reference's shuffled DataLoader: an epoch is a
    random permutation of the dataset repeated `repeat` times (DIV2K: 800 x 40);
    global sample g = step * global_batch + row.
    """

    def __init__(self, sizes: np.ndarray, global_batch: int, seed: int, protocol: Protocol,
                 repeat: int = 1):
        sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
        if len(sizes) == 0:
            raise ValueError("the training source has no images")
        if global_batch < 1 or repeat < 1:
            raise ValueError(f"batch size ({global_batch}) and repeat ({repeat}) must be >= 1")
        self.min_sides = sizes.min(axis=1)
        self.global_batch, self.seed, self.protocol = int(global_batch), int(seed), protocol
        self.epoch_len = len(sizes) * int(repeat)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, _EPOCH, epoch])
            self._perms[epoch] = rng.permutation(self.epoch_len) % len(self.min_sides)
        return self._perms[epoch]

    def images(self, step: int) -> np.ndarray:
        """(global_batch,) image indices of a step."""
        g = step * self.global_batch + np.arange(self.global_batch)
        out = np.empty(self.global_batch, np.int64)
        for e in np.unique(g // self.epoch_len):
            sel = g // self.epoch_len == e
            out[sel] = self._perm(int(e))[g[sel] % self.epoch_len]
        return out

    def plan(self, step: int) -> tuple[np.ndarray, float, int]:
        """(image indices (B,), scale, hr crop side) of a step."""
        idx = self.images(step)
        rng = np.random.default_rng([self.seed, _BATCH, step])
        s, hr = batch_scale(rng, self.protocol, int(self.min_sides[idx].min()))
        return idx, s, hr

    def example_rng(self, step: int, row: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _EXAMPLE, step, row])


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack flat examples into a flat batch (leading axis B); `Batch.from_flat` types it."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
