"""The training input pipeline: grain workers -> host batches -> device arrays.

    it = train_iterator(source, protocol, global_batch=32, seed=0, total_steps=N,
                        sharding=batch_sharding, num_workers=8)
    batch = next(it)          # dict of global jax.Arrays, batch axis sharded
    state = it.get_state()    # grain iterator state, for checkpoints

Element k of the grain MapDataset is this host's k-th example: step
k // local_batch, global row process_index * local_batch + k % local_batch.
Each example is a pure function of (seed, step, row) (see `protocol`), so the
stream does not depend on the number of workers, threads or hosts; the grain
iterator state is what a checkpoint stores to resume mid-stream.

Shapes are static (Q = sample_q, h = inp_size, n = 2r+1), so the train step
compiles once. Two encodings of the same examples (`lean=`):
  full (`protocol.Batch.to_flat`, host_dataset's default): inp (B, h, h, 3) f32,
    coord (B, Q, 2) f32, key_idx (B, Q, 2, n) i32, rel (B, Q, 2, n) f32,
    rel_cell (B, 2) f32, gt (B, Q, 3) f32, hr (B,) i32, step (B,) i32;
  lean (`msit_jax.data.lean`, train_dataset's default: 23 KB per example instead
    of 332 KB at the paper's sizes): inp_u8 (B, h, h, 3) u8, gt_u8 (B, Q, 3) u8,
    q_rc (B, Q, 2) i16, hr (B,) i32, step (B,) i32, and the batch's geometry table
    geo_coord (T,) f32, geo_key_idx (T, n) i32, geo_rel (T, n) f32,
    geo_rel_cell (2,) f32, norm (256,) f32 (T = lean.hr_max; no batch axis,
    replicated by `to_global`), expanded into the full batch inside the train step.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import grain
import jax
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset

from msit_jax.data import lean as lean_encoding
from msit_jax.data.protocol import BatchPlanner, Protocol, make_example, make_lean_example
from msit_jax.data.sources import ImageSource
from msit_jax.errors import InputError, one_line
from msit_jax.images import ImageError

log = logging.getLogger(__name__)


class ExampleMaker:
    """grain map: element index -> one example dict (`protocol.make_example`, or
    `protocol.make_lean_example` with lean=True: the same draws).

    An image that fails to load during training (a truncated body the header
    check could not see, a file changed or removed since the start) is logged
    once, naming the file and the step, and replaced by the next image (in index
    order, cyclically) that loads and is large enough for the batch's crop. The
    replacement depends only on the data, so the stream stays a function of
    (seed, step): a resumed run makes the same choice instead of crashing again.
    """

    def __init__(self, source: ImageSource, planner: BatchPlanner, protocol: Protocol,
                 local_batch: int, row_offset: int, lean: bool = False):
        self.source, self.planner, self.protocol = source, planner, protocol
        self.make = make_lean_example if lean else make_example
        self.local_batch, self.row_offset = local_batch, row_offset
        self._plan_cache: tuple[int, Any] = (-1, None)
        self._bad: set[int] = set()  # indices known to fail (this process)

    def _try_load(self, i: int, step: int) -> Optional[np.ndarray]:
        if i in self._bad:
            return None
        try:
            return self.source[i]
        except (ImageError, OSError, ValueError) as e:
            self._bad.add(i)
            log.warning("step %d: skipping a bad training image (%s); the next usable image is "
                        "used instead. data.train.skip_bad_images=True decodes every image "
                        "before training", step, one_line(str(e), 300))
            return None

    def image(self, i: int, hr: int, step: int) -> tuple[np.ndarray, int]:
        """(image, index): image i, or its deterministic replacement if it fails."""
        img = self._try_load(i, step)
        if img is not None:
            return img, i
        n = len(self.source)
        for k in range(1, n):
            j = (i + k) % n
            if min(self.source.sizes[j]) >= hr:
                img = self._try_load(j, step)
                if img is not None:
                    return img, j
        raise InputError(f"step {step}: no readable training image is left to replace "
                         f"{self.source.name(i)}")

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        step, r = divmod(int(k), self.local_batch)
        row = self.row_offset + r
        if self._plan_cache[0] != step:  # consecutive elements share a step
            self._plan_cache = (step, self.planner.plan(step))
        idx, _, hr = self._plan_cache[1]
        img, i = self.image(int(idx[row]), hr, step)
        try:
            ex = self.make(img, hr, self.protocol, self.planner.example_rng(step, row))
        except ValueError as e:
            raise ValueError(f"{self.source.name(i)}: {e}") from e
        ex["step"] = np.int32(step)
        return ex


def _worker_init(worker_index: int, worker_count: int) -> None:
    """In each grain worker process: leave SIGINT/SIGTERM to the parent (it stops the
    workers after saving), and exit as soon as the parent is gone (even after kill -9),
    instead of lingering as orphans that hold memory."""
    import os
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="msit-parent-watch", daemon=True).start()


# How often a grain worker checks that its parent is alive (seconds).
PARENT_POLL_S = 0.5


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; a library caller (tests, notebooks)
    # may never have run absl.app, so accept the defaults then.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def host_dataset(source: ImageSource, protocol: Protocol, *, global_batch: int, seed: int,
                 total_steps: int, repeat: int = 1, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 0, num_threads: int = 1,
                 buffer_size: int = 2, lean: bool = False) -> grain.IterDataset:
    """Host-local numpy batches (global_batch / process_count rows) for steps [0, total_steps).

    lean: the lean encoding (module docstring; every host adds the same table, a
    function of the step's hr), else the full one.
    """
    if global_batch % process_count:
        raise ValueError(f"batch_size={global_batch} is not divisible by the "
                         f"{process_count} processes")
    local_batch = global_batch // process_count
    planner = BatchPlanner(source.sizes, global_batch, seed, protocol, repeat)
    maker = ExampleMaker(source, planner, protocol, local_batch, process_index * local_batch,
                         lean=lean)
    ds = grain.MapDataset.range(total_steps * local_batch).map(maker)
    ds = ds.batch(local_batch, drop_remainder=True)
    if lean:  # a map of the batch: element k is still step k, the iterator state unchanged
        ds = ds.map(lean_encoding.AddTable(protocol))
    # Threads overlap Pillow decoding/resizing (which release the GIL); the
    # buffer is counted in batches, each a few MB at the paper's sizes.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=buffer_size))
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=buffer_size),
                            worker_init_fn=_worker_init)
    return it


def replicated_like(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The fully replicated sharding over the devices of a batch sharding."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise TypeError(f"cannot replicate a lean batch's table over {sharding!r}: "
                    "use a NamedSharding")


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
              ) -> dict[str, jax.Array]:
    """Host-local rows -> global arrays sharded over the batch axis (multi-host safe).

    A lean batch's table (`lean.TABLE_KEYS`, no batch axis, the same on every host)
    is replicated on every device instead.
    """
    rep = (replicated_like(sharding) if any(k in batch for k in lean_encoding.TABLE_KEYS)
           else None)
    return {k: jax.make_array_from_process_local_data(
        rep if k in lean_encoding.TABLE_KEYS else sharding, v) for k, v in batch.items()}


def device_prefetch(it: grain.IterDataset, sharding: jax.sharding.Sharding,
                    host_buffer: int = 2, device_buffer: int = 2) -> grain.IterDataset:
    """Background threads: pull host batches, then transfer them ahead of the train step.

    ThreadPrefetch keeps the iterator state checkpointable: `get_state()` of the
    result describes the elements consumed, not the ones buffered.
    """
    it = ThreadPrefetchIterDataset(it, prefetch_buffer_size=host_buffer)
    it = it.map(lambda b: to_global(b, sharding))
    return ThreadPrefetchIterDataset(it, prefetch_buffer_size=device_buffer)


def train_dataset(source: ImageSource, protocol: Protocol, *, global_batch: int, seed: int,
                  total_steps: int, sharding: Optional[jax.sharding.Sharding] = None,
                  repeat: int = 1, num_workers: int = 0, num_threads: int = 1,
                  buffer_size: int = 2, device_buffer: int = 2, lean: bool = True
                  ) -> grain.IterDataset:
    """The full pipeline; iterate it (`iter(ds)`) for a checkpointable DatasetIterator.
    lean: the lean encoding (the default in training; `lean.step_input` makes the
    train step's input of a batch, either encoding)."""
    it = host_dataset(source, protocol, global_batch=global_batch, seed=seed,
                      total_steps=total_steps, repeat=repeat,
                      process_index=jax.process_index(), process_count=jax.process_count(),
                      num_workers=num_workers, num_threads=num_threads, buffer_size=buffer_size,
                      lean=lean)
    if sharding is not None:
        it = device_prefetch(it, sharding, buffer_size, device_buffer)
    return it
