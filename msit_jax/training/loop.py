"""The training loop: `train_and_evaluate(config, workdir)`.

Resumes automatically: if WORKDIR/checkpoints holds a checkpoint, the train
state (params, frozen kernels, BatchNorm statistics, Adam state, step) and the
data iterator state are restored and training continues from there; the run
ends bit-identical to an uninterrupted one on the same device count (batches
are a function of (seed, step); the jitted step is deterministic).
Otherwise the model starts from `config.init_from` (cumulative stage 2) or a
fresh init.

Nothing lost, nothing silent:
  * the config is validated, and compared with the stored one on resume,
    before anything is written (`run_config`);
  * every checkpoint is verified on restore; a bad one is reported in one line
    and the newest good step is used (`checkpoints`);
  * a step with a non-finite loss, gradient or weight stops the run with one
    line naming the step, the quantity and the last good checkpoint, and is
    never saved (or, with `skip_nonfinite_steps`, is skipped);
  * one trainer per workdir: the run holds `WORKDIR/.lock` (`training.lock`);
    a second one fails at once with `WorkdirBusy`, having written nothing;
  * unreadable metrics or config records are set aside, never an error
    (`metrics`, `run_config`);
  * SIGTERM / SIGINT save a checkpoint at the current step and stop
    (`TrainingInterrupted`), within `preemption_grace_s`; handlers are installed
    from the lock to the end of the demo (set-up, compilation, validation, demo)
    and restored afterwards;
  * multi-process: a peer that dies or hangs makes the others exit within
    `distributed.heartbeat_timeout_s` (`training.peers`, `PeerLost`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from msit_jax.data.lean import step_input
from msit_jax.data.pipeline import train_dataset
from msit_jax.data.protocol import Protocol
from msit_jax.data.sources import (ImageSource, check_disjoint, check_not_benchmark,
                                   make_source)
from msit_jax.errors import (ConfigError, NonFiniteError, PeerLost, TrainingInterrupted,
                             one_line)
from msit_jax.eval import predictors, reports
from msit_jax.eval import runner as evaluation  # the one evaluation path (EvaluationAborted)
from msit_jax.eval.datasets import EvalSet
from msit_jax.eval.protocol import ScoringPreset, center_crop
from msit_jax.models.model import build_model, dummy_inputs
from msit_jax.models.reparam import count_params
from msit_jax.ops.runtime import RuntimeOptions
from msit_jax.training import peers, run_config
from msit_jax.training.checkpoints import Checkpointer, saved_steps
from msit_jax.training.config import fit_warmup, validate_config
from msit_jax.training.lock import WorkdirLock
from msit_jax.training.metrics import MetricLogger, finite_or_none
from msit_jax.training.progress import RateWindow, StepTracker
from msit_jax.training.stage2 import init_from
from msit_jax.training.state import TrainState, create_state, init_variables, make_optimizer
from msit_jax.training.step import (batch_sharding, describe_nonfinite, jit_train_step,
                                    make_mesh, replicated, to_host)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int                      # the last step trained
    state: dict                    # host numpy TrainState fields (params, frozen, ...)
    val: Optional[dict] = None     # the last validation metrics
    demo: Optional[dict] = None    # {scale: {'msit', 'bicubic'}} of the end-of-run demo
    demo_png: Optional[str] = None


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> bool:
    """jax.distributed.initialize when configured (before any other JAX call); whether
    it was.

    Bounded waits: joining gives up after `initialization_timeout_s`; once joined, a
    process that shows no sign of life for `heartbeat_timeout_s` makes the others
    exit (`msit_jax.training.peers`; jax's own, aborting heartbeat check is set to
    fire later).
    """
    if not cfg.get("enabled", False):
        return False
    kw: dict[str, Any] = {}
    if cfg.get("coordinator_address"):
        kw["coordinator_address"] = cfg.coordinator_address
    if cfg.get("num_processes"):
        kw["num_processes"] = int(cfg.num_processes)
    if cfg.get("process_id", -1) >= 0:
        kw["process_id"] = int(cfg.process_id)
    kw["heartbeat_timeout_seconds"] = peers.jax_heartbeat_timeout(
        cfg.get("heartbeat_timeout_s", 100))
    kw["initialization_timeout"] = int(cfg.get("initialization_timeout_s", 300))
    jax.distributed.initialize(**kw)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


# What a collective says when a peer process is gone (gloo over TCP, the coordination
# service, NCCL / ICI transports).
_PEER_LOST = re.compile(r"connection reset|connection refused|closed by peer|broken pipe|"
                        r"heartbeat|coordination service|barrier|unavailable|"
                        r"deadline_exceeded|socket closed|end of file", re.IGNORECASE)


def peer_lost(exc: BaseException) -> Optional[PeerLost]:
    """A PeerLost for a collective that failed because another process is gone (None
    for anything else, or in a single-process run)."""
    if jax.process_count() == 1 or not isinstance(exc, jax.errors.JaxRuntimeError):
        return None
    msg = str(exc)
    if not _PEER_LOST.search(msg):
        return None
    return PeerLost(f"another process of this run died or stopped answering "
                    f"({one_line(msg, 300)}); process {jax.process_index()} of "
                    f"{jax.process_count()} stopped: restart every process to resume from "
                    "the latest checkpoint")


def prepare_workdir(workdir: str) -> str:
    """Absolute workdir, created with its parents if missing (documented behaviour)."""
    if not workdir:
        raise ValueError("--workdir is required")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"workdir {workdir} exists and is not a directory")
    os.makedirs(workdir, exist_ok=True)
    return workdir


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the field for settings that cannot work (before any file
    is touched): `validate_config`, plus the device count."""
    validate_config(config)
    n = jax.device_count()
    if config.batch_size % n:
        raise ConfigError(f"invalid config: batch_size={config.batch_size} must be a multiple "
                          f"of the {n} devices (data parallel)")


