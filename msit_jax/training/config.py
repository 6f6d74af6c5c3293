"""The training config skeleton shared by `configs/*.py` (ml_collections).

Every field, with `--config.<field>=value` overridable on the command line:

  seed                 int; model init and data order (batches are a function of (seed, step))
  model                model config: the architecture (see `msit_jax.models.config`)
  runtime.precision, runtime.dtype, runtime.fft_min_kernel
                       execution options (see `msit_jax.ops.runtime`): 'highest' | 'high' |
                       'default'; 'float32' | 'bfloat16'; -1 (per platform) | 0 | k
  batch_size           global batch (all devices, all hosts)
  total_steps          optimizer steps; the LR schedule ends here
  lr.base, lr.multiplier, lr.warmup_steps, lr.epoch_steps
                       see `msit_jax.training.schedule` (reference: 1e-5, 10, 50 epochs,
                       1000 steps per epoch); a warm-up not shorter than total_steps
                       is clipped (`fit_warmup`)
  adam.b1, adam.b2, adam.eps   torch Adam defaults
  grad_clip_norm       clip by global norm when > 0 (the reference does not clip)
  init_from            '' or a stage-1 workdir / model dir / official .pth (stage 2)
  data.train           the training source: kind = 'embedded' | 'folder' | 'tfds' | 'named'
                         embedded: split; folder: path, meta_info, first_k,
                         skip_bad_images, cache_dir; tfds: name, split, data_dir,
                         image_key, first_k; named: name ('div2k', 't91', 'bsd200',
                         '291', joined by '+'), data_root ('': $MSIT_DATA, else
                         ./data), skip_bad_images, cache_dir, data_dir (TFDS div2k);
                         see msit_jax.data.catalog. Benchmark sets are refused.
  data.inp_size, data.sample_q, data.scale_min, data.scale_max, data.augment
                       the batch protocol (reference: 48, 2304, 1, 4 or 8, True)
  data.repeat          images per epoch = repeat x dataset size (reference: 40)
  data.num_workers     grain worker processes (0: in the training process)
  data.num_threads     threads per worker (Pillow decode/resize release the GIL)
  data.buffer_size, data.device_buffer   host / device prefetch depth (batches)
  eval.source          validation source (same fields as data.train)
  eval.every_steps     validation PSNR period (0: never during training)
  eval.scales, eval.max_images, eval.max_side, eval.shave_extra, eval.y_channel,
  eval.chunk, eval.method   see `msit_jax.eval.runner` (chunk 0: per platform)
  checkpoint.every_steps, checkpoint.keep, checkpoint.keep_best, checkpoint.async_save
  log_every_steps      train metrics period
  progress_bar         tqdm bar on process 0
  tensorboard          also write TensorBoard files (tensorboardX)
  demo.enabled, demo.scales, demo.png_scale, demo.window
                       end-of-run table (MSIT vs bicubic on eval.source) and PNG
  distributed.enabled, distributed.coordinator_address, distributed.num_processes,
  distributed.process_id
                       multi-host: jax.distributed.initialize (on Cloud TPU leave the
                       rest empty: it is detected)
  distributed.heartbeat_timeout_s, distributed.initialization_timeout_s
                       seconds (jax's defaults, 100 and 300): a process silent for
                       heartbeat_timeout_s is dead, and the others exit (code 10) instead
                       of waiting; joining gives up after initialization_timeout_s
  skip_nonfinite_steps 0 (default): stop at the first step with a non-finite loss,
                       gradient or weight; N > 0: skip such steps instead (no update),
                       stopping after N in a row
  allow_config_change  resume even when the architecture (model.*) or the batch
                       protocol (`run_config.is_protected`) differs from the stored config
  preemption_grace_s   on SIGTERM/SIGINT the run saves and exits; if that takes longer
                       than this many seconds it exits without saving

`fit_warmup` adapts the schedule to a short run, then `validate_config` checks
every field, before a run touches its workdir.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import ml_collections

from msit_jax.models.config import LEGACY_RUNTIME_FIELDS, model_config, validate_model_config
from msit_jax.errors import ConfigError
from msit_jax.ops.runtime import RuntimeOptions, runtime_config

SOURCE_KINDS = ("embedded", "folder", "tfds", "named")


def source_config(kind: str = "embedded", **kw) -> ml_collections.ConfigDict:
    """A data-source block with every field present (so any can be overridden)."""
    c = ml_collections.ConfigDict(dict(
        kind=kind, split="train", path="", meta_info="", first_k=0, skip_bad_images=False,
        cache_dir="", name="", data_dir="", image_key="hr", data_root=""))
    c.update(kw)
    return c


def base_config() -> ml_collections.ConfigDict:
    """The reference's stage-1 EDSR-baseline recipe on DIV2K; configs adjust it."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_config("edsr-baseline", conv="plain")
    c.runtime = runtime_config()
    c.batch_size = 32
    # 1050 epochs of 800 images x 40 repeats / batch 32 = 1000 steps per epoch.
    c.total_steps = 1_050_000
    c.lr = ml_collections.ConfigDict(dict(base=1e-5, multiplier=10.0, warmup_steps=50_000,
                                          epoch_steps=1000))
    c.adam = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8))
    c.grad_clip_norm = 0.0
    c.init_from = ""

    c.data = ml_collections.ConfigDict()
    c.data.train = source_config("folder", path="data/DIV2K/DIV2K_train_HR")
    c.data.inp_size = 48
    c.data.sample_q = 2304
    c.data.scale_min = 1.0
    c.data.scale_max = 4.0
    c.data.augment = True
    c.data.repeat = 40
    c.data.num_workers = 8
    c.data.num_threads = 2
    c.data.buffer_size = 2
    c.data.device_buffer = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.source = source_config("folder", path="data/DIV2K/DIV2K_valid_HR", first_k=10)
    c.eval.every_steps = 50_000  # the reference validates every 50 epochs
    c.eval.scales = (2.0, 3.0, 4.0)
    c.eval.max_images = 10
    c.eval.max_side = 0
    c.eval.shave_extra = 6  # DIV2K protocol: shave scale + 6
    c.eval.y_channel = False
    c.eval.chunk = 0  # queries per decoder call; 0: per platform (4096 on CPU)
    c.eval.method = "auto"  # decoder: 'auto' | 'grid' | 'query' (msit_jax.inference.Engine)

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5000, keep=3, keep_best=True,
                                                  async_save=True))
    c.log_every_steps = 100
    c.progress_bar = True
    c.tensorboard = True
    c.demo = ml_collections.ConfigDict(dict(enabled=False, scales=(2.0, 3.0, 4.0, 6.0),
                                            png_scale=4.0, window=192))
    c.distributed = ml_collections.ConfigDict(dict(enabled=False, coordinator_address="",
                                                   num_processes=0, process_id=-1,
                                                   heartbeat_timeout_s=100,
                                                   initialization_timeout_s=300))
    c.skip_nonfinite_steps = 0
    c.allow_config_change = False
    # Cloud TPU / Spot VMs get ~30 s between the preemption notice and the stop.
    c.preemption_grace_s = 25.0
    return c


