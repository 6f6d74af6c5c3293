"""Train the paper-size MSIT (EDSR-baseline, stage 1) for N minutes on a lent accelerator.

    python -m benchmarks.train_on_device --minutes 7 --data 291 --data_root carry/data \
        --eval_data carry/data --workdir /tmp/run --json $OUT/train.json [--batch 32]
    python -m benchmarks.train_on_device --allow_cpu --tiny --minutes 3 --data 291 \
        --data_root carry/data --workdir /tmp/tiny --json tiny.json   # CPU smoke test
    python -m benchmarks.train_on_device --pack carry/data --data_root /work/data \
        --eval_data /work/data                   # make the carry folder (no JAX needed)

What it runs is what users run: configs/msit_edsr_stage1.py (model_config('edsr-baseline',
conv='plain'), batch 32, 48x48 LR patches, 2304 queries, scale ~ U(1, 4)) through
`msit_jax.training.loop.train_and_evaluate`, with only the schedule length chosen to
fit the time: `total_steps` from the measured speed, `lr.epoch_steps=0` (the reference
schedule applied per step) and the warm-up clipped by `fit_warmup` (total_steps // 10),
so the cosine reaches 0 when the budget ends. `--data` is a folder or named training
sets under `--data_root` ('291', 't91+bsd200', 'div2k'; msit_jax.data.catalog).

Phases, all inside --minutes (every figure goes to --json; a summary is printed):
  1. calibration: a real `train_and_evaluate` in WORKDIR/calibration (own schedule,
     thrown away) timed by wrapping the loop's step function: setup, compile (first
     step) and steps/s over --calibration_s;
  2. a cold evaluation of the calibration weights on Set5/Set14 x2/x3/x4: it
     compiles every encoder/decoder shape once (JAX's in-process and persistent
     compilation caches then serve the final evaluation) and measures what the final
     evaluation costs; bicubic is scored here (it does not depend on the model);
  3. a pipeline-only pass (`msit_jax.data.pipeline.train_dataset`, same workers,
     threads, buffers and device transfer, no training) for --pipeline_check_s;
  4. the plan (`plan_steps`): total_steps = speed x (time left - the second setup
     and compile - save - evaluation - exit reserves) x --safety;
  5. the run, in WORKDIR (resumable: rerun the same command; the stored plan is
     kept so the resumed run is exact), stopped by SIGTERM at the training
     deadline if it falls behind (the loop saves a checkpoint and stops);
  6. the final evaluation: the saved checkpoint through `predictors.load_msit` (what
     evaluate.py loads) and `msit_jax.eval.runner.evaluate_scale`, benchmark protocol
     (Y PSNR, shave = scale), MSIT and bicubic, stopped at the evaluation deadline.
A last timer writes the JSON (status 'deadline') and exits 4 if anything overruns.
Exit status: 0 trained to the plan and evaluated; 3 stopped at the training
deadline (checkpoint saved; rerun to resume) and evaluated; 1 an error; 4 the
hard deadline.

Input-pipeline stalls are measured two ways (JSON `input_pipeline`): in the loop,
by wrapping the dataset the loop iterates (time in `next(data_it)`) and the step
function (whether the device still had queued work when the loop asked for the
next batch: with async dispatch a wait while the device is busy is no stall), so
`stall_s_min` counts waits that began with the device idle, `stall_s_max` adds the
waits during which it ran dry; and by the pipeline-only pass's batches/s against
the training steps/s (`headroom` > 1: the input keeps up).

Data loading: `num_workers` grain workers from the usable CPUs (`choose_workers`:
CPUs - 4 for the main process, its prefetch threads and XLA, at most 12), one
decode thread each; `skip_bad_images=True` decodes every image once up front and
fills the `.npy` cache (--cache_root/npy), which the workers memory-map, so no
image is decoded twice. XLA's persistent compilation cache and (GPU) per-fusion
autotune cache live in --cache_root too.

Data transport (the device's carry is 64 MiB, tree included): `--pack OUT` writes
the training sets as OUT/T91 and OUT/BSD200 (the layout `--data 291 --data_root OUT`
reads) and copies Set5/ and Set14/ from --eval_data unchanged (5.6 MB of PNG; the
evaluation reads them there, so they travel too), then prints sizes and the round-trip
cost (also OUT/pack.json). Choice: JPEG quality 97 with 4:4:4 chroma (subsampling=0).
Measured on the 291 set here (T91: 91 BMPs, 16 MB; BSD200: 200 PNGs, 50 MB): T91 4.2 MiB,
round trip RGB PSNR vs the originals mean 44.5 dB, min 42.0 dB; BSD200 19.9 MiB, mean
48.0, min 44.1 dB; with Set5/Set14 29.7 MiB in all, 12 s on one core. Quality 95: 19.3
MiB, min 38.8 dB; 98: 26.5 MiB, min 44.5 dB. `--pack_format webp` (lossless, no cost)
measured 39.2 MiB for the 291 set and took 694 s to encode on one core here: it fits
too (39.2 + 5.6 + 4.6 MB of wheels + the ~2.5 MB tree) but leaves little room. An
error of ~45 dB is far below what a minutes-long run resolves, yet it is not the
original data: quote figures as "291 (JPEG q97)".

Device invocation. Its image has JAX, flax, optax, orbax, Pillow, but not grain,
array-record, portpicker, ml-collections or tensorboardX: their cp312 wheels travel
in .whl (4.6 MB; the device tool's README). Prepare here, once (.whl/ is ignored
already; carry/ must be too):
    echo /carry/ >> .git/info/exclude
    python -m benchmarks.train_on_device --pack carry/data --data_root /work/data \
        --eval_data /work/data
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform \
        manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl grain==0.2.18 \
        array-record==0.8.6 portpicker ml-collections==1.1.0 tensorboardX==2.6.5
then one `run` with carry ["carry", ".whl"] and timeout_s 560, the command (one line):
    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export
    PYTHONPATH=/tmp/site || exit; export PYTHONUNBUFFERED=1; python3
    -m benchmarks.train_on_device --minutes 7.5 --data 291 --data_root carry/data
    --eval_data carry/data --workdir /tmp/run --cache_root /tmp/msit_cache
    --json $OUT/train.json 2>&1 | tee $OUT/train.log
The 15 device minutes: ~1-2 to start the machine, 7.5 for this command (the budget
counts from the script's start: imports, compiles, evaluation included), the
transfers, and ~4 left for one short rerun on the still-warm machine, which resumes
from /tmp/run with the stored plan (XLA's cache in /tmp/msit_cache makes its
compiles hits). The workdir stays there (a checkpoint is too many files and folders
for $OUT: 8 files, 2 folders deep); train.json and train.log come back. Carried in
all: ~30 MB of data, 4.6 MB of wheels and the working tree (~2.5 MB now; other
untracked files count too). accel_check.py (7 min by default) does not fit beside a
7.5-minute training: give it its own session, or shorten both, e.g.
`python -m benchmarks.accel_check --budget_s 120 --sections agreement_infer,
agreement_grad --json $OUT/accel.json; python -m benchmarks.train_on_device
--minutes 5 ...` (';', not '&&': a failed tolerance must not cancel the training).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

T_START = time.perf_counter()  # the budget counts from here (imports included)
# The device machine runs the tree uninstalled: `python -m benchmarks.train_on_device`
# from the repository root puts the root (the cwd) on sys.path for msit_jax.

SCHEMA = "msit-jax/train_on_device/1"
EXIT_OK, EXIT_ERROR, EXIT_PARTIAL, EXIT_DEADLINE = 0, 1, 3, 4
PLAN_FILE = "device_plan.json"  # in the workdir: the plan a resume keeps
EVAL_SETS = ("set5", "set14")
EVAL_SCALES = (2.0, 3.0, 4.0)

# Sizes: the paper's stage 1, or a tiny model for the CPU smoke test.
SIZES = {
    "paper": dict(batch=32, inp_size=48, sample_q=2304, calibration_s=20.0,
                  pipeline_check_s=8.0, log_every=100, eval_max_images=0, eval_max_side=0,
                  save_reserve_s=30.0, exit_margin_s=15.0, min_eval_reserve_s=20.0),
    "tiny": dict(batch=4, inp_size=16, sample_q=64, calibration_s=3.0,
                 pipeline_check_s=2.0, log_every=10, eval_max_images=1, eval_max_side=48,
                 save_reserve_s=10.0, exit_margin_s=5.0, min_eval_reserve_s=5.0),
}
EVAL_RESERVE_FACTOR = 1.5  # final evaluation reserve = this x the measured warm cost
CALIBRATION_EVAL_SHARE = 0.5  # the calibration's cold evaluation stops at this budget share
PACK_QUALITY = 97


# ----------------------------------------------------------------------------- planning
# Pure functions (no JAX): tests/test_train_on_device.py checks them.

def choose_workers(cpus: int) -> tuple[int, int]:
    """(grain worker processes, threads per worker) for a host with `cpus` usable CPUs:
    four CPUs left to the training process (loop, prefetch/transfer threads, XLA's
    host threads), at most 12 workers, none below 3 CPUs (decode in the process)."""
    cpus = max(1, int(cpus))
    if cpus < 3:
        return 0, 1
    return min(12, max(1, cpus - 4)), 1


def usable_cpus() -> int:
    """CPUs this process may run on (taskset / cgroup affinity), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclasses.dataclass
