"""Memory-bounded arbitrary-scale inference: the one engine every surface runs.

    sr = upscale(model_cfg, variables, lr, (out_h, out_w))
    sr = Engine(model_cfg, variables, tile=256)(lr, (out_h, out_w))   # LR tiles

The encoder runs once per image, or once per LR tile (`tile` > 0: see
`msit_jax.inference.tiling` for the geometry and its exactness). Queries (HR
pixels, raster order) are decoded in fixed-size chunks, the last one padded,
so one compiled decoder serves every chunk and peak memory is set by the chunk
size, not the output size. Query geometry is computed on the host (see
`msit_jax.geometry`) while the device decodes the previous chunk.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import Any, Callable, ContextManager, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from msit_jax import geometry
from msit_jax.inference import ensemble, tiling
from msit_jax.inference.frontend import (DEFAULT_CHUNK, Progress, check_image,
                                         check_out_hw, denormalize, normalize, track)
from msit_jax.models import grid_decoder
from msit_jax.models.model import MSIT, build_model
from msit_jax.ops.runtime import RuntimeOptions

# stage(name) -> a context manager around a stage of one call; the engine names
# "encode" (the untiled encoder, waited for inside it: JAX dispatch is asynchronous,
# so its time would otherwise show up in the first decoder chunk).
Stage = Optional[Callable[[str], ContextManager[Any]]]

# Queries per decoder call, per platform (DEFAULT_CHUNK: see the front end).
# CPU: measured. GPU/TPU: larger calls keep the device busy; 16384 (~2.4 GB)
# is an estimate until `benchmarks/accel_check.py` has measured it.
PLATFORM_CHUNK = {"cpu": 4096, "gpu": 16384, "cuda": 16384, "rocm": 16384, "tpu": 16384}


def default_chunk(platform: Optional[str] = None) -> int:
    """Queries per decoder call for a platform (default: JAX's default backend)."""
    return PLATFORM_CHUNK.get(platform or jax.default_backend(), DEFAULT_CHUNK)


@functools.partial(jax.jit, static_argnums=0)
def encode(model: MSIT, variables: Any, inp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Jitted `MSIT.encode`: inp (B, H, W, 3) -> (feat_q, feat_v), each (B, H, W, dim).
    Shared by the untiled and the tiled paths, so they compile one encoder per input size."""
    return model.apply(variables, inp, method=MSIT.encode)


@functools.partial(jax.jit, static_argnums=0)
def decode(model: MSIT, variables: Any, feats: tuple[jax.Array, jax.Array], inp: jax.Array,
           geom: geometry.QueryGeometry) -> jax.Array:
    """Jitted `MSIT.decode`: feats (B, H, W, dim) x 2, inp (B, H, W, 3) and geom
    (coord (B, Q, 2), ...) -> (B, Q, 3). One compilation per chunk shape."""
    return model.apply(variables, feats, inp, geom, method=MSIT.decode)


query_chunks = geometry.query_chunks  # re-exported: it lives with the geometry


METHODS = ("auto", "grid", "query")
# Queries per LR pixel from which the grid decoder wins on XLA:CPU. Its cost
# follows its padded query slots (LR centres x the widest group per axis); the
# per-query decoder's follows the queries. Measured on 2 CPU cores, paper-size
# model, decoders alone (s, 2026-12-03): 96^2 -> 106^2 (1.2 queries per centre)
# query 1.05 vs grid 1.51; -> 120^2 (1.6) 1.28 vs 1.45; -> 134^2 (1.9) 1.56 vs
# 1.57; 64^2 -> 96^2 (2.25) 1.18 vs 0.70; x2.5 of 96^2 4.86 vs 1.67; x4 of
# 64^2 5.46 vs 1.14.
GRID_MIN_QUERIES_PER_CENTRE = 2.25  # x1.5
# On GPU/TPU small-K GEMMs are not penalised the way they are on XLA:CPU, so
# the FLOP ratio decides: the grid decoder wins from ~1.1 queries per centre.
# 4 is a conservative estimate, not a measurement (accel_check.py measures it).
PLATFORM_GRID_MIN = {"cpu": GRID_MIN_QUERIES_PER_CENTRE}
ACCELERATOR_GRID_MIN = 4.0


def grid_min_queries(platform: Optional[str] = None) -> float:
    """The 'auto' decoder's grid threshold (queries per LR pixel) for a platform."""
    return PLATFORM_GRID_MIN.get(platform or jax.default_backend(), ACCELERATOR_GRID_MIN)


# LR centres per grid-decoder call on XLA:CPU, whatever the chunk allows: each centre
# carries its (2r+1)^2 neighbours' keys and values through the attention, and past
# ~128 centres a call's intermediates spill out of the caches. Measured on 2 CPU
# cores, paper-size model, grid decoder alone (median wall s, 2026-12-03): x4 of
# 64^2 (16 query slots per centre) at 64/96/128/160/256 centres per call
# 0.69/0.60/0.51/0.51/0.68; x2.5 of 96^2 (9 slots) at 64/96/128/160/227/455
# 1.26/1.05/0.97/0.94/1.25/1.23. Accelerators: the chunk alone decides (larger
# calls keep them busy).
PLATFORM_GRID_CENTRES = {"cpu": 128}


def grid_centres_per_call(chunk: int, slots: int, platform: Optional[str] = None) -> int:
    """LR centres per grid-decoder call: as many as `chunk` queries hold at `slots`
    query slots per centre, at most the platform's cap (PLATFORM_GRID_CENTRES)."""
    per_call = max(1, chunk // slots)
    cap = PLATFORM_GRID_CENTRES.get(platform or jax.default_backend())
    return per_call if cap is None else min(per_call, cap)


# Grid-decoder calls run at once on XLA:CPU, each from its own host thread: one
# call's many small GEMMs keep about 1.6 of 2 cores busy, two calls both. Measured
# on 2 CPU cores, paper-size model, x4 of 64^2, 32 calls of 128 centres (median
# wall s, 2026-12-03): one at a time 0.61, two threads 0.46, three 0.53, four 0.47.
# Each call is the same program on its own centres: the same outputs, bit for bit.
# Accelerators: one call in flight (asynchronous dispatch already overlaps them).
PLATFORM_CONCURRENT_CALLS = {"cpu": 2}


def concurrent_calls(platform: Optional[str] = None) -> int:
    """Grid-decoder calls run at once on a platform (PLATFORM_CONCURRENT_CALLS; 1 if
    not listed)."""
    return PLATFORM_CONCURRENT_CALLS.get(platform or jax.default_backend(), 1)


def pipelined(jobs: Iterable[Any], run: Callable[[Any], Any],
              store: Callable[[Any, Any], None], workers: int = 1) -> None:
    """store(job, run(job)) for every job, in order, with the device kept busy.

    workers 1: run is dispatched for the next job before the previous result is
    stored (JAX dispatch is asynchronous, so the host's store overlaps the device).
    workers > 1: up to `workers` runs at once, each in its own thread and waited for
    there; the caller's thread stores the results in order.
    """
    pending: collections.deque = collections.deque()
    if workers <= 1:
        for job in jobs:
            pending.append((job, run(job)))
            if len(pending) > 1:
                store(*pending.popleft())
        while pending:
            store(*pending.popleft())
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="msit-decode") as pool:
        try:
            for job in jobs:
                pending.append((job, pool.submit(lambda j: jax.block_until_ready(run(j)), job)))
                if len(pending) > workers:
                    job_, fut = pending.popleft()
                    store(job_, fut.result())
            while pending:
                job_, fut = pending.popleft()
                store(job_, fut.result())
        finally:
            for _, fut in pending:  # an error or an interrupt: start nothing more
                fut.cancel()


class Engine:
    """Holds a model and its device-resident variables; call it per image.

    method: 'grid' decodes queries grouped by their nearest LR centre
    (`msit_jax.models.grid_decoder`, several times fewer FLOPs at large scales);
    'query' runs the per-query decoder, the reference formulation; 'auto'
    (default) picks grid from `grid_min_queries()` output pixels per input
    pixel (2.25, x1.5, on CPU). All give the same result to float32 re-association error.
    chunk: queries per decoder call (None: `default_chunk()` of the platform).
    runtime: precision, compute dtype, FFT threshold (`msit_jax.ops.runtime`).
    tile: LR tile side for the encoder (0: the whole image; a tile >= both LR sides
    is the whole image too); a call's `tile` overrides it. Tiles are decoded per
    query (the reference formulation), whatever `method` says.
    self_ensemble: return the mean over the 8 flips/transposes of the input
    (`msit_jax.inference.ensemble`; EDSR's "+"), at 8x the work.
    """

    def __init__(self, model_cfg: ml_collections.ConfigDict, variables: Any,
                 chunk: Optional[int] = None, method: str = "auto",
                 runtime: Optional[RuntimeOptions] = None, *, tile: int = 0,
                 self_ensemble: bool = False):
        chunk = default_chunk() if chunk is None else chunk
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.model_cfg = model_cfg
        self.runtime = runtime or RuntimeOptions()
        self.model = build_model(model_cfg, self.runtime)
        self.variables = jax.device_put(variables)
        self.chunk = int(chunk)
        self.method = method
        self.tile = int(tile)
        self.self_ensemble = bool(self_ensemble)
        self.grid_min_queries = grid_min_queries()
        if method != "query":
            self._dec = grid_decoder.split_decoder_params(self.variables["params"], model_cfg)

    def features(self, lr: np.ndarray, stage: Stage = None):
        """Encoder output for one [0, 1] image: (inp, (feat_q, feat_v)), batch of 1;
        inside stage("encode") (waited for there) when a stage is given."""
        inp = jnp.asarray(normalize(check_image(lr))[None])
        if stage is None:
            return inp, encode(self.model, self.variables, inp)
        with stage("encode"):
            feats = jax.block_until_ready(encode(self.model, self.variables, inp))
        return inp, feats

    def __call__(self, lr: Any, out_hw: Any, *, clamp: bool = True,
                 progress: Progress = False, tile: Optional[int] = None,
                 stage: Stage = None) -> np.ndarray:
        """lr (H, W, 3) float in [0, 1] -> (out_h, out_w, 3) float32. progress: False,
        True (a bar) or a callable (done, total) called after each decoded chunk (over
        all tiles and ensemble passes). tile: this call's tile (None: `self.tile`).
        stage: see `Stage` (the untiled encoder only)."""
        lr = check_image(lr)
        out_hw = check_out_hw(out_hw)
        predict = functools.partial(self.predict, tile=tile, stage=stage)
        if self.self_ensemble:
            out = ensemble.mean_over_transforms(predict, lr, out_hw, progress)
        else:
            out = predict(lr, out_hw, progress)
        return np.clip(out, 0.0, 1.0) if clamp else out

    def predict(self, lr: np.ndarray, out_hw: tuple[int, int], progress: Progress = False,
                *, tile: Optional[int] = None, stage: Stage = None) -> np.ndarray:
        """One model pass, unclamped: lr (H, W, 3) [0, 1] -> (out_h, out_w, 3) float32."""
        tile = self.tile if tile is None else int(tile)
        if tiling.tiled(lr.shape[:2], tile):
            return self._predict_tiled(lr, out_hw, tile, progress)
        inp, feats = self.features(lr, stage)
        if self.uses_grid(lr.shape[:2], out_hw):
            out = self._decode_grid(inp, feats, out_hw, progress)
        else:
            out = self._decode_queries(inp, feats, out_hw, progress)
        return denormalize(out).reshape(out_hw[0], out_hw[1], 3)

    def uses_grid(self, lr_hw: tuple[int, int], out_hw: tuple[int, int],
                  tile: Optional[int] = None) -> bool:
        """Whether this call decodes with the grid decoder (never on tiles)."""
        if tiling.tiled(lr_hw, self.tile if tile is None else int(tile)):
            return False
        if self.method == "auto":
            ratio = out_hw[0] * out_hw[1] / (lr_hw[0] * lr_hw[1])
            return ratio >= self.grid_min_queries
        return self.method == "grid"

    def _progress(self, it, total: int, progress: Progress):
        return track(it, total, progress)

    def _decode_queries(self, inp, feats, out_hw, progress: Progress) -> np.ndarray:
        lr_hw = inp.shape[1:3]
        out = np.empty((out_hw[0] * out_hw[1], 3), np.float32)

        chunks = query_chunks(out_hw, lr_hw, self.model_cfg.radius, self.chunk)
        chunks = self._progress(chunks, -(-out.shape[0] // self.chunk), progress)
        # One chunk in flight while the host prepares the next.
        pipelined(chunks, lambda c: decode(self.model, self.variables, feats, inp,
                                           c[2].add_batch_axis()),
                  lambda c, pred: self._store(out, c[0], c[1], pred))
        return out

    def _decode_grid(self, inp, feats, out_hw, progress: Progress) -> np.ndarray:
        cfg = self.model.cfg
        h, w = inp.shape[1:3]
        py = grid_decoder.plan_axis(out_hw[0], h, cfg.radius)
        px = grid_decoder.plan_axis(out_hw[1], w, cfg.radius)
        rows = (jnp.asarray(py.coord), jnp.asarray(py.groups))
        cols = (jnp.asarray(px.coord), jnp.asarray(px.groups))
        pb_rows, pb_cols = grid_decoder.axis_biases(cfg, self.runtime, self._dec,
                                                    jnp.asarray(py.rel), jnp.asarray(px.rel))
        rc = jnp.asarray(geometry.rel_cell(out_hw, (h, w)))
        feat_q, feat_v = feats[0][0], feats[1][0]
        gy, gx = py.groups.shape[1], px.groups.shape[1]
        # Centres with at least one query (all of them unless downscaling).
        centres = np.nonzero(py.valid[:, 0][:, None] & px.valid[:, 0][None, :])
        centres = (centres[0] * w + centres[1]).astype(np.int32)
        per_call = grid_centres_per_call(self.chunk, gy * gx)
        out = np.empty((out_hw[0] * out_hw[1], 3), np.float32)

        def store(ids, count, pred):
            ids = ids[:count]
            ci, cj = ids // w, ids % w
            mask = py.valid[ci][:, :, None] & px.valid[cj][:, None, :]
            flat = py.groups[ci][:, :, None] * out_hw[1] + px.groups[cj][:, None, :]
            out[flat[mask]] = np.asarray(pred)[:count][mask]

        def batches():
            starts = range(0, len(centres), per_call)
            for start in self._progress(starts, len(starts), progress):
                ids = centres[start:start + per_call]
                count = len(ids)
                yield np.concatenate([ids, np.full(per_call - count, ids[-1], np.int32)]), count

        def run(batch):
            return grid_decoder.decode_centres(cfg, self.runtime, self._dec, feat_q, feat_v,
                                               inp[0], rows, cols, pb_rows, pb_cols, rc,
                                               jnp.asarray(batch[0]))

        pipelined(batches(), run, lambda batch, pred: store(*batch, pred),
                  concurrent_calls())
        return out

    @staticmethod
    def _store(out: np.ndarray, start: int, count: int, pred) -> None:
        out[start:start + count] = np.asarray(pred[0, :count])

    def _predict_tiled(self, lr: np.ndarray, out_hw: tuple[int, int], tile: int,
                       progress: Progress) -> np.ndarray:
        """One tiled pass, unclamped: lr (H, W, 3) [0, 1] -> (out_h, out_w, 3) float32."""
        out = np.empty((out_hw[0], out_hw[1], 3), np.float32)
        jobs = list(tiling.jobs(lr.shape[:2], out_hw, tile))
        bar = None
        if progress:
            total = sum(-(-(ys[1] - ys[0]) * (xs[1] - xs[0]) // self.chunk)
                        for _, _, ys, xs in jobs)
            bar = _Counter(progress, total)
        inp_full = normalize(lr)
        try:
            for core_y, core_x, hr_y, hr_x in jobs:
                if hr_y[1] <= hr_y[0] or hr_x[1] <= hr_x[0]:
                    continue
                self._tile(inp_full, out, out_hw, tile, core_y, core_x, hr_y, hr_x, bar)
        finally:
            if bar is not None:
                bar.close()
        return denormalize(out)

    def _tile(self, inp_full, out, out_hw, tile, core_y, core_x, hr_y, hr_x, bar) -> None:
        h, w = inp_full.shape[:2]
        r = self.model_cfg.radius
        pad, reach = tiling.halo(self.model_cfg), r + 1
        # Encoder window (core + halo) and decoder window (core + reach), of fixed sizes.
        ey, ex = tiling.window(core_y, pad, h, tile), tiling.window(core_x, pad, w, tile)
        dy, dx = tiling.window(core_y, reach, h, tile), tiling.window(core_x, reach, w, tile)
        inp_enc = jnp.asarray(inp_full[ey[0]:ey[1], ex[0]:ex[1]][None])
        fq, fv = encode(self.model, self.variables, inp_enc)
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
            g = tiling.window_geometry(g, (h, w), (dy[0], dx[0]),
                                       (dy[1] - dy[0], dx[1] - dx[0]))
            pred = decode(self.model, self.variables, feats, inp_dec, g.add_batch_axis())
            k = np.arange(start, start + count)  # the chunk's real queries (the rest pad)
            out[hr_y[0] + k // tw, hr_x[0] + k % tw] = np.asarray(pred[0, :count])
            if bar is not None:
                bar.update(1)


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


def upscale(model_cfg: ml_collections.ConfigDict, variables: Any, lr: Any, out_hw: Any, *,
            clamp: bool = True, chunk: Optional[int] = None, progress: Progress = False,
            method: str = "auto", runtime: Optional[RuntimeOptions] = None,
            self_ensemble: bool = False) -> np.ndarray:
    """Super-resolve one image to any size.

    lr: (H, W, 3) float in [0, 1]; out_hw: (out_h, out_w), any positive sizes
    (non-integer and per-axis scales). Returns (out_h, out_w, 3) float32, clamped
    to [0, 1] unless clamp=False (then the raw denormalised prediction).
    chunk bounds the queries decoded per call (memory); method, runtime,
    self_ensemble: see `Engine` (untiled).
    """
    up = Engine(model_cfg, variables, chunk, method, runtime, self_ensemble=self_ensemble)
    return up(lr, out_hw, clamp=clamp, progress=progress)