def paper_config(encoder: str, stage: int) -> ml_collections.ConfigDict:
    """The reference's cumulative recipe for one encoder ('edsr-baseline' | 'rdn').

    Stage 1: plain convs, scale ~ U(1, 4). Stage 2: RIM convs, scale ~ U(1, 8),
    started from the stage-1 run via `init_from` (given on the command line).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    c = base_config()
    c.model = model_config(encoder, conv="plain" if stage == 1 else "rim")
    if stage == 2:
        c.data.scale_max = 8.0
    return c


# ---------------------------------------------------------------------------- validation

def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{'data.scale_min': 1.0, ...} for a ConfigDict or nested mapping (leaves only)."""
    out: dict[str, Any] = {}
    items = cfg.items() if hasattr(cfg, "items") else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _checks(c: ml_collections.ConfigDict) -> Iterator[tuple[str, bool, str]]:
    """(field, ok, requirement) for every constrained field of a training config."""
    def finite(v):
        return _number(v) and math.isfinite(v)

    yield "seed", isinstance(c.seed, int) and c.seed >= 0, "must be an integer >= 0"
    yield "batch_size", c.batch_size >= 1, "must be >= 1"
    yield "total_steps", c.total_steps >= 1, "must be >= 1"
    yield "lr.base", finite(c.lr.base) and c.lr.base > 0, "must be a finite number > 0"
    yield ("lr.multiplier", finite(c.lr.multiplier) and c.lr.multiplier > 0,
           "must be a finite number > 0")
    yield "lr.epoch_steps", c.lr.epoch_steps >= 0, "must be >= 0"
    if c.lr.epoch_steps > 0:  # first: its hint also fixes a warm-up longer than the run
        yield ("lr.epoch_steps", c.lr.warmup_steps % c.lr.epoch_steps == 0
               and c.total_steps % c.lr.epoch_steps == 0,
               f"must divide lr.warmup_steps ({c.lr.warmup_steps}) and total_steps "
               f"({c.total_steps}); for a run that is not a whole number of epochs use "
               "--config.lr.epoch_steps=0 (the same schedule per step)")
    yield ("lr.warmup_steps", 0 <= c.lr.warmup_steps < max(c.total_steps, 1),
           f"must be >= 0 and < total_steps ({c.total_steps})")
    for k in ("b1", "b2"):
        v = c.adam[k]
        yield f"adam.{k}", finite(v) and 0 <= v < 1, "must be in [0, 1)"
    yield "adam.eps", finite(c.adam.eps) and c.adam.eps > 0, "must be a finite number > 0"
    yield ("grad_clip_norm", finite(c.grad_clip_norm) and c.grad_clip_norm >= 0,
           "must be a finite number >= 0 (0: no clipping)")
    d = c.data
    yield "data.inp_size", d.inp_size >= 1, "must be >= 1"
    yield ("data.sample_q", 1 <= d.sample_q <= max(d.inp_size, 1) ** 2,
           f"must be in [1, data.inp_size ** 2 = {max(d.inp_size, 1) ** 2}] (queries are "
           "sampled without replacement from an HR crop of at least that many pixels)")
    yield ("data.scale_min", finite(d.scale_min) and d.scale_min >= 1,
           "must be a finite number >= 1 (MSIT upsamples)")
    yield ("data.scale_max", finite(d.scale_max) and d.scale_max >= d.scale_min,
           f"must be a finite number >= data.scale_min ({d.scale_min})")
    for k in ("repeat",):
        yield f"data.{k}", d[k] >= 1, "must be >= 1"
    for k in ("num_workers", "num_threads", "buffer_size", "device_buffer"):
        yield f"data.{k}", d[k] >= 0, "must be >= 0"
    for name, src in (("data.train", d.train), ("eval.source", c.eval.source)):
        kind = src.get("kind")
        yield f"{name}.kind", kind in SOURCE_KINDS, f"must be one of {SOURCE_KINDS}"
        if kind == "folder":
            yield f"{name}.path", bool(src.get("path")), "is required for kind='folder'"
        if kind == "tfds":
            yield f"{name}.name", bool(src.get("name")), "is required for kind='tfds'"
        if kind == "named":
            yield (f"{name}.name", bool(src.get("name")),
                   "is required for kind='named' (training sets, e.g. 't91+bsd200')")
        if kind == "embedded":
            yield (f"{name}.split", src.get("split") in ("train", "val"),
                   "must be 'train' or 'val' for kind='embedded'")
        yield f"{name}.first_k", src.get("first_k", 0) >= 0, "must be >= 0"
    e = c.eval
    yield "eval.every_steps", e.every_steps >= 0, "must be >= 0 (0: never)"
    yield ("eval.scales", len(e.scales) > 0 and all(finite(s) and s >= 1 for s in e.scales),
           "must be finite numbers >= 1")
    for k in ("max_images", "max_side", "shave_extra", "chunk"):
        yield f"eval.{k}", e[k] >= 0, "must be >= 0"
    yield "checkpoint.every_steps", c.checkpoint.every_steps >= 1, "must be >= 1"
    yield "checkpoint.keep", c.checkpoint.keep >= 1, "must be >= 1"
    yield "log_every_steps", c.log_every_steps >= 1, "must be >= 1"
    yield ("demo.scales", all(finite(s) and s >= 1 for s in c.demo.scales),
           "must be finite numbers >= 1")
    yield "demo.png_scale", finite(c.demo.png_scale) and c.demo.png_scale >= 1, "must be >= 1"
    yield "demo.window", c.demo.window >= 1, "must be >= 1"
    yield ("skip_nonfinite_steps", c.get("skip_nonfinite_steps", 0) >= 0,
           "must be >= 0 (0: stop at the first non-finite step)")
    dist = c.get("distributed") or {}
    for k in ("heartbeat_timeout_s", "initialization_timeout_s"):
        v = dist.get(k, 1)
        yield (f"distributed.{k}", isinstance(v, int) and not isinstance(v, bool) and v >= 1,
               "must be a whole number of seconds >= 1")
    g = c.get("preemption_grace_s", 25.0)
    yield "preemption_grace_s", finite(g) and g > 0, "must be a finite number > 0"


