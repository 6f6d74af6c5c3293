"""The training loop: `train_and_evaluate(config, workdir)`.

Resumes automatically: if WORKDIR/checkpoints holds a checkpoint, the train
state (params, frozen kernels, BatchNorm statistics, Adam state, step) and the
data iterator state are restored and training continues from there; the run
ends bit-identical to an uninterrupted one on the same device count (batches
are a function of (seed, step); the jitted step is deterministic).
Otherwise the model starts from `config.init_from` (cumulative stage 2) or a
fresh init.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from msit_jax.data.pipeline import train_dataset
from msit_jax.data.protocol import Protocol
from msit_jax.data.sources import ImageSource, make_source
from msit_jax.model import build_model
from msit_jax.runtime import RuntimeOptions
from msit_jax.training import evaluate as evaluation
from msit_jax.training.checkpoints import Checkpointer, write_configs
from msit_jax.training.metrics import MetricLogger
from msit_jax.training.stage2 import init_from
from msit_jax.training.state import (TrainState, create_state, dummy_inputs, init_variables,
                                     make_optimizer, param_count)
from msit_jax.training.step import (batch_sharding, jit_train_step, make_mesh, replicated,
                                    to_host)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int                      # the last step trained
    state: dict                    # host numpy TrainState fields (params, frozen, ...)
    val: Optional[dict] = None     # the last validation metrics
    demo: Optional[dict] = None    # {scale: {'msit', 'bicubic'}} of the end-of-run demo
    demo_png: Optional[str] = None


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize when configured (before any other JAX call)."""
    if not cfg.get("enabled", False):
        return
    kw: dict[str, Any] = {}
    if cfg.get("coordinator_address"):
        kw["coordinator_address"] = cfg.coordinator_address
    if cfg.get("num_processes"):
        kw["num_processes"] = int(cfg.num_processes)
    if cfg.get("process_id", -1) >= 0:
        kw["process_id"] = int(cfg.process_id)
    jax.distributed.initialize(**kw)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())


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
    """Raise ValueError naming the field for settings that cannot work."""
    RuntimeOptions.from_config(config.get("runtime"))
    n = jax.device_count()
    if config.batch_size < 1 or config.batch_size % n:
        raise ValueError(f"batch_size={config.batch_size} must be a positive multiple of the "
                         f"{n} devices (data parallel)")
    if config.total_steps < 1:
        raise ValueError(f"total_steps={config.total_steps} must be >= 1")
    for name in ("log_every_steps",):
        if config[name] < 1:
            raise ValueError(f"{name}={config[name]} must be >= 1")
    if config.checkpoint.every_steps < 1:
        raise ValueError(f"checkpoint.every_steps={config.checkpoint.every_steps} must be >= 1")


def validation_metrics(model_cfg, variables: dict, source: ImageSource,
                       ecfg: ml_collections.ConfigDict,
                       runtime: Optional[RuntimeOptions] = None) -> dict[str, float]:
    """{'psnr_x2': dB, ..., 'val_psnr': mean over scales} on the validation source."""
    up = evaluation.Upscaler(model_cfg, variables, chunk=ecfg.chunk or None,
                             method=ecfg.method, runtime=runtime)
    res = evaluation.evaluate(up, source, ecfg.scales, max_images=ecfg.max_images,
                              max_side=ecfg.max_side, shave_extra=ecfg.shave_extra,
                              y_channel=ecfg.y_channel)
    out = {f"psnr_x{s:g}": r["msit"] for s, r in res.items()}
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


def _host_variables(state: TrainState) -> dict:
    return to_host(state.variables())