class Deadlines:
    """Seconds from T_START: train_stop (SIGTERM to the loop), eval_stop (evaluation
    stops before its next image), hard (write the JSON and exit)."""

    budget_s: float
    train_stop: float
    eval_stop: float
    hard: float


def deadlines(budget_s: float, eval_reserve_s: float, save_reserve_s: float,
              exit_margin_s: float) -> Deadlines:
    """Where each phase must stop so the process ends before budget_s: the evaluation
    ends exit_margin_s before the end, training eval_reserve_s + save_reserve_s before
    that (the SIGTERM save must fit in save_reserve_s), the hard stop at half the margin."""
    eval_stop = budget_s - exit_margin_s
    train_stop = eval_stop - eval_reserve_s - save_reserve_s
    return Deadlines(budget_s, train_stop, eval_stop, budget_s - exit_margin_s / 2)


def fitted_warmup(total_steps: int, warmup_steps: int = 50_000) -> int:
    """The warm-up `msit_jax.training.config.fit_warmup` gives a per-step schedule
    (lr.epoch_steps=0) of total_steps: the paper's 50k steps, clipped to total // 10
    when the run is not longer than that."""
    from msit_jax.training.config import base_config, fit_warmup

    c = base_config()
    c.total_steps, c.lr.warmup_steps, c.lr.epoch_steps = int(total_steps), warmup_steps, 0
    return int(fit_warmup(c)[0].lr.warmup_steps)


def plan_steps(*, now_s: float, dl: Deadlines, steps_per_s: float, setup_s: float,
               compile_s: float, safety: float = 0.95, min_steps: int = 10) -> dict:
    """total_steps whose schedule ends before the training deadline.

    now_s: seconds since T_START when the run is started; setup_s, compile_s: what the
    run spends before its first step finishes (measured by the calibration); the
    steps then run at steps_per_s, discounted by `safety`. At least min_steps (a
    run too short for that still stops at the deadline, saved).
    """
    train_s = dl.train_stop - now_s - setup_s - compile_s
    steps = int(math.floor(max(0.0, train_s) * steps_per_s * safety))
    total = max(int(min_steps), steps)
    return {"total_steps": total, "warmup_steps": fitted_warmup(total),
            "train_s_available": train_s, "steps_per_s_assumed": steps_per_s,
            "safety": safety, "setup_s_assumed": setup_s, "compile_s_assumed": compile_s,
            "start_s": now_s, "clamped_to_min_steps": steps < min_steps,
            "expected_end_s": now_s + setup_s + compile_s + total / max(steps_per_s, 1e-9)}


def eval_reserve(cold_s: Optional[float], warm_s: Optional[float], minimum: float,
                 default: float) -> float:
    """Seconds kept for the final evaluation: 1.5 x its measured warm cost (the shapes
    are compiled by then), else 1.5 x the cold one, else `default`; at least minimum."""
    base = warm_s if warm_s is not None else cold_s
    return max(minimum, EVAL_RESERVE_FACTOR * base if base is not None else default)


def throughput(steps: int, seconds: float, batch: int, sample_q: int) -> dict:
    sps = steps / seconds if seconds > 0 else float("nan")
    return {"steps": int(steps), "seconds": seconds, "steps_per_s": sps,
            "samples_per_s": sps * batch, "queries_per_s": sps * batch * sample_q}