# A clipped warm-up is this fraction of the run: the reference warms up for 50 of 1050
# epochs (5%), configs/default.py for 100 of 1500 steps (7%).
SHORT_RUN_WARMUP_DIVISOR = 10


def fit_warmup(config: ml_collections.ConfigDict
               ) -> tuple[ml_collections.ConfigDict, Optional[str]]:
    """Clip a warm-up that is not shorter than the run: (config, warning or None).

    `--config.total_steps=50` on a config that warms up for 100 steps would
    otherwise be an error. The warm-up becomes total_steps // 10 (rounded down
    to whole epochs when lr.epoch_steps > 0): the run keeps the reference's
    shape, a short ramp then the cosine decay to 0, and ends at a low learning
    rate like a full run. (total_steps - 1, the longest valid warm-up, would
    make the whole run a ramp that ends at the peak rate, the worst point to
    stop and evaluate.) Returns a copy when it changes anything; the caller
    keeps its config. Values that cannot be fixed this way (a negative warm-up,
    total_steps < 1, an epoch length that does not divide total_steps) are left
    for `validate_config` to reject.
    """
    try:
        total, warmup, epoch = config.total_steps, config.lr.warmup_steps, config.lr.epoch_steps
    except (AttributeError, KeyError):
        return config, None  # validate_config names the missing field
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (total, warmup, epoch))
    if not ints or total < 1 or epoch < 0 or warmup < total or (epoch and total % epoch):
        return config, None
    fitted = total // SHORT_RUN_WARMUP_DIVISOR
    if epoch:
        fitted -= fitted % epoch
    out = config.copy_and_resolve_references()
    out.lr.warmup_steps = fitted
    unit = f", rounded down to whole epochs of {epoch} steps" if epoch else ""
    return out, (f"lr.warmup_steps={warmup} is not shorter than total_steps={total}: warming "
                 f"up for {fitted} steps instead (total_steps // {SHORT_RUN_WARMUP_DIVISOR}"
                 f"{unit}), then the cosine decay to 0; set --config.lr.warmup_steps to choose")