def run_demo(config, model_cfg, variables: dict, source: ImageSource, workdir: str
             ) -> tuple[dict, str]:
    """The end-of-run table (MSIT vs bicubic) and side-by-side PNG; prints the table."""
    e, d = config.eval, config.demo
    up = evaluation.Upscaler(model_cfg, variables, chunk=e.chunk or None, method=e.method,
                             runtime=RuntimeOptions.from_config(config.runtime))
    res = evaluation.evaluate(up, source, d.scales, max_images=e.max_images,
                              max_side=e.max_side, shave_extra=e.shave_extra,
                              y_channel=e.y_channel, bicubic=True)
    names = ", ".join(source.name(i) for i in range(len(source) if not e.max_images
                                                    else min(e.max_images, len(source))))
    print("\n" + evaluation.format_table(
        res, f"PSNR ({'Y' if e.y_channel else 'RGB'}, shave = scale"
        f"{' + %d' % e.shave_extra if e.shave_extra else ''}) on held-out {names}"
        f"{' (central %dx%d crops)' % (e.max_side, e.max_side) if e.max_side else ''}"),
        flush=True)
    png = os.path.join(workdir, f"demo_x{d.png_scale:g}.png")
    evaluation.side_by_side(up, evaluation.center_crop(source[0], e.max_side), d.png_scale, png,
                            window=d.window)
    print(f"side-by-side (LR nearest | bicubic | MSIT | HR) written to {png}", flush=True)
    return res, png