REQUIRED_KEYS = {
    "schema": str, "status": str, "exit_code": int, "meta": dict, "budget": dict,
    "data": dict, "config": dict, "calibration": dict, "plan": dict, "training": dict,
    "input_pipeline": dict, "eval": dict, "errors": list,
}
META_KEYS = ("device_kind", "platform", "devices", "jax_version", "host_cpu_count",
             "usable_cpus")
TRAINING_KEYS = ("steps_done", "start_step", "total_steps", "steps_per_s", "samples_per_s",
                 "queries_per_s", "compile_s", "final_loss")


def check_schema(res: dict) -> list[str]:
    """What is missing or mistyped in a result JSON (empty: fine)."""
    bad = [f"{k}: missing or not {t.__name__}" for k, t in REQUIRED_KEYS.items()
           if not isinstance(res.get(k), t)]
    bad += [f"meta.{k}: missing" for k in META_KEYS if k not in res.get("meta", {})]
    bad += [f"training.{k}: missing" for k in TRAINING_KEYS if k not in res.get("training", {})]
    for k in ("num_workers", "num_threads"):
        if k not in res.get("data", {}):
            bad.append(f"data.{k}: missing")
    if "method" not in res.get("input_pipeline", {}):
        bad.append("input_pipeline.method: missing")
    return bad


def jsonable(x: Any) -> Any:
    """Non-finite floats as strings ('nan'), numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "shape", None) == ():
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    return x


# ----------------------------------------------------------------------------- packing

def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def pack(out: str, data: str, data_root: str, eval_data: Optional[str], fmt: str = "jpeg",
         quality: int = PACK_QUALITY) -> dict:
    """Write the training sets named by `data` (under data_root) as OUT/<T91|BSD200>/ in
    `fmt` ('jpeg': quality, 4:4:4; 'webp': lossless), copy Set5/Set14 from eval_data
    unchanged, and return (and write to OUT/pack.json) sizes and round-trip PSNRs."""
    import numpy as np
    from PIL import Image

    from msit_jax.data import catalog
    from msit_jax.eval.metrics import psnr
    from msit_jax.images import list_images

    root, where = catalog.data_root(data_root or None)
    report: dict = {"format": fmt, "quality": quality if fmt == "jpeg" else "lossless",
                    "chroma": "4:4:4" if fmt == "jpeg" else "rgb", "sets": {}}
    ext = ".jpg" if fmt == "jpeg" else ".webp"
    for name in catalog.parse_names(data):
        kind, src = catalog.locate(name, root, where)
        if kind != "folder":
            raise SystemExit(f"--pack: {name} is a TFDS dataset here, not a folder")
        dest = os.path.join(out, catalog.TRAINING_SETS[name].folders[0])
        os.makedirs(dest, exist_ok=True)
        psnrs, before = [], 0
        for f in list_images(src):
            before += os.path.getsize(f)
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"))
            target = os.path.join(dest, os.path.splitext(os.path.basename(f))[0] + ext)
            if fmt == "jpeg":
                Image.fromarray(a).save(target, "JPEG", quality=quality, subsampling=0)
            else:
                Image.fromarray(a).save(target, "WEBP", lossless=True, quality=100, method=4)
            with Image.open(target) as im:
                psnrs.append(psnr(a / 255.0, np.asarray(im.convert("RGB")) / 255.0))
        finite = [p for p in psnrs if math.isfinite(p)]
        report["sets"][name] = {
            "source": src, "images": len(psnrs), "source_bytes": before,
            "packed_bytes": dir_bytes(dest),
            "psnr_mean_db": float(np.mean(finite)) if finite else float("inf"),
            "psnr_min_db": float(np.min(finite)) if finite else float("inf"),
            "lossless_images": len(psnrs) - len(finite)}
    if eval_data:
        from msit_jax.eval import datasets

        for name in EVAL_SETS:
            _, path = datasets.resolve(name, eval_data)
            dest = os.path.join(out, datasets.BENCHMARKS[name].folders[0])
            shutil.copytree(path, dest, dirs_exist_ok=True, symlinks=False)
            report["sets"][name] = {"source": path, "packed_bytes": dir_bytes(dest),
                                    "copied": "unchanged"}
    report["total_bytes"] = dir_bytes(out)
    with open(os.path.join(out, "pack.json"), "w") as f:
        json.dump(jsonable(report), f, indent=2)
    for name, s in report["sets"].items():
        extra = (f", round trip PSNR mean {s['psnr_mean_db']:.2f} dB, min "
                 f"{s['psnr_min_db']:.2f} dB" if "psnr_mean_db" in s else " (copied)")
        print(f"{name}: {s.get('images', '')} images, {s['packed_bytes'] / 2**20:.1f} MiB"
              + extra)
    print(f"{out}: {report['total_bytes'] / 2**20:.1f} MiB in all (carry limit 64 MiB with "
          "the working tree and wheels)")
    return report


# ----------------------------------------------------------------------------- probes

class CalibrationDone(Exception):
    """Raised by the wrapped step function when the calibration window is over."""


class Probe:
    """Timings taken inside `train_and_evaluate` by wrapping its dataset and step function.

    Step function: the first call's duration (trace + compile + dispatch, then the loop
    blocks on that step: compile_s is measured to the second call), the steps after it,
    and the last step's metrics (to see whether the device still has queued work).
    Dataset: time in `next(data_it)`, classified by whether the device was idle when the
    wait began (a stall) or ran dry during it (part of it a stall, at most).
    """

    def __init__(self, stop_after_s: Optional[float] = None,
                 deadline: Optional[Callable[[], bool]] = None):
        self.t_call = time.perf_counter()
        self.stop_after_s = stop_after_s  # calibration: abort this long after compiling
        self.deadline = deadline          # run: past it, signal the loop once
        self.signalled = False
        self._signal_lock = threading.Lock()
        self.calls = 0
        self.t_first_call: Optional[float] = None
        self.t_second_call: Optional[float] = None
        self.t_last_done: Optional[float] = None
        self.first_call_s: Optional[float] = None
        self.last_metrics = None
        self.last_state = None
        self.first_next_s: Optional[float] = None
        self.waits = 0
        self.wait_s = 0.0
        self.stall_s_min = 0.0
        self.stall_s_max = 0.0

    # the step function
    def device_busy(self) -> bool:
        m = self.last_metrics
        if m is None:
            return False
        loss = m["loss"]
        return hasattr(loss, "is_ready") and not loss.is_ready()

    def wrap_step(self, fn: Callable) -> Callable:
        import jax

        def step(state, batch):
            now = time.perf_counter()
            if self.calls == 1:
                self.t_second_call = now
            if (self.stop_after_s is not None and self.t_second_call is not None
                    and now - self.t_second_call >= self.stop_after_s):
                jax.block_until_ready(self.last_metrics)
                self.t_last_done = time.perf_counter()
                self.last_state = state  # not donated: this call dispatches nothing
                raise CalibrationDone()
            if self.deadline is not None and not self.signalled and self.deadline():
                self.signal_stop()
            if self.calls == 0:
                self.t_first_call = now
            out = fn(state, batch)
            if self.calls == 0:
                self.first_call_s = time.perf_counter() - now
            self.calls += 1
            self.last_metrics = out[1]
            return out

        return step

    def signal_stop(self) -> None:
        """SIGTERM to this process, once (a second one makes the loop exit unsaved)."""
        with self._signal_lock:  # the stop timer and the step wrapper may both call
            if not self.signalled and self.calls > 0:  # the loop's handlers are installed
                self.signalled = True
                os.kill(os.getpid(), signal.SIGTERM)

    # the dataset
    def wrap_dataset(self, ds):
        return _TimedDataset(ds, self)

    def record_wait(self, dt: float, busy_before: bool, busy_after: bool) -> None:
        if self.first_next_s is None:
            self.first_next_s = dt  # pipeline start-up: workers, first batch
            return
        if self.calls == 0:
            return
        self.waits += 1
        self.wait_s += dt
        if not busy_before:
            self.stall_s_min += dt
            self.stall_s_max += dt
        elif not busy_after:
            self.stall_s_max += dt

    # figures
    @property
    def setup_s(self) -> Optional[float]:
        return None if self.t_first_call is None else self.t_first_call - self.t_call

    @property
    def compile_s(self) -> Optional[float]:
        """First step call to the second: trace, compile, one step, the next batch."""
        if self.t_first_call is None or self.t_second_call is None:
            return self.first_call_s
        return self.t_second_call - self.t_first_call

    def pipeline_figures(self, train_wall_s: Optional[float]) -> dict:
        frac = (self.wait_s / train_wall_s) if train_wall_s else None
        return {"method": "in-loop: the loop's dataset and step function wrapped by this "
                          "script (time in next(data_it); stall = the device had no queued "
                          "step when the wait began (min) or ran dry during it (max))",
                "first_batch_s": self.first_next_s, "waits": self.waits,
                "data_wait_s": self.wait_s, "data_wait_fraction": frac,
                "stall_s_min": self.stall_s_min, "stall_s_max": self.stall_s_max,
                "stall_fraction_min": (self.stall_s_min / train_wall_s) if train_wall_s else None,
                "stall_fraction_max": (self.stall_s_max / train_wall_s) if train_wall_s else None}


class _TimedDataset:
    def __init__(self, ds, probe: Probe):
        self.ds, self.probe = ds, probe

    def __iter__(self):
        return _TimedIterator(iter(self.ds), self.probe)

    def __getattr__(self, name):
        return getattr(self.ds, name)


class _TimedIterator:
    def __init__(self, it, probe: Probe):
        self.it, self.probe = it, probe

    def __iter__(self):
        return self

    def __next__(self):
        busy = self.probe.device_busy()
        t = time.perf_counter()
        batch = next(self.it)
        dt = time.perf_counter() - t
        self.probe.record_wait(dt, busy, self.probe.device_busy())
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        return self.it.set_state(state)

    def close(self):
        close = getattr(self.it, "close", None)
        if close is not None:
            close()

    def __getattr__(self, name):
        return getattr(self.it, name)


@contextlib.contextmanager
def instrumented(probe: Probe):
    """The loop's `train_dataset` and `jit_train_step` wrapped by `probe`, restored after."""
    from msit_jax.training import loop

    ds_fn, jit_fn = loop.train_dataset, loop.jit_train_step
    loop.train_dataset = lambda *a, **kw: probe.wrap_dataset(ds_fn(*a, **kw))
    loop.jit_train_step = lambda *a, **kw: probe.wrap_step(jit_fn(*a, **kw))
    try:
        yield probe
    finally:
        loop.train_dataset, loop.jit_train_step = ds_fn, jit_fn