def unknown_fields(config: ml_collections.ConfigDict) -> list[str]:
    """Fields of `config` that the training config skeleton does not have."""
    known = set(flatten(base_config()))
    # Blocks whose contents are open-ended: the model (validated by its own rules)
    # and the runtime options (validated by RuntimeOptions).
    open_prefixes = ("model.", "runtime.")
    return sorted(k for k in flatten(config) if k not in known
                  and not k.startswith(open_prefixes))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError (one sentence naming the field) for a config that cannot work.

    Checked: unknown fields, every numeric range and enum of the skeleton, the
    model config and the runtime options. Device-count constraints are checked
    by the training loop.
    """
    unknown = unknown_fields(config)
    if unknown:
        raise ConfigError(f"unknown config field {unknown[0]!r}"
                          + (f" (and {len(unknown) - 1} more: {unknown[1:5]})"
                             if len(unknown) > 1 else "")
                          + "; see msit_jax/training/config.py for the fields")
    try:
        for field, ok, need in _checks(config):
            if not ok:
                value = flatten(config).get(field, config.get(field))
                raise ConfigError(f"invalid config: {field}={value!r} {need}")
    except (AttributeError, KeyError, TypeError) as e:
        raise ConfigError(f"invalid config: missing or mistyped field ({e})") from None
    try:
        validate_model_config(config.model)
    except ValueError as e:
        raise ConfigError(str(e).replace("invalid model config: ", "invalid config: model.")) \
            from None
    extra = sorted(set(flatten(config.model)) - set(flatten(model_config()))
                   - set(LEGACY_RUNTIME_FIELDS))
    if extra:
        raise ConfigError(f"unknown config field 'model.{extra[0]}'")
    try:
        RuntimeOptions.from_config(config.get("runtime"))
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from None