@functools.lru_cache(maxsize=8)
def _state_maker(tx, mesh):
    """variables -> a replicated step-0 TrainState (jitted; memoised like the step)."""
    return jax.jit(lambda v: create_state(v, tx), out_shardings=replicated(mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: Optional[int] = None) -> TrainResult:
    """Train (or resume) per `config` in `workdir`; see `msit_jax.training.config`.

    stop_after_step: leave the loop after that step without a final save, as a
    killed run would (tests of resume).
    """
    maybe_initialize_distributed(config.distributed)
    workdir = prepare_workdir(workdir)
    check_config(config)
    is_main = jax.process_index() == 0
    write_configs(workdir, config)

    model_cfg = config.model
    runtime = RuntimeOptions.from_config(config.runtime)
    model = build_model(model_cfg, runtime)
    d = config.data
    protocol = Protocol(d.inp_size, d.sample_q, d.scale_min, d.scale_max, d.augment,
                        radius=model_cfg.radius)
    train_source = make_source(d.train, min_side=d.inp_size)
    need_eval = config.eval.every_steps > 0 or config.demo.enabled
    eval_source = make_source(config.eval.source) if need_eval else None
    log.info("training on %d images (%s), %d devices, %d processes", len(train_source),
             d.train.kind, jax.device_count(), jax.process_count())

    mesh = make_mesh()
    rep = replicated(mesh)
    tx, schedule = make_optimizer(config)
    to_state = _state_maker(tx, mesh)

    ckpt = Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.keep_best,
                        config.checkpoint.async_save)
    rng = jax.random.PRNGKey(config.seed)
    inputs = dummy_inputs(model_cfg, d.inp_size, d.sample_q)
    start = ckpt.latest_step()
    data_state = None
    if start is not None:
        abstract_vars = jax.eval_shape(model.init, rng, *inputs)
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
            jax.eval_shape(lambda v: create_state(v, tx), abstract_vars))
        state, data_state = ckpt.restore(start, abstract)
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
    log.info("model: %d trainable parameters, %d frozen", param_count(state.params),
             param_count(state.frozen))

    ds = train_dataset(train_source, protocol, global_batch=config.batch_size, seed=config.seed,
                       total_steps=config.total_steps, sharding=batch_sharding(mesh),
                       repeat=d.repeat, num_workers=d.num_workers, num_threads=d.num_threads,
                       buffer_size=d.buffer_size, device_buffer=d.device_buffer)
    data_it = iter(ds)
    if data_state is not None:
        data_it.set_state(data_state)

    step_fn = jit_train_step(model, tx, schedule, mesh)
    logger = MetricLogger(workdir, resume_step=start, enabled=is_main,
                          tensorboard=config.tensorboard)
    pixels_per_step = config.batch_size * d.sample_q
    epoch_len = len(train_source) * d.repeat
    result = TrainResult(step=start, state={})

    from tqdm.auto import tqdm

    bar = tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
               disable=not (is_main and config.progress_bar), dynamic_ncols=True)
    step, window, timed, t0 = start, [], 0, time.perf_counter()
    data_state = data_it.get_state()
    try:
        while step < config.total_steps:
            batch = next(data_it)
            if step == start:
                got = int(to_host(batch["step"])[0])
                if got != step:
                    raise RuntimeError(f"data iterator is at step {got}, train state at {step}: "
                                       "the checkpoint's data state does not match")
            state, metrics = step_fn(state, batch)
            step += 1
            data_state = data_it.get_state()  # the stream position matching `state`
            bar.update(1)
            window.append(metrics)
            if step == start + 1:  # the first step includes compilation: time it apart
                jax.block_until_ready(metrics)
                log.info("first step (with compilation) took %.1f s", time.perf_counter() - t0)
                t0 = time.perf_counter()
            else:
                timed += 1
            if step % config.log_every_steps == 0 or step == config.total_steps:
                host = jax.device_get(window)  # waits for the window's steps
                dt = time.perf_counter() - t0
                rec = dict(loss=np.mean([m["loss"] for m in host]), lr=host[-1]["lr"],
                           grad_norm=np.mean([m["grad_norm"] for m in host]),
                           epoch=step * config.batch_size / epoch_len)
                if timed:  # a window of only the compiling first step has no rate
                    rec.update(steps_per_sec=timed / dt, pixels_per_sec=timed / dt * pixels_per_step)
                logger.write(step, "train", rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                sps=f"{rec.get('steps_per_sec', 0):.2f}")
                window, timed, t0 = [], 0, time.perf_counter()
            val = None
            if config.eval.every_steps and (step % config.eval.every_steps == 0
                                            or step == config.total_steps):
                keys = [f"psnr_x{s:g}" for s in config.eval.scales] + ["val_psnr"]
                val = validation_metrics(model_cfg, _host_variables(state), eval_source,
                                         config.eval, runtime) if is_main else None
                val = _broadcast_metrics(val, keys)
                logger.write(step, "val", val)
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in val.items()))
                result.val = val
                timed, t0 = 0, time.perf_counter()  # keep validation out of the throughput
            if (step % config.checkpoint.every_steps == 0 or step == config.total_steps
                    or val is not None):
                ckpt.save(step, state, data_state,
                          metrics={"val_psnr": val["val_psnr"]} if val else None)
            if stop_after_step is not None and step >= stop_after_step:
                break
    except KeyboardInterrupt:
        # Keep the work done: checkpoint the last completed step, then stop. If the
        # interrupt landed inside a step, its input state is gone (donated): skip.
        try:
            done = int(to_host(state.step)) == step
        except Exception:  # noqa: BLE001 - deleted (donated) buffers
            done = False
        if done and step > start and ckpt.latest_step() != step:
            log.warning("interrupted: saving a checkpoint at step %d", step)
            ckpt.save(step, state, data_state)
        else:
            log.warning("interrupted: latest checkpoint is step %s", ckpt.latest_step())
        raise
    finally:
        bar.close()
        ckpt.wait()
        logger.close()
        data_it.close()

    result.step = step
    result.state = to_host({"step": state.step, "params": state.params, "frozen": state.frozen,
                            "batch_stats": state.batch_stats, "opt_state": state.opt_state})
    if step == config.total_steps and config.demo.enabled and is_main:
        result.demo, result.demo_png = run_demo(config, model_cfg, _host_variables(state),
                                                eval_source, workdir)
        with open(os.path.join(workdir, "demo.json"), "w") as f:
            import json

            json.dump({f"x{s:g}": r for s, r in result.demo.items()}, f, indent=2)
    ckpt.close()
    return result