# ----------------------------------------------------------------------------- the run

def now_s() -> float:
    return time.perf_counter() - T_START


def setup_caches(cache_root: str) -> None:
    """Before jax is imported: XLA's per-fusion autotune cache (GPU) under cache_root."""
    os.makedirs(cache_root, exist_ok=True)
    flag = f"--xla_gpu_per_fusion_autotune_cache_dir={os.path.join(cache_root, 'autotune')}"
    if "autotune_cache_dir" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def train_config(args, sizes: dict, workers: tuple[int, int], total_steps: int):
    """The stage-1 paper config (tiny: the tiny model) with this run's data, schedule
    length and data loading."""
    from msit_jax.models.config import tiny_model_config
    from msit_jax.training.config import paper_config, source_config

    c = paper_config("edsr-baseline", stage=1)
    if args.tiny:
        c.model = tiny_model_config("edsr-baseline", conv="plain")
        c.model.update(dim=16, heads=2, msno_heads=2, qk_heads=1, mlp_hidden=(8,),
                       posenc_dims=8)  # configs/tiny.py's
    c.batch_size = args.batch or sizes["batch"]
    c.data.inp_size, c.data.sample_q = sizes["inp_size"], sizes["sample_q"]
    c.total_steps = int(total_steps)
    c.lr.epoch_steps = 0
    c.lr.warmup_steps = fitted_warmup(total_steps)
    npy = os.path.join(args.cache_root, "npy")
    if os.path.isdir(args.data):
        c.data.train = source_config("folder", path=os.path.abspath(args.data),
                                     skip_bad_images=True, cache_dir=npy)
    else:
        c.data.train = source_config("named", name=args.data, data_root=args.data_root or "",
                                     skip_bad_images=True, cache_dir=npy)
    c.data.num_workers, c.data.num_threads = workers
    c.data.buffer_size, c.data.device_buffer = 2, 2
    c.eval.every_steps = 0
    c.demo.enabled = False
    c.log_every_steps = sizes["log_every"]
    c.progress_bar = False
    c.tensorboard = False
    c.checkpoint.update(every_steps=max(1, total_steps // 3), keep=2, keep_best=False,
                        async_save=True)
    c.preemption_grace_s = sizes["save_reserve_s"]
    return c


def open_eval_sets(args) -> list:
    from msit_jax.eval import datasets

    return [datasets.open_eval_set(name, root_flag=args.eval_data) for name in EVAL_SETS]


CHECK_CACHE = "checked_images.json"  # the loop's name for it, in each workdir


def check_eval_not_trained(config, eval_sets, check_cache: Optional[str] = None) -> int:
    """ConfigError when a benchmark image is a training image (the loop itself refuses
    benchmark folders as data.train; this checks the files, across folders). Opening
    the source decodes every image once (skip_bad_images), filling the .npy cache and
    the verdict file `check_cache` that the runs then reuse. Returns the image count."""
    from msit_jax.data.sources import check_disjoint, check_not_benchmark, make_source

    train = make_source(config.data.train, min_side=config.data.inp_size,
                        check_cache=check_cache)
    check_not_benchmark(train)
    for es in eval_sets:
        check_disjoint(train, es.source)
    return len(train)


def evaluate(predictor, eval_sets, sizes: dict, should_stop: Callable[[], bool]) -> dict:
    """{set: {'x2': {'psnr', 'n_images', ...}}} through the evaluation runner, benchmark
    protocol (Y, shave = scale), LR as the reference makes it ('auto'); stops early
    (partial results kept, 'aborted': True) when should_stop() turns true."""
    from msit_jax.eval import protocol, runner

    out: dict = {}
    for es in eval_sets:
        preset = protocol.get_preset(protocol.default_preset(es.name))
        for s in EVAL_SCALES:
            key = f"x{s:g}"
            try:
                r = runner.evaluate_scale(predictor, es, s, preset, lr_source="auto",
                                          max_images=sizes["eval_max_images"],
                                          max_side=sizes["eval_max_side"], with_ssim=False,
                                          strict=True, should_stop=should_stop)
            except runner.EvaluationAborted:
                out.setdefault(es.name, {})[key] = {"aborted": True}
                return out
            out.setdefault(es.name, {})[key] = {
                "psnr": r.psnr, "n_images": len(r.per_image), "protocol": r.protocol,
                "shave": r.shave, "lr_source": r.lr_source,
                "seconds": float(sum(v["time_s"] for v in r.per_image.values()))}
    return out


def fold_variables(model_cfg, variables):
    from msit_jax import reparam

    return reparam.fold(model_cfg, variables)


class Output:
    """The result dict, written as JSON by the main thread or the hard-deadline timer."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.written = False
        self.res: dict = {
            "schema": SCHEMA, "status": "running", "exit_code": EXIT_ERROR, "meta": {},
            "budget": {}, "data": {}, "config": {}, "calibration": {}, "plan": {},
            "training": {k: None for k in TRAINING_KEYS}, "input_pipeline": {"method": None},
            "eval": {}, "errors": []}

    def write(self, status: Optional[str] = None, exit_code: Optional[int] = None) -> None:
        with self.lock:
            if status:
                self.res["status"] = status
            if exit_code is not None:
                self.res["exit_code"] = exit_code
            self.res["budget"]["elapsed_s"] = now_s()
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(jsonable(self.res), f, indent=2, allow_nan=False)
            os.replace(tmp, self.path)
            self.written = True


def hard_stop(out: Output) -> None:
    os.write(2, b"\nhard deadline: writing the JSON and exiting\n")
    try:
        out.res["errors"].append("hard deadline reached; phases after it did not run")
        out.write("deadline", EXIT_DEADLINE)
    finally:
        os._exit(EXIT_DEADLINE)


def run(args) -> int:
    sizes = dict(SIZES["tiny" if args.tiny else "paper"])
    for k in ("calibration_s", "pipeline_check_s"):
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    setup_caches(args.cache_root)
    out = Output(args.json)
    res = out.res
    budget_s = args.minutes * 60.0
    hard_timer = None
    try:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.join(args.cache_root, "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        backend = jax.default_backend()
        if backend not in ("gpu", "tpu") and not args.allow_cpu:
            raise SystemExit(f"JAX's default backend is {backend!r}, not a GPU or TPU; pass "
                             "--allow_cpu (with --tiny) for the CPU smoke test")
        cpus = usable_cpus()
        workers = (args.num_workers, 1) if args.num_workers is not None else choose_workers(cpus)
        res["meta"] = {
            "device_kind": jax.devices()[0].device_kind, "platform": backend,
            "devices": [str(d) for d in jax.devices()], "device_count": jax.device_count(),
            "jax_version": jax.__version__, "python": sys.version.split()[0],
            "host_cpu_count": os.cpu_count(), "usable_cpus": cpus, "tiny": bool(args.tiny),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
        print(f"device: {res['meta']['device_kind']} x{jax.device_count()} ({backend}), jax "
              f"{jax.__version__}, {cpus} CPUs -> {workers[0]} grain workers", flush=True)
        eval_reserve_default = 120.0 if not args.tiny else 30.0
        dl = deadlines(budget_s, eval_reserve_default, sizes["save_reserve_s"],
                       sizes["exit_margin_s"])
        hard_timer = threading.Timer(max(0.0, dl.hard - now_s()), hard_stop, args=(out,))
        hard_timer.daemon = True
        hard_timer.start()
        res["budget"] = {"minutes": args.minutes, "budget_s": budget_s,
                         "exit_margin_s": sizes["exit_margin_s"],
                         "save_reserve_s": sizes["save_reserve_s"], "hard_s": dl.hard}

        from msit_jax.errors import TrainingInterrupted
        from msit_jax.eval import predictors
        from msit_jax.training import loop
        from msit_jax.training.metrics import read_jsonl

        workdir = os.path.abspath(args.workdir)
        plan_path = os.path.join(workdir, PLAN_FILE)
        stored = None
        if os.path.isfile(plan_path):
            with open(plan_path) as f:
                stored = json.load(f)
        from msit_jax.training.checkpoints import saved_steps

        if stored is None and os.path.isdir(workdir) and saved_steps(workdir):
            raise SystemExit(f"{workdir} holds a run this script did not plan (no {PLAN_FILE})"
                             "; use a new --workdir")
        eval_sets = open_eval_sets(args)
        probe_cfg = train_config(args, sizes, workers, 1_000_000)
        os.makedirs(workdir, exist_ok=True)
        check_cache = os.path.join(workdir, CHECK_CACHE)
        t = time.perf_counter()
        n_train = check_eval_not_trained(probe_cfg, eval_sets, check_cache)
        first_decode_s = time.perf_counter() - t
        res["data"] = {"spec": args.data, "kind": probe_cfg.data.train.kind,
                       "data_root": args.data_root, "eval_data": args.eval_data,
                       "cache_dir": probe_cfg.data.train.cache_dir,
                       "num_workers": workers[0], "num_threads": workers[1],
                       "buffer_size": probe_cfg.data.buffer_size,
                       "device_buffer": probe_cfg.data.device_buffer,
                       "train_images": n_train, "first_decode_s": first_decode_s,
                       "eval_sets": {es.name: len(es) for es in eval_sets}}
        d = probe_cfg.data
        res["config"] = {"model": probe_cfg.model.to_dict(), "batch_size": probe_cfg.batch_size,
                         "inp_size": d.inp_size, "sample_q": d.sample_q,
                         "scale_min": d.scale_min, "scale_max": d.scale_max,
                         "runtime": probe_cfg.runtime.to_dict(),
                         "config": "configs/msit_edsr_stage1.py (paper_config('edsr-baseline', "
                                   "stage=1))" if not args.tiny else "tiny model"}
        batch, q = probe_cfg.batch_size, probe_cfg.data.sample_q

        bicubic = None
        cold_s = warm_s = None
        if stored is None:
            # 1. calibration: the real loop, its own throw-away workdir and schedule
            cal_dir = os.path.join(workdir, "calibration")
            shutil.rmtree(cal_dir, ignore_errors=True)
            os.makedirs(cal_dir)
            if os.path.isfile(check_cache):  # the verdicts: no second up-front decode
                shutil.copy(check_cache, os.path.join(cal_dir, CHECK_CACHE))
            probe = Probe(stop_after_s=sizes["calibration_s"])
            print(f"[calibration] {sizes['calibration_s']:g} s of steps after compiling ...",
                  flush=True)
            with instrumented(probe):
                try:
                    loop.train_and_evaluate(probe_cfg, cal_dir)
                    raise RuntimeError("calibration ended before its time window")
                except CalibrationDone:
                    pass
            n = probe.calls - 1
            cal = throughput(n, probe.t_last_done - probe.t_second_call, batch, q)
            cal.update(setup_s=probe.setup_s, compile_s=probe.compile_s,
                       first_call_s=probe.first_call_s,
                       input_pipeline=probe.pipeline_figures(cal["seconds"]))
            res["calibration"] = cal
            print(f"[calibration] setup {probe.setup_s:.1f} s, compile {probe.compile_s:.1f} s, "
                  f"{n} steps at {cal['steps_per_s']:.2f} steps/s", flush=True)
            # 2. cold evaluation of the calibration weights: compiles every shape once
            if not args.skip_calibration_eval:
                state = probe.last_state
                variables = jax.device_get(state.variables())
                probe = None
                msit = predictors.MSITPredictor(*fold_variables(probe_cfg.model, variables),
                                                check_finite=False)
                # At most until half the budget: past it, the default reserve is used.
                late = lambda: now_s() > CALIBRATION_EVAL_SHARE * budget_s  # noqa: E731
                t = time.perf_counter()
                cal_eval = evaluate(msit, eval_sets, sizes, late)
                cold_s = time.perf_counter() - t
                t = time.perf_counter()
                bicubic = evaluate(predictors.BicubicPredictor(), eval_sets, sizes, late)
                bicubic_s = time.perf_counter() - t
                if aborted(cal_eval) or aborted(bicubic):
                    res["errors"].append("calibration evaluation stopped at half the budget: "
                                         "the final evaluation gets the default reserve")
                    cold_s = max(cold_s, eval_reserve_default)
                    bicubic = None
                # What the final evaluation costs once compiled: Set5 again (every shape
                # is compiled now), scaled by the pixel count of all the sets.
                t = time.perf_counter()
                evaluate(msit, eval_sets[:1], sizes, late)
                warm_first = time.perf_counter() - t
                warm_s = warm_first * pixel_ratio(eval_sets, sizes) + bicubic_s
                res["calibration"].update(eval_cold_s=cold_s, eval_warm_s_estimate=warm_s,
                                          eval_warm_first_set_s=warm_first,
                                          bicubic_s=bicubic_s, psnr=cal_eval,
                                          steps_trained=n + 1)
                print(f"[calibration] evaluation {cold_s:.1f} s cold (compiles), bicubic "
                      f"{bicubic_s:.1f} s", flush=True)
            shutil.rmtree(cal_dir, ignore_errors=True)
            # 3. the input pipeline alone
            if sizes["pipeline_check_s"] > 0:
                res["input_pipeline"]["pipeline_only"] = pipeline_only(
                    probe_cfg, sizes["pipeline_check_s"], check_cache)
            # 4. the plan
            reserve = eval_reserve(cold_s, warm_s, sizes["min_eval_reserve_s"],
                                   eval_reserve_default)
            dl = deadlines(budget_s, reserve, sizes["save_reserve_s"], sizes["exit_margin_s"])
            plan = plan_steps(now_s=now_s(), dl=dl, steps_per_s=cal["steps_per_s"],
                              setup_s=cal["setup_s"], compile_s=cal["compile_s"],
                              safety=args.safety)
            plan.update(eval_reserve_s=reserve, eval_cold_s=cold_s,
                        created=time.strftime("%Y-%m-%d %H:%M:%S"))
            os.makedirs(workdir, exist_ok=True)
            with open(plan_path, "w") as f:
                json.dump(jsonable(plan), f, indent=2)
        else:
            plan = dict(stored, resumed=True)
            # A new process compiles the evaluation again (unless --cache_root kept
            # XLA's cache): keep room for the cold evaluation measured before.
            reserve = eval_reserve(plan.get("eval_cold_s"), None, sizes["min_eval_reserve_s"],
                                   eval_reserve_default)
            dl = deadlines(budget_s, reserve, sizes["save_reserve_s"], sizes["exit_margin_s"])
            print(f"[resume] keeping the stored plan: total_steps {plan['total_steps']}",
                  flush=True)
        plan.update(train_stop_s=dl.train_stop, eval_stop_s=dl.eval_stop)
        res["plan"] = plan
        res["budget"].update(train_stop_s=dl.train_stop, eval_stop_s=dl.eval_stop)
        print(f"[plan] total_steps {plan['total_steps']} (warm-up {plan['warmup_steps']}), "
              f"training stops by {dl.train_stop:.0f} s, evaluation by {dl.eval_stop:.0f} s "
              f"of {budget_s:.0f} s", flush=True)
        out.write()

        # 5. the run
        config = train_config(args, sizes, workers, plan["total_steps"])
        probe = Probe(deadline=lambda: now_s() >= dl.train_stop)
        stop_timer = threading.Timer(max(0.0, dl.train_stop - now_s()), probe.signal_stop)
        stop_timer.daemon = True
        stop_timer.start()
        interrupted = None
        t_run = time.perf_counter()
        with instrumented(probe):
            try:
                result = loop.train_and_evaluate(config, workdir)
                step = result.step
            except TrainingInterrupted as e:
                interrupted, step = str(e), e.step
        stop_timer.cancel()
        t_end = time.perf_counter()
        hist = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                if r.get("split") == "train"]
        trained = probe.calls
        steady = (t_end - probe.t_second_call) if probe.t_second_call else None
        thr = throughput(*logged_rate(hist, int(step) - trained), batch, q)
        res["training"] = {
            "steps_done": int(step), "start_step": int(step) - trained,
            "total_steps": config.total_steps, "warmup_steps": config.lr.warmup_steps,
            "steps_this_run": trained, "wall_s": t_end - t_run, "setup_s": probe.setup_s,
            "compile_s": probe.compile_s, "steps_per_s": thr["steps_per_s"],
            "samples_per_s": thr["samples_per_s"], "queries_per_s": thr["queries_per_s"],
            "throughput_note": "the loop's own per-window rates (metrics.jsonl steps_per_sec,"
                               " the compiling first step left out) over this run's steps",
            "wall_steps_per_s": (trained - 1) / steady if steady else None,
            "logged_steps_per_s": [r.get("steps_per_sec") for r in hist],
            "final_loss": hist[-1]["loss"] if hist else None,
            "loss_curve": [{k: r.get(k) for k in ("step", "loss", "lr", "steps_per_sec")}
                           for r in hist],
            "interrupted": interrupted, "reached_total_steps": step == config.total_steps}
        res["input_pipeline"].update(probe.pipeline_figures(steady))
        po = res["input_pipeline"].get("pipeline_only")
        if po and thr["steps_per_s"] == thr["steps_per_s"] and thr["steps_per_s"] > 0:
            po["headroom"] = po["batches_per_s"] / thr["steps_per_s"]
        print(f"[train] {trained} steps to step {step}/{config.total_steps} at "
              f"{_f(thr['steps_per_s'], '.2f')} steps/s ({_f(thr['samples_per_s'], '.0f')} "
              f"samples/s), final loss {_f(res['training']['final_loss'], '.4f')}"
              + (f"; {interrupted}" if interrupted else ""), flush=True)
        out.write()

        # 6. the final evaluation
        t = time.perf_counter()
        msit = predictors.load_msit(workdir)
        final = evaluate(msit, eval_sets, sizes, lambda: now_s() > dl.eval_stop)
        msit_s = time.perf_counter() - t
        if bicubic is None:
            bicubic = evaluate(predictors.BicubicPredictor(), eval_sets, sizes,
                               lambda: now_s() > dl.eval_stop)
        res["eval"] = {"protocol": "benchmark: PSNR on Y (BT.601), shave = scale, LR by "
                                   "Pillow bicubic ('auto': Set14 reads LR_bicubic files "
                                   "when present)",
                       "max_images": sizes["eval_max_images"],
                       "max_side": sizes["eval_max_side"], "seconds": time.perf_counter() - t,
                       "msit_seconds": msit_s, "checkpoint": workdir,
                       "msit": final, "bicubic": bicubic}
        status = "completed" if not interrupted and not aborted(final) else "partial"
        code = EXIT_OK if status == "completed" else EXIT_PARTIAL
        res["budget"]["margin_left_s"] = budget_s - now_s()
        out.write(status, code)
        print_summary(res)
        print(f"figures: {args.json}")
        return code
    except SystemExit as e:
        res["errors"].append(str(e))
        out.write("error", EXIT_ERROR)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BaseException as e:  # noqa: BLE001 - the JSON must say what happened
        traceback.print_exc()
        res["errors"].append(f"{type(e).__name__}: {e}")
        out.write("error", EXIT_ERROR)
        return EXIT_ERROR
    finally:
        if hard_timer is not None:
            hard_timer.cancel()


def aborted(results: Optional[dict]) -> bool:
    """Whether an `evaluate` result was cut short."""
    return bool(results) and any(v.get("aborted") for sets in results.values()
                                 for v in sets.values())


def pixel_ratio(eval_sets, sizes: dict) -> float:
    """HR pixels scored in all the sets / in the first (what a warm evaluation of the
    first set is scaled by)."""
    def pixels(es) -> float:
        n = len(es) if not sizes["eval_max_images"] else min(len(es), sizes["eval_max_images"])
        side = sizes["eval_max_side"]
        return float(sum(min(h, side or h) * min(w, side or w)
                         for h, w in es.source.sizes[:n]))

    return sum(pixels(es) for es in eval_sets) / max(pixels(eval_sets[0]), 1.0)


def logged_rate(hist: list[dict], start_step: int) -> tuple[int, float]:
    """(steps, seconds) of this run from the loop's metrics.jsonl windows: each record's
    steps since the previous one at its steps_per_sec (the first window of a run holds
    the compiling step, which the loop leaves out of its rate)."""
    steps, seconds, prev, first = 0, 0.0, start_step, True
    for r in hist:
        if r.get("step", 0) <= start_step:
            continue
        n = r["step"] - prev - (1 if first else 0)
        prev, first = r["step"], False
        sps = r.get("steps_per_sec")
        if n > 0 and isinstance(sps, (int, float)) and sps > 0:
            steps += n
            seconds += n / sps
    return steps, seconds


def pipeline_only(config, seconds: float, check_cache: Optional[str] = None) -> dict:
    """Batches/s of the loop's input pipeline alone (same source, protocol, workers,
    threads, buffers and device transfer), after its first batch."""
    import jax

    from msit_jax.data.pipeline import train_dataset
    from msit_jax.data.protocol import Protocol
    from msit_jax.data.sources import make_source
    from msit_jax.training.step import batch_sharding, make_mesh

    d = config.data
    source = make_source(d.train, min_side=d.inp_size, check_cache=check_cache)
    protocol = Protocol(d.inp_size, d.sample_q, d.scale_min, d.scale_max, d.augment,
                        radius=config.model.radius)
    ds = train_dataset(source, protocol, global_batch=config.batch_size, seed=config.seed + 1,
                       total_steps=100_000, sharding=batch_sharding(make_mesh()),
                       repeat=d.repeat, num_workers=d.num_workers, num_threads=d.num_threads,
                       buffer_size=d.buffer_size, device_buffer=d.device_buffer)
    it = iter(ds)
    t0 = time.perf_counter()
    jax.block_until_ready(next(it))
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        jax.block_until_ready(next(it))
        n += 1
    dt = time.perf_counter() - t1
    close = getattr(it, "close", None)
    if close:
        close()
    return {"method": "a separate timed pass of msit_jax.data.pipeline.train_dataset at the "
                      "training settings (seed + 1), device transfer included",
            "first_batch_s": first, "batches": n, "seconds": dt,
            "batches_per_s": n / dt if dt > 0 else float("nan"),
            "samples_per_s": n * config.batch_size / dt if dt > 0 else float("nan")}


def _f(v: Any, fmt: str = ".1f") -> str:
    """A figure for the summary ('-' when missing or not a number)."""
    return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"


def print_summary(res: dict) -> None:
    m, t, ip = res["meta"], res["training"], res["input_pipeline"]
    print(f"\ndevice {m['device_kind']} ({m['platform']}), jax {m['jax_version']}, "
          f"{m['usable_cpus']} CPUs, {res['data']['num_workers']} grain workers")
    print(f"trained {t['steps_this_run']} steps (to {t['steps_done']} of {t['total_steps']}), "
          f"compile {_f(t['compile_s'])} s, {_f(t['steps_per_s'], '.2f')} steps/s, "
          f"{_f(t['samples_per_s'], '.0f')} samples/s, {_f(t['queries_per_s'], '.3g')} "
          f"queries/s, final loss {_f(t['final_loss'], '.4f')}")
    frac = ip.get("data_wait_fraction")
    po = ip.get("pipeline_only") or {}
    print(f"input: waited {ip.get('data_wait_s', 0):.1f} s on data"
          + (f" ({100 * frac:.1f}% of the run)" if frac is not None else "")
          + f", stalls {ip.get('stall_s_min', 0):.1f}-{ip.get('stall_s_max', 0):.1f} s"
          + (f"; pipeline alone {_f(po.get('batches_per_s'))} batches/s "
             f"(headroom x{_f(po.get('headroom'))})" if po else ""))
    ev = res["eval"]
    print("| set | scale | MSIT | bicubic |\n|---|---|---:|---:|")
    for name, scales in ev.get("msit", {}).items():
        for key, r in scales.items():
            b = (ev.get("bicubic") or {}).get(name, {}).get(key, {})
            print(f"| {name} | {key} | {_f(r.get('psnr'), '.2f')} | "
                  f"{_f(b.get('psnr'), '.2f')} |")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_on_device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=7.0,
                   help="wall-clock budget of the whole command, compile and evaluation "
                        "included")
    p.add_argument("--data", default="291", help="training data: a folder or named sets "
                                                 "('291', 't91+bsd200', 'div2k')")
    p.add_argument("--data_root", default="", help="where named sets are looked up ('': "
                                                   "$MSIT_DATA, else ./data)")
    p.add_argument("--eval_data", default=None,
                   help="data root holding Set5/ and Set14/ (default: --data_root)")
    p.add_argument("--workdir", default="runs/train_on_device")
    p.add_argument("--json", default="train_on_device.json")
    p.add_argument("--cache_root", default=None,
                   help="decode (.npy), XLA compilation and autotune caches (default: "
                        "WORKDIR/cache)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default 32; tiny 4)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="grain workers (default: from the usable CPUs, choose_workers)")
    p.add_argument("--calibration_s", type=float, default=None,
                   help="seconds of calibration steps after compiling (default 20; tiny 3)")
    p.add_argument("--pipeline_check_s", type=float, default=None,
                   help="seconds of the pipeline-only pass (0: skip; default 8; tiny 2)")
    p.add_argument("--skip_calibration_eval", action="store_true",
                   help="no cold evaluation during calibration (the final one compiles, and "
                        "is given a fixed reserve)")
    p.add_argument("--safety", type=float, default=0.95,
                   help="fraction of the measured speed the plan counts on")
    p.add_argument("--allow_cpu", action="store_true", help="run on a CPU-only JAX")
    p.add_argument("--tiny", action="store_true",
                   help="tiny model and sizes, cropped evaluation (CPU smoke test)")
    p.add_argument("--pack", metavar="OUT_DIR", default=None,
                   help="write the training sets of --data (from --data_root) as JPEG into "
                        "OUT_DIR/T91, OUT_DIR/BSD200, copy Set5/Set14 from --eval_data, and "
                        "exit")
    p.add_argument("--pack_format", choices=("jpeg", "webp"), default="jpeg")
    p.add_argument("--pack_quality", type=int, default=PACK_QUALITY)
    args = p.parse_args(argv)
    if args.eval_data is None:
        args.eval_data = args.data_root or None
    if args.pack:
        pack(args.pack, args.data, args.data_root, args.eval_data, args.pack_format,
             args.pack_quality)
        return EXIT_OK
    if args.cache_root is None:
        args.cache_root = os.path.join(os.path.abspath(args.workdir), "cache")
    if args.minutes <= 0:
        p.error("--minutes must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
