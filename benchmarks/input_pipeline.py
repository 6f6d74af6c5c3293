"""Host cost of the training input pipeline at the paper protocol: CPU-ms per sample by stage.

    python -m benchmarks.input_pipeline            # 8 DIV2K-sized PNGs, batch 32, U(1,4) and U(1,8)
    python -m benchmarks.input_pipeline --quick    # a smoke test (tiny images, a few samples)

Synthetic photo-like PNGs of DIV2K's size (2040 x 1356: smooth random fields, edges
and fine texture, so that PNG compression and decoding cost about what real photos
do) are written to a temporary folder and read two ways: PNG decode per sample
(`FolderSource` without cache) and the folder source's memory-mapped `.npy` cache
(`FolderSource(cache_dir=...)`, warmed first). For each scale range the batches of
`BatchPlanner` (one scale per batch, augmentation on) are built stage by stage, with
the same calls in the same order as `protocol.make_example` (current encoding) and
`protocol.make_lean_example` (lean encoding); the first batch of each case is
checked equal to theirs, so the stages add up to what training runs.

CPU time is thread CPU time per stage (`time.thread_time`) and process CPU time
(`time.process_time`) for the whole case; wall time is given beside it. Bytes per
sample host->device are counted from the arrays each encoding sends. The cores a
host needs to keep an accelerator fed = CPU-ms per sample x samples per step /
predicted step time (BENCHMARKS.md's predictions, `PREDICTED_STEP_MS` below).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import platform
import tempfile
import time
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from msit_jax import geometry
from msit_jax.data import lean
from msit_jax.data.pipeline import host_dataset
from msit_jax.data.protocol import (BatchPlanner, Protocol, augment_view, collate,
                                    make_example, make_lean_example, normalize_uint8)
from msit_jax.data.sources import FolderSource
from msit_jax.images import resize_bicubic

# Predicted train_stage1 step times (ms) at the global batch of 32, from BENCHMARKS.md
# ("Predicted times (one chip, whole program)" and the bottleneck table below it; model
# predictions, not measurements): f32 = the default precision `highest`; bf16 = with the
# bf16 backward, which is always on for bf16 (s2d off, its default). A v5e-8 host runs
# 4 images per chip, so its step is the one-chip figure / 8 (as the pod table does).
PREDICTED_STEP_MS = {
    "TPU v5e-8 host": {"f32": 356.7 / 8, "bf16": 79.2 / 8},
    "one H100 SXM": {"f32": 65.4, "bf16": 10.9},
}
CORE_GOALS = {"TPU v5e-8 host": (56, "a quarter of its 224 vCPUs"),
              "one H100 SXM": (16, "16 cores")}
STEP_BATCH = 32  # both predictions are for the global batch of 32
DEVICES = {"TPU v5e-8 host": 8, "one H100 SXM": 1}  # copies of a replicated table

STAGES = ("load", "crop_flip", "resize", "geometry", "gt_gather", "collate")
STAGE_NAMES = {"load": "decode PNG / open cache", "crop_flip": "flip + crop (+ cache read)",
               "resize": "Pillow bicubic (+ normalise)", "geometry": "queries + geometry",
               "gt_gather": "gt gather (+ normalise)", "collate": "collate (+ table)"}


# --- synthetic photo-like images ------------------------------------------------------

def photo_like(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint8: smooth colour fields at a few scales, some sharp edges and
    sensor-like fine noise, so a PNG of it compresses about as a photo does."""
    out = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((6, 70.0), (40, 35.0), (200, 18.0)):
        small = rng.normal(0, 1, (max(2, h * cells // max(h, w)), cells, 3)).astype(np.float32)
        for c in range(3):
            f = Image.fromarray(np.ascontiguousarray(small[..., c])).resize((w, h), Image.BICUBIC)
            out[..., c] += amp * np.asarray(f)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(12):  # straight edges between flat-ish regions
        a, b = rng.normal(size=2)
        lo, hi = h * min(a, 0) + w * min(b, 0), h * max(a, 0) + w * max(b, 0)
        side = a * yy + b * xx > rng.uniform(lo, hi)
        out += side[..., None] * rng.normal(0, 20, 3).astype(np.float32)
    out += rng.normal(0, 4.0, out.shape).astype(np.float32)  # fine texture / noise
    return np.clip(out + 128.0, 0, 255).astype(np.uint8)


def write_images(folder: str, n: int, hw: tuple[int, int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i + 1:04d}.png")
        Image.fromarray(photo_like(*hw, rng)).save(path)  # Pillow's default PNG level
        paths.append(path)
    return paths


# --- timing --------------------------------------------------------------------------

class Clock:
    """Per-stage thread CPU time (ns), summed over the samples of a case."""

    def __init__(self):
        self.ns = dict.fromkeys(STAGES, 0)
        self._t = 0

    def start(self) -> None:
        self._t = time.thread_time_ns()

    def lap(self, stage: str) -> None:
        t = time.thread_time_ns()
        self.ns[stage] += t - self._t
        self._t = t


def current_example(img, hr: int, p: Protocol, rng, clock: Clock) -> dict:
    """`make_example` split into timed stages (same calls, same order)."""
    flips = rng.random(3) < 0.5 if p.augment else np.zeros(3, bool)
    view = augment_view(img, *flips)
    h, w = view.shape[:2]
    y0 = int(rng.integers(0, h - hr + 1))
    x0 = int(rng.integers(0, w - hr + 1))
    crop = np.ascontiguousarray(view[y0:y0 + hr, x0:x0 + hr])
    clock.lap("crop_flip")
    lr_hw = (p.inp_size, p.inp_size)
    inp = normalize_uint8(resize_bicubic(crop, lr_hw))
    clock.lap("resize")
    idx = rng.choice(hr * hr, p.sample_q, replace=False)
    coord = geometry.make_coord((hr, hr)).reshape(-1, 2)[idx]
    g = geometry.query_geometry(coord, lr_hw, p.radius, geometry.rel_cell((hr, hr), lr_hw))
    clock.lap("geometry")
    gt = normalize_uint8(crop.reshape(-1, 3)[idx])
    clock.lap("gt_gather")
    return dict(inp=inp, **g._asdict(), gt=gt, hr=np.int32(hr))


def lean_example(img, hr: int, p: Protocol, rng, clock: Clock) -> dict:
    """`make_lean_example` split into timed stages (same calls, same order)."""
    flips = rng.random(3) < 0.5 if p.augment else np.zeros(3, bool)
    view = augment_view(img, *flips)
    h, w = view.shape[:2]
    y0 = int(rng.integers(0, h - hr + 1))
    x0 = int(rng.integers(0, w - hr + 1))
    crop = np.ascontiguousarray(view[y0:y0 + hr, x0:x0 + hr])
    clock.lap("crop_flip")
    lr = resize_bicubic(crop, (p.inp_size, p.inp_size))
    clock.lap("resize")
    idx = rng.choice(hr * hr, p.sample_q, replace=False)
    q_rc = np.empty((len(idx), 2), np.int16)
    q_rc[:, 0], q_rc[:, 1] = np.divmod(idx, hr)
    clock.lap("geometry")
    gt = crop.reshape(-1, 3)[idx]
    clock.lap("gt_gather")
    return dict(inp_u8=lr, gt_u8=gt, q_rc=q_rc, hr=np.int32(hr))


@dataclasses.dataclass
class Case:
    encoding: str  # "current" | "lean"
    read: str  # "png" | "cache"
    scale_max: float
    samples: int = 0
    stage_ms: dict = dataclasses.field(default_factory=dict)  # CPU-ms per sample
    cpu_ms: float = 0.0  # process CPU-ms per sample
    wall_ms: float = 0.0
    bytes: dict = dataclasses.field(default_factory=dict)  # per sample, by array
    table_bytes: int = 0  # per batch (lean), one copy per device
    table_build_ms: float = 0.0  # one uncached build of a batch's table
    pickle_ms: float = 0.0  # per sample: pickle round trip of a batch (a worker's hand-off)


def run_case(source: FolderSource, encoding: str, read: str, p: Protocol, batch: int,
             steps: int, seed: int = 0) -> Case:
    """Build `steps` batches of `batch` examples stage by stage; times per sample."""
    planner = BatchPlanner(source.sizes, batch, seed, p)
    make = current_example if encoding == "current" else lean_example
    reference = make_example if encoding == "current" else make_lean_example
    clock = Clock()
    case = Case(encoding, read, p.scale_max)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        idx, _, hr = planner.plan(step)
        examples = []
        for row in range(batch):
            clock.start()
            img = source[int(idx[row])]
            clock.lap("load")
            ex = make(img, hr, p, planner.example_rng(step, row), clock)
            ex["step"] = np.int32(step)
            examples.append(ex)
        clock.start()
        flat = collate(examples)
        if encoding == "lean":
            flat = lean.AddTable(p)(flat)  # cached per hr in a run; its build is timed apart
        clock.lap("collate")
        if step == 0:
            first = (idx, hr, flat)
    case.cpu_ms = (time.process_time() - t_cpu) * 1e3
    case.wall_ms = (time.perf_counter() - t_wall) * 1e3
    idx, hr, flat = first
    for row in range(min(batch, 4)):  # the stages are the library's example, bit for bit
        ref = reference(source[int(idx[row])], hr, p, planner.example_rng(0, row))
        for k, v in ref.items():
            if not np.array_equal(v, flat[k][row]) or v.dtype != flat[k].dtype:
                raise AssertionError(f"{encoding}: {k} differs from {reference.__name__}")
    case.bytes = {k: int(v[0].nbytes) for k, v in flat.items() if k not in lean.TABLE_KEYS}
    t = time.process_time()
    for _ in range(3):
        pickle.loads(pickle.dumps(flat, protocol=pickle.HIGHEST_PROTOCOL))
    case.pickle_ms = (time.process_time() - t) * 1e3 / 3 / batch
    if encoding == "lean":
        case.table_bytes = sum(int(flat[k].nbytes) for k in lean.TABLE_KEYS)
    n = steps * batch
    case.samples = n
    case.cpu_ms /= n
    case.wall_ms /= n
    case.stage_ms = {k: v / 1e6 / n for k, v in clock.ns.items()}
    if encoding == "lean":
        lean.geometry_table.cache_clear()
        t = time.thread_time_ns()
        lean.geometry_table(lean.hr_max(p), p.inp_size, p.radius, lean.hr_max(p))
        case.table_build_ms = (time.thread_time_ns() - t) / 1e6
    return case


def pipeline_case(source: FolderSource, lean_encoding: bool, p: Protocol, batch: int,
                  steps: int, seed: int = 0) -> dict:
    """The real `host_dataset` (grain, no workers or threads) over `steps` batches after a
    first one: process CPU-ms and wall-ms per sample, the check on the stage sums."""
    it = iter(host_dataset(source, p, global_batch=batch, seed=seed, total_steps=steps + 1,
                           num_threads=0, buffer_size=1, lean=lean_encoding))
    next(it)  # start-up (grain's first element, the table cache) is not per-sample cost
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(it)
    n = steps * batch
    return {"encoding": "lean" if lean_encoding else "current", "scale_max": p.scale_max,
            "samples": n, "cpu_ms": (time.process_time() - t_cpu) * 1e3 / n,
            "wall_ms": (time.perf_counter() - t_wall) * 1e3 / n}


# --- report --------------------------------------------------------------------------

def _scale(c: Case) -> str:
    return f"U(1,{c.scale_max:g})"


def stage_table(cases: Sequence[Case]) -> str:
    head = ["encoding", "read", "scale", "samples"] + [STAGE_NAMES[s] for s in STAGES] + [
        "sum of stages", "process CPU", "wall"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        vals = [c.encoding, c.read, _scale(c), str(c.samples)]
        vals += [f"{c.stage_ms[s]:.2f}" for s in STAGES]
        vals += [f"{sum(c.stage_ms.values()):.2f}", f"**{c.cpu_ms:.2f}**", f"{c.wall_ms:.2f}"]
        rows.append("| " + " | ".join(vals) + " |")
    return "\n".join(rows)


def bytes_table(cases: Sequence[Case], batch: int) -> str:
    """Bytes per sample by array, and the host->device rate at the fastest predicted
    steps (global batch 32; a replicated table is sent once per device)."""
    fast = {t: min(per.values()) for t, per in PREDICTED_STEP_MS.items()}
    seen, rows = set(), []
    for c in cases:
        key = (c.encoding, c.scale_max)
        if key in seen:
            continue
        seen.add(key)
        arrays = ", ".join(f"{k} {v:,}" for k, v in c.bytes.items())
        total = sum(c.bytes.values())
        table = (f"{c.table_bytes:,} per batch per device ({c.table_bytes / batch:,.0f}/sample "
                 f"at batch {batch} on 1 device, {8 * c.table_bytes / batch:,.0f} on 8)"
                 if c.encoding == "lean" else "-")
        rates = " / ".join(
            f"{(STEP_BATCH * total + DEVICES[t] * c.table_bytes) / ms / 1e3:,.0f}"
            for t, ms in fast.items())
        rows.append(f"| {c.encoding} | {_scale(c)} | {arrays} | **{total:,}** | {table} | "
                    f"{rates} |")
    head = " / ".join(f"{t} at {ms:.1f} ms" for t, ms in fast.items())
    return "\n".join([f"| encoding | scale | bytes per sample, by array | total per sample | "
                      f"replicated table | host->device MB/s ({head}) |",
                      "|---|---|---|---|---|---|"] + rows)


def cores_table(cases: Sequence[Case]) -> str:
    rows = ["| encoding | read | scale | CPU-ms/sample | "
            + " | ".join(f"{t} {d} ({PREDICTED_STEP_MS[t][d]:.1f} ms/step)"
                         for t in PREDICTED_STEP_MS for d in PREDICTED_STEP_MS[t]) + " |",
            "|" + "---|" * (4 + sum(len(v) for v in PREDICTED_STEP_MS.values()))]
    for c in cases:
        vals = [c.encoding, c.read, _scale(c), f"{c.cpu_ms:.2f}"]
        for t, per in PREDICTED_STEP_MS.items():
            goal = CORE_GOALS[t][0]
            for ms in per.values():
                cores = c.cpu_ms * STEP_BATCH / ms
                vals.append(f"{cores:.1f}" + ("" if cores <= goal else " (over)"))
        rows.append("| " + " | ".join(vals) + " |")
    goals = "; ".join(f"{t}: <= {g} ({why})" for t, (g, why) in CORE_GOALS.items())
    return "\n".join(rows) + f"\n\nCores = CPU-ms/sample x {STEP_BATCH} / step ms. Goals: {goals}."


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 small images, batch 4, a few samples")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=(1356, 2040), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--png_steps", type=int, default=1, help="batches per PNG-decode case")
    ap.add_argument("--cache_steps", type=int, default=6, help="batches per cached case")
    ap.add_argument("--pipeline_steps", type=int, default=4,
                    help="batches of the real host_dataset per encoding (cached source)")
    ap.add_argument("--inp_size", type=int, default=48)
    ap.add_argument("--sample_q", type=int, default=2304)
    ap.add_argument("--scale_max", type=float, nargs="+", default=(4.0, 8.0))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.size, args.batch = 2, (200, 240), 4
        args.png_steps, args.cache_steps, args.inp_size, args.sample_q = 1, 1, 16, 64
        args.pipeline_steps = 1

    cases, pipes = [], []
    with tempfile.TemporaryDirectory(prefix="msit-input-bench-") as tmp:
        folder = os.path.join(tmp, "hr")
        os.makedirs(folder)
        t0 = time.perf_counter()
        paths = write_images(folder, args.images, tuple(args.size), args.seed)
        png_mb = sum(os.path.getsize(q) for q in paths) / len(paths) / 1e6
        raw_mb = args.size[0] * args.size[1] * 3 / 1e6
        made_s = time.perf_counter() - t0
        png = FolderSource(folder)
        cached = FolderSource(folder, cache_dir=os.path.join(tmp, "cache"))
        for i in range(len(cached)):  # warm: writes the .npy copies (and the page cache)
            np.asarray(cached[i]).sum()
        for scale_max in args.scale_max:
            p = Protocol(args.inp_size, args.sample_q, 1.0, scale_max, True, radius=3)
            for read, source, steps in (("png", png, args.png_steps),
                                        ("cache", cached, args.cache_steps)):
                for encoding in ("current", "lean"):
                    cases.append(run_case(source, encoding, read, p, args.batch, steps,
                                          args.seed))
            for lean_encoding in (False, True):
                pipes.append(pipeline_case(cached, lean_encoding, p, args.batch,
                                           args.pipeline_steps, args.seed))

    out(f"## Input pipeline at the paper protocol (batch {args.batch}, inp {args.inp_size}, "
        f"sample_q {args.sample_q}, augmentation on)\n")
    out(f"Machine: {cpu_name()}, {os.cpu_count()} cores "
        f"visible, Python {platform.python_version()}, numpy {np.__version__}, Pillow "
        f"{Image.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"{args.images} synthetic {args.size[1]}x{args.size[0]} PNGs, {png_mb:.2f} MB each "
        f"({png_mb / raw_mb:.0%} of raw; written in {made_s:.1f} s).\n")
    out("CPU-ms per sample by stage (thread CPU time; 'process CPU' is time.process_time "
        "over the whole case, the figure the cores below use):\n")
    out(stage_table(cases) + "\n")
    for c in cases:
        if c.encoding == "lean" and c.read == "cache":
            out(f"Lean table of U(1,{c.scale_max:g}) (hr_max {lean.hr_max(Protocol(args.inp_size, args.sample_q, 1.0, c.scale_max))}): "
                f"one uncached build {c.table_build_ms:.2f} CPU-ms per batch (cached per hr "
                "in a run).")
    out("\nA batch's pickle round trip (what crossing from a grain worker process costs at "
        "least; not in the stage sums), CPU-ms per sample: " + ", ".join(
            f"{c.encoding} {_scale(c)} {c.pickle_ms:.3f}" for c in cases if c.read == "cache"))
    out("\nThe real pipeline (`host_dataset`, cached source, no workers/threads), per sample:\n")
    out("| encoding | scale | samples | process CPU-ms | wall-ms |\n|---|---|---|---|---|")
    for q in pipes:
        out(f"| {q['encoding']} | U(1,{q['scale_max']:g}) | {q['samples']} | "
            f"**{q['cpu_ms']:.2f}** | {q['wall_ms']:.2f} |")
    out("\nBytes per sample host->device:\n")
    out(bytes_table(cases, args.batch) + "\n")
    out("Host cores needed to feed the step (predicted train_stage1 step times from "
        "BENCHMARKS.md: f32 default precision `highest`, bf16 with the bf16 backward):\n")
    out(cores_table(cases))
    return cases


if __name__ == "__main__":
    main()