def validation_preset(ecfg: ml_collections.ConfigDict) -> ScoringPreset:
    """The scoring of `config.eval`: PSNR on RGB (or Y with y_channel), shave = ceil(s) +
    shave_extra (benchmarks: 0; DIV2K: 6), float predictions."""
    return ScoringPreset("validation", y_channel=bool(ecfg.y_channel),
                         extra_shave=int(ecfg.shave_extra), quantize=False)


def _validation_scores(predictor, source: ImageSource, scales, ecfg: ml_collections.ConfigDict,
                       should_stop: Optional[Callable[[], bool]] = None) -> dict[float, float]:
    """Mean PSNR per scale through the evaluation runner (evaluate.py's protocol: LR made
    on the fly with Pillow bicubic), on central max_side crops of the first max_images
    images; errors propagate (strict)."""
    res = evaluation.evaluate(predictor, EvalSet("validation", source), scales,
                              validation_preset(ecfg), lr_source="downsample",
                              max_images=ecfg.max_images, max_side=ecfg.max_side,
                              with_ssim=False, strict=True, should_stop=should_stop)
    return {s: r.psnr for s, r in res.items()}


def validation_metrics(model_cfg, variables: dict, source: ImageSource,
                       ecfg: ml_collections.ConfigDict,
                       runtime: Optional[RuntimeOptions] = None,
                       should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """{'psnr_x2': dB, ..., 'val_psnr': mean over scales} on the validation source.

    A non-finite model output gives a NaN PSNR (the checkpoint is then saved
    without a best-metric value) rather than stopping the run.
    """
    msit = predictors.MSITPredictor(model_cfg, variables, chunk=ecfg.chunk or None,
                                    method=ecfg.method, runtime=runtime, check_finite=False)
    scores = _validation_scores(msit, source, ecfg.scales, ecfg, should_stop)
    out = {f"psnr_x{s:g}": p for s, p in scores.items()}
    out["val_psnr"] = float(np.mean(list(out.values())))
    return out


def _broadcast_metrics(metrics: Optional[dict], keys: list[str]) -> dict:
    """Process 0's metrics on every process (all must agree for checkpoint retention)."""
    if jax.process_count() == 1:
        return metrics
    from jax.experimental import multihost_utils

    vec = np.asarray([metrics[k] for k in keys] if metrics else np.zeros(len(keys)), np.float64)
    vec = multihost_utils.broadcast_one_to_all(vec)
    return dict(zip(keys, map(float, vec)))


def _any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _host_variables(state: TrainState) -> dict:
    return to_host(state.variables())


def run_demo(config, model_cfg, variables: dict, source: ImageSource, workdir: str,
             runtime: RuntimeOptions, should_stop: Optional[Callable[[], bool]] = None
             ) -> tuple[dict, str]:
    """The end-of-run table (MSIT vs bicubic) and side-by-side PNG; prints the table.
    should_stop: checked between images (`evaluation.EvaluationAborted` when it says so)."""
    e, d = config.eval, config.demo
    msit = predictors.MSITPredictor(model_cfg, variables, chunk=e.chunk or None,
                                    method=e.method, runtime=runtime, check_finite=False)
    bicubic = predictors.BicubicPredictor()
    ours = _validation_scores(msit, source, d.scales, e, should_stop)
    base = _validation_scores(bicubic, source, d.scales, e, should_stop)
    res = {s: {"msit": ours[s], "bicubic": base[s]} for s in ours}
    names = ", ".join(source.name(i) for i in range(len(source) if not e.max_images
                                                    else min(e.max_images, len(source))))
    crops = f" (central crops of at most {e.max_side} x {e.max_side})" if e.max_side else ""
    print("\n" + reports.demo_table(
        res, f"PSNR ({'Y' if e.y_channel else 'RGB'}, shave = scale"
        f"{' + %d' % e.shave_extra if e.shave_extra else ''}) on held-out {names}{crops}"),
        flush=True)
    png = os.path.join(workdir, f"demo_x{d.png_scale:g}.png")
    reports.side_by_side(msit, bicubic, center_crop(source[0], e.max_side), d.png_scale, png,
                         window=d.window)
    print(f"side-by-side (LR nearest | bicubic | MSIT | HR) written to {png}", flush=True)
    return res, png


class StopSignals:
    """SIGTERM and SIGINT, while installed, request a stop instead of killing the run.

    The loop polls `signum` between steps (and validation between images),
    saves a checkpoint and raises TrainingInterrupted. A second signal, or a
    stop that takes longer than `grace_s` seconds, exits the process at once
    with status 128 + signal (the latest complete checkpoint stays; Orbax never
    leaves a partial one). Handlers are installed only from the main thread and
    restored on exit.

    The grace period runs from the signal's arrival: Python runs a handler only
    between bytecodes of the main thread, not while an XLA compilation (or any
    long native call) is under way, so the C-level handler also writes the
    signal number to a pipe (`signal.set_wakeup_fd`) that a thread reads.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float):
        self.grace_s = float(grace_s)
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._timer: Optional[threading.Timer] = None
        self._lock = threading.Lock()
        self._arrivals, self._closed = 0, False
        self._wakeup: Optional[tuple[int, int]] = None  # (write end, previous wakeup fd)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._watch_arrivals()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._wakeup is not None:
            w, previous = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(previous)
            os.close(w)  # the reader sees the end of the pipe and closes its end
        with self._lock:  # no grace period may start (or run) once uninstalled
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()

    def _watch_arrivals(self) -> None:
        try:
            r, w = os.pipe()
        except OSError:
            return
        try:
            os.set_blocking(w, False)
            previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):  # not available here: the handler alone then
            os.close(r)
            os.close(w)
            return
        self._wakeup = (w, previous)
        threading.Thread(target=self._read_arrivals, args=(r,), daemon=True,
                         name="msit-stop-signals").start()

    def _read_arrivals(self, r: int) -> None:
        try:
            while True:
                data = os.read(r, 64)
                if not data:
                    return
                for signum in data:
                    if signum in self.SIGNALS:
                        self._arrived(signum)
        except OSError:
            return
        finally:
            os.close(r)

    def _handle(self, signum: int, frame) -> None:
        # Only set state here: the loop does the logging and saving.
        if self.signum is None:
            self.signum = signum
        if self._wakeup is None:  # else the reader thread counted this arrival
            self._arrived(signum)

    def _arrived(self, signum: int) -> None:
        """A signal arrived: the first starts the grace period, a second exits."""
        with self._lock:
            if self._closed:
                return
            self._arrivals += 1
            if self._arrivals == 1:
                self._timer = threading.Timer(self.grace_s, self._expire, args=(signum,))
                self._timer.daemon = True
                self._timer.start()
                return
        os.write(2, f"\n{signal.Signals(signum).name} again: exiting now without saving "
                    "(the latest complete checkpoint is kept)\n".encode())
        os._exit(128 + signum)

    def _expire(self, signum: int) -> None:
        os.write(2, f"\nerror: the run did not stop within preemption_grace_s="
                    f"{self.grace_s:g} s of {signal.Signals(signum).name}: exiting without "
                    "saving (the latest complete checkpoint is kept)\n".encode())
        os._exit(128 + signum)

    def requested(self) -> bool:
        return self.signum is not None


class NonFiniteGuard:
    """Reads each step's `nonfinite` flags as they become ready (without stalling the
    device queue) and acts on the first non-finite step: raise NonFiniteError, or
    with max_skips > 0 log and count the skipped step (the step itself already kept
    the previous values), raising after max_skips in a row."""

    def __init__(self, max_skips: int, last_good: Callable[[], str], lr_base: float):
        self.max_skips = int(max_skips)
        self.last_good, self.lr_base = last_good, lr_base
        self.pending: collections.deque = collections.deque()
        self.skipped: set[int] = set()
        self.in_a_row = 0

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def poll(self, block: bool = False) -> None:
        """Check the finished steps (all of them, waiting, with block=True)."""
        while self.pending:
            step, m = self.pending[0]
            flag = m["nonfinite"]
            if not block and hasattr(flag, "is_ready") and not flag.is_ready():
                return
            self.pending.popleft()
            code = int(to_host(flag))
            if code == 0:
                self.in_a_row = 0
                continue
            self._bad(step, code, m)

    def _bad(self, step: int, code: int, m: dict) -> None:
        host = to_host({k: m[k] for k in ("loss", "grad_norm")})
        what = (f"non-finite {describe_nonfinite(code)} (loss {float(host['loss']):.4g}, "
                f"gradient norm {float(host['grad_norm']):.4g})")
        if self.max_skips == 0:
            raise NonFiniteError(
                f"step {step}: {what}; training stopped and nothing non-finite was saved. Last "
                f"good checkpoint: {self.last_good()}. Lower lr.base (now {self.lr_base:g}) or "
                "set skip_nonfinite_steps to skip such steps")
        self.in_a_row += 1
        self.skipped.add(step)
        if self.in_a_row > self.max_skips:
            raise NonFiniteError(
                f"step {step}: {what}, {self.in_a_row} non-finite steps in a row (more than "
                f"skip_nonfinite_steps={self.max_skips}); training stopped. Last good "
                f"checkpoint: {self.last_good()}")
        log.warning("step %d: %s; step skipped (no update), %d in a row", step, what,
                    self.in_a_row)


def jit_create_state(tx: optax.GradientTransformation, mesh: Mesh
                     ) -> Callable[[dict], TrainState]:
    """variables -> a step-0 TrainState replicated over `mesh`, jitted (the Adam
    state is built on the devices, not on the host)."""
    return jax.jit(lambda v: create_state(v, tx), out_shardings=replicated(mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: Optional[int] = None) -> TrainResult:
    """Train (or resume) per `config` in `workdir`; see `msit_jax.training.config`.

    stop_after_step: leave the loop after that step without a final save, as a
    killed run would (tests of resume).

    Raises ConfigError (invalid config, refused change on resume), InputError
    (data), CheckpointError (no usable checkpoint), NonFiniteError (divergence),
    OutputError (a checkpoint could not be written) and TrainingInterrupted
    (SIGTERM/SIGINT, after saving); see `msit_jax.errors`.
    """
    maybe_initialize_distributed(config.distributed)
    watchdog = None
    if jax.process_count() > 1:
        try:
            watchdog = peers.PeerWatchdog(
                jax.process_index(), jax.process_count(),
                config.distributed.get("heartbeat_timeout_s", 100)).start()
        except Exception as e:  # noqa: BLE001 - jax's client not where expected (a new jax)
            log.warning("no peer watchdog (%s): a dead process is noticed by jax alone, "
                        "after its heartbeat timeout", one_line(str(e), 200))
    ok, why = False, ""
    try:
        config, clipped = fit_warmup(config)  # a short run: a copy with the warm-up clipped
        if clipped:
            log.warning(clipped)
        check_config(config)  # before the workdir is touched
        workdir = prepare_workdir(workdir)
        # One trainer per workdir (WorkdirBusy before anything is read or written), and
        # SIGTERM / SIGINT handled from here to the end of the demo.
        lock = WorkdirLock(workdir, jax.process_index()).acquire()
        try:
            with StopSignals(config.get("preemption_grace_s", 25.0)) as stop:
                result = _train(config, workdir, stop, stop_after_step)
        except jax.errors.JaxRuntimeError as e:
            lost = peer_lost(e)
            if lost is None:
                raise
            raise lost from e
        finally:
            lock.release()
        ok = True
        return result
    except TrainingInterrupted:  # every process stops at the same step
        ok = True
        raise
    except BaseException as e:
        why = f"{type(e).__name__}: {one_line(str(e), 200)}"
        raise
    finally:
        if watchdog is not None:
            watchdog.finish(ok, why)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: "StopSignals",
           stop_after_step: Optional[int]) -> TrainResult:
    """`train_and_evaluate` in a locked workdir, with the stop signals installed."""
    is_main = jax.process_index() == 0
    resuming = bool(saved_steps(workdir))
    changes = run_config.check_resume(workdir, config, resuming)  # before anything is written
    if not resuming and config.init_from and not os.path.exists(config.init_from):
        raise ConfigError(f"invalid config: init_from={config.init_from!r}: no such file or "
                          "directory")

    model_cfg = config.model
    runtime = RuntimeOptions.from_config(config.runtime)
    model = build_model(model_cfg, runtime)
    d = config.data
    protocol = Protocol(d.inp_size, d.sample_q, d.scale_min, d.scale_max, d.augment,
                        radius=model_cfg.radius)
    check_cache = os.path.join(workdir, "checked_images.json")
    train_source = make_source(d.train, min_side=d.inp_size, check_cache=check_cache)
    need_eval = config.eval.every_steps > 0 or config.demo.enabled
    check_not_benchmark(train_source)
    eval_source = make_source(config.eval.source, check_cache=check_cache) if need_eval else None
    if eval_source is not None:
        check_disjoint(train_source, eval_source)
    log.info("training on %d images (%s), %d devices, %d processes", len(train_source),
             d.train.kind, jax.device_count(), jax.process_count())

    mesh = make_mesh()
    rep = replicated(mesh)
    tx, schedule = make_optimizer(config)
    to_state = jit_create_state(tx, mesh)

    ckpt = Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.keep_best,
                        config.checkpoint.async_save)
    rng = jax.random.PRNGKey(config.seed)
    inputs = dummy_inputs(model_cfg, (d.inp_size, d.inp_size), d.sample_q)
    data_state = None
    abstract_vars = jax.eval_shape(model.init, rng, *inputs)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
        jax.eval_shape(lambda v: create_state(v, tx), abstract_vars))
    restored = ckpt.restore_latest(abstract)  # verified; falls back past bad steps
    if restored is not None:
        start, state, data_state = restored
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        variables = to_host(init_variables(model, rng, inputs))
        if config.init_from:
            variables = init_from(config.init_from, model_cfg, variables)
            log.info("initialised from %s", config.init_from)
        elif model_cfg.conv == "rim":
            log.warning("training a RIM model from scratch: its frozen base kernels W keep "
                        "their random init. Cumulative training sets --config.init_from to "
                        "the stage-1 run")
        state = to_state(variables)
        start = 0
    run_config.record(workdir, config, start, changes, fresh=restored is None)
    if restored is not None and is_main:  # said once the resumed step is known
        note = run_config.schedule_change(config, changes, start)
        if note:
            log.warning(note)
    log.info("model: %d trainable parameters, %d frozen", count_params(state.params),
             count_params(state.frozen))

    ds = train_dataset(train_source, protocol, global_batch=config.batch_size, seed=config.seed,
                       total_steps=config.total_steps, sharding=batch_sharding(mesh),
                       repeat=d.repeat, num_workers=d.num_workers, num_threads=d.num_threads,
                       buffer_size=d.buffer_size, device_buffer=d.device_buffer)
    data_it = iter(ds)
    if data_state is not None:
        data_it.set_state(data_state)

    max_skips = int(config.get("skip_nonfinite_steps", 0))
    step_fn = jit_train_step(model, tx, schedule, mesh, skip_nonfinite=max_skips > 0,
                             seed=config.seed)
    logger = MetricLogger(workdir, resume_step=start, enabled=is_main,
                          tensorboard=config.tensorboard)
    guard = NonFiniteGuard(max_skips, lambda: ckpt.describe_step(ckpt.last_good_step()),
                           config.lr.base)
    pixels_per_step = config.batch_size * d.sample_q
    epoch_len = len(train_source) * d.repeat
    result = TrainResult(step=start, state={})

    from tqdm.auto import tqdm

    bar = tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
               disable=not (is_main and config.progress_bar), dynamic_ncols=True)
    # The bar and the logged rate count completed steps (see training/progress.py).
    tracker = StepTracker(start, bar.update)
    rates = RateWindow(start, time.perf_counter())
    step, window, t0 = start, [], time.perf_counter()
    data_state = data_it.get_state()
    single = jax.process_count() == 1
    # Multi-host: processes must stop at the same step, so they agree on a stop request
    # at each log point (a host sync there already) instead of every step. A signal
    # during the set-up (restore, compilation of the init) stops before the first step.
    stopping = single and stop.requested()
    try:
        while step < config.total_steps and not stopping:
            try:
                batch = next(data_it)
            except Exception:
                if stop.requested():  # workers signalled with us: stop, don't fail
                    stopping = True
                    break
                raise
            if step == start:
                got = int(to_host(batch["step"])[0])
                if got != step:
                    raise RuntimeError(f"data iterator is at step {got}, train state at "
                                       f"{step}: the checkpoint's data state does not match")
            # The pipeline's flat dict becomes the step's typed batch here, once (lean:
            # expanded into the Batch inside the jitted step).
            state, metrics = step_fn(state, step_input(batch))
            step += 1
            data_state = data_it.get_state()  # the stream position matching `state`
            guard.add(step, metrics)
            guard.poll()  # the steps finished so far; never waits
            tracker.add(step, metrics["loss"])  # waits only past MAX_INFLIGHT_STEPS
            window.append((step, metrics))
            if step == start + 1:  # the first step includes compilation: time it apart
                tracker.drain()
                log.info("first step (with compilation) took %.1f s", tracker.done_at - t0)
                rates.start(step, tracker.done_at)
            if step % config.log_every_steps == 0 or step == config.total_steps:
                guard.poll(block=True)
                tracker.drain()  # at most MAX_INFLIGHT_STEPS to wait for
                host = jax.device_get([m for _, m in window])
                rate = rates.rate(tracker.completed, tracker.done_at)
                ok = [m for (s, _), m in zip(window, host) if s not in guard.skipped]
                rec = dict(loss=np.mean([m["loss"] for m in ok]) if ok else float("nan"),
                           lr=host[-1]["lr"],
                           grad_norm=(np.mean([m["grad_norm"] for m in ok]) if ok
                                      else float("nan")),
                           epoch=step * config.batch_size / epoch_len)
                if len(ok) < len(host):
                    rec["skipped_steps"] = len(host) - len(ok)
                if rate is not None:  # a window of only the compiling first step has none
                    rec.update(steps_per_sec=rate, pixels_per_sec=rate * pixels_per_step)
                logger.write(step, "train", rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                sps=f"{rec.get('steps_per_sec', 0):.2f}")
                # The next window opens where this one's steps finished: the time spent
                # logging counts, as it does on the wall clock and the bar.
                window = []
                rates.start(tracker.completed, tracker.done_at)
                if not single:
                    stopping = _any_process(stop.requested())
            if single:
                stopping = stop.requested()
            val = None
            if config.eval.every_steps and (step % config.eval.every_steps == 0
                                            or step == config.total_steps):
                guard.poll(block=True)  # never validate (or save) non-finite weights
                keys = [f"psnr_x{s:g}" for s in config.eval.scales] + ["val_psnr"]
                try:
                    val = validation_metrics(
                        model_cfg, _host_variables(state), eval_source, config.eval,
                        runtime, should_stop=stop.requested if single else None
                    ) if is_main else None
                except evaluation.EvaluationAborted:  # SIGTERM: save below, unvalidated
                    stopping = True
                    break
                val = _broadcast_metrics(val, keys)
                logger.write(step, "val", val)
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}"
                                                       for k, v in val.items()))
                result.val = val
                tracker.drain()
                rates.start(step, time.perf_counter())  # keep validation out of the rate
            if (step % config.checkpoint.every_steps == 0 or step == config.total_steps
                    or val is not None):
                guard.poll(block=True)
                best = finite_or_none(val["val_psnr"]) if val else None
                ckpt.save(step, state, data_state,
                          metrics={"val_psnr": best} if best is not None else None)
            if stop_after_step is not None and step >= stop_after_step:
                break
        tracker.drain()
        if stopping:
            _save_on_signal(stop.signum or signal.SIGTERM, step, start, state, data_state,
                            ckpt, guard)
    finally:
        bar.close()
        try:
            ckpt.wait()
        finally:
            logger.close()
            data_it.close()

    result.step = step
    result.state = to_host({"step": state.step, "params": state.params, "frozen": state.frozen,
                            "batch_stats": state.batch_stats, "opt_state": state.opt_state})
    try:
        if step == config.total_steps and config.demo.enabled and is_main:
            try:
                result.demo, result.demo_png = run_demo(
                    config, model_cfg, _host_variables(state), eval_source, workdir, runtime,
                    should_stop=stop.requested)
            except evaluation.EvaluationAborted:
                pass
            if stop.requested():  # the final checkpoint is saved: only the demo is left
                name = signal.Signals(stop.signum).name
                raise TrainingInterrupted(
                    f"interrupted by {name} during the end-of-run demo: training finished, "
                    f"latest checkpoint {ckpt.describe_step(ckpt.latest_step())}; run the "
                    "same command again to redo the demo", signum=stop.signum, step=step,
                    checkpoint=ckpt.step_dir(step))
            tmp = os.path.join(workdir, "demo.json.tmp")
            with open(tmp, "w") as f:
                json.dump({f"x{s:g}": r for s, r in result.demo.items()}, f, indent=2)
            os.replace(tmp, os.path.join(workdir, "demo.json"))
    finally:
        ckpt.close()
    return result


def _save_on_signal(signum: int, step: int, start: int, state: TrainState, data_state: dict,
                    ckpt: Checkpointer, guard: NonFiniteGuard) -> None:
    """After SIGTERM/SIGINT: checkpoint the current step (unless saved already or nothing
    was trained), wait for the write, and raise TrainingInterrupted."""
    name = signal.Signals(signum).name
    guard.poll(block=True)  # a non-finite state raises here instead of being saved
    if step > start and ckpt.latest_step() != step:
        log.warning("%s: saving a checkpoint at step %d and stopping", name, step)
        ckpt.save(step, state, data_state)
    ckpt.verify_pending()
    saved = ckpt.latest_step()
    where = ckpt.describe_step(saved)
    raise TrainingInterrupted(
        f"interrupted by {name} at step {step}: latest checkpoint {where}; run the same "
        "command again to resume", signum=signum, step=step,
        checkpoint=ckpt.step_dir(saved) if saved is not None else None)
