"""Evaluate a predictor on an image source over scales: the one evaluation path.

`evaluate.py` (`msit_jax.eval.cli`), training validation and the end-of-run demo
(`msit_jax.training.loop`) all score through `evaluate_scale`: LR making and
paired LR files from `protocol`, predictions from a `predictors.Predictor`,
PSNR / SSIM from `protocol.score`.

    cfg = runner.default_config()
    cfg.checkpoint, cfg.data, cfg.scales = "epoch-best.pth", ["set5"], [2.0, 4.0]
    results, baseline, failures = runner.run(cfg)

Nothing lost, nothing silent: output paths (--json, --save_images, --plot) are
checked writable (and --plot's matplotlib importable) before any image is
scored; an image that fails (unreadable, too small, mismatched paired LR, a
non-finite model output, an image that cannot be saved) is reported as a
`Failure` and the others go on; a failure to write the JSON or plot at the end
is reported too, after the results exist. Training validation passes
`strict=True` instead: any error propagates, as a training run must stop on it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import ml_collections
import numpy as np

from msit_jax import console, errors, images
from msit_jax.eval import datasets, predictors, protocol, reports
from msit_jax.eval.datasets import EvalSet
from msit_jax.eval.protocol import ScoringPreset, format_scale

log = logging.getLogger(__name__)

Note = Callable[[str], None]


class Failure(str):
    """A failure message (what `run` returns in its list) with the exit code of its cause."""

    exit_code: int = errors.EXIT_FAILURE

    @classmethod
    def of(cls, message: str, exc: BaseException) -> "Failure":
        f = cls(message)
        f.exit_code = errors.exit_code_for(exc)
        return f


class EvaluationAborted(Exception):
    """Evaluation stopped early because `should_stop()` became true (e.g. SIGTERM)."""


@dataclasses.dataclass
class ScaleResult:
    """Means and per-image figures of one (dataset, scale); ssim is None when not computed."""

    psnr: float
    ssim: Optional[float]
    per_image: dict[str, dict[str, Any]]
    lr_source: str
    protocol: str
    shave: int
    degradation: str

    def to_json(self) -> dict[str, Any]:
        return {"psnr": self.psnr, "ssim": self.ssim, "per_image": self.per_image,
                "lr_source": self.lr_source, "protocol": self.protocol, "shave": self.shave,
                "degradation": self.degradation, "n_images": len(self.per_image)}

    def mean_time(self) -> float:
        return float(np.mean([v["time_s"] for v in self.per_image.values()]))


Results = dict[str, dict[float, ScaleResult]]  # dataset -> scale -> result


def choose_lr_source(evalset: EvalSet, scale: float, lr_source: str
                     ) -> tuple[str, Optional[str]]:
    """('paired', dir) or ('downsample', None) for one (dataset, scale); see LR_SOURCES."""
    if lr_source not in protocol.LR_SOURCES:
        raise ValueError(f"unknown lr_source {lr_source!r}, expected one of "
                         f"{protocol.LR_SOURCES}")
    if lr_source == "downsample":
        return "downsample", None
    lr_dir = protocol.paired_lr_dir(evalset.hr_dir, scale) if evalset.hr_dir else None
    if lr_source == "paired":
        if lr_dir is None:
            raise FileNotFoundError(f"{evalset.name}: no LR_bicubic/X{format_scale(scale)} "
                                    f"folder beside {evalset.hr_dir}")
        return "paired", lr_dir
    wants = scale in protocol.REFERENCE_PAIRED.get(protocol.canonical_name(evalset.name), ())
    if wants and lr_dir is None:
        log.warning("%s x%s: the reference reads LR files (LR_bicubic/X%s) here, but none were "
                    "found beside %s; making LR on the fly instead", evalset.name,
                    format_scale(scale), format_scale(scale), evalset.hr_dir)
        return "downsample (reference: paired, not found)", None
    return ("paired", lr_dir) if wants else ("downsample", None)


def evaluate_scale(predictor: predictors.Predictor, evalset: EvalSet, scale: float,
                   preset: ScoringPreset, *, lr_source: str = "auto",
                   degradation: str = "pillow", max_images: int = 0, max_side: int = 0,
                   with_ssim: bool = True, save_dir: Optional[str] = None,
                   progress: bool = False, failures: Optional[list[str]] = None,
                   strict: bool = False, should_stop: Optional[Callable[[], bool]] = None
                   ) -> Optional[ScaleResult]:
    """Score a predictor on the images of a set at one scale.

    max_images: the first N images only (0: all); max_side: central crops of at
    most max_side x max_side of each HR image (0: whole images); with_ssim:
    also SSIM (training validation needs PSNR only); should_stop: polled before
    each image, EvaluationAborted when it returns True.

    strict=False: an image that cannot be read or is too small (or whose
    prediction is not finite) is logged, appended to `failures` (a `Failure`)
    and left out; an image scored but not saved is appended too. Returns None
    when no image could be scored. strict=True: such errors propagate.
    """
    y_only = predictor.needs_hr_y
    if y_only and (not preset.quantize or lr_source == "paired" or degradation != "matlab"):
        raise ValueError("bicubic_y reproduces the published tables: it needs protocol 'matlab', "
                         "degradation 'matlab' and LR made on the fly")
    # The published tables' bicubic makes its own (Y-only) LR; no LR files are involved.
    source, lr_dir = choose_lr_source(evalset, scale, "downsample" if y_only else lr_source)
    shave = protocol.shave_for(scale, preset)
    n = len(evalset) if not max_images else min(max_images, len(evalset))
    label = f"{evalset.name} x{format_scale(scale)}"
    per_image: dict[str, dict[str, Any]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=label, unit="img", leave=False, file=sys.stderr)
    try:
        for i in range(n):
            if should_stop is not None and should_stop():
                raise EvaluationAborted("evaluation stopped early")
            name = evalset.source.key(i)
            try:
                hr = protocol.center_crop(evalset.source[i], max_side)
                if source == "paired":
                    lr = images.read_image(protocol.find_lr_file(lr_dir, name, scale))
                    gt, out_hw = protocol.pair(hr, lr, scale, name)
                else:
                    lr, gt = protocol.degrade(hr, scale, degradation, name)
                    out_hw = gt.shape[:2]
                if 2 * shave >= min(gt.shape[:2]):
                    raise ValueError(f"{name}: {gt.shape[0]} x {gt.shape[1]} is too small to "
                                     f"shave {shave} pixels at x{format_scale(scale)}")
                is_compiled = getattr(predictor, "is_compiled", None)
                compiles = is_compiled is not None and not is_compiled(lr.shape[:2], out_hw)
                t0 = time.perf_counter()
                if y_only:
                    gray = bool(evalset.source.is_gray(i))
                    sr_y, gt_y = predictor.predict_y(gt, lr.shape[:2], gray)
                    elapsed = time.perf_counter() - t0
                    p, s = protocol.score_y(sr_y, gt_y, shave, with_ssim=with_ssim)
                    pred = None
                else:
                    pred = predictor(lr, out_hw)
                    elapsed = time.perf_counter() - t0
                    pred = pred[:gt.shape[0], :gt.shape[1]]  # paired: HR may be smaller
                    p, s = protocol.score(pred, gt, scale, preset, with_ssim=with_ssim)
            except (images.ImageError, ValueError, FileNotFoundError, errors.NonFiniteError,
                    MemoryError) as e:
                if strict:
                    raise
                msg = errors.one_line(str(e))
                if isinstance(e, errors.NonFiniteError):
                    msg = f"{name}: {msg}"
                log.error("%s: %s", label, msg)
                if failures is not None:
                    failures.append(Failure.of(f"{label}: {msg}", e))
                if bar is not None:
                    bar.update(1)
                continue
            entry = {"psnr": p, "ssim": s, "time_s": elapsed, "lr_hw": list(lr.shape[:2]),
                     "hr_hw": list(gt.shape[:2])}
            if compiles:
                entry["compiled"] = True  # the time includes JIT compilation
            per_image[name] = entry
            if save_dir is not None and pred is not None:
                _save_prediction(save_dir, evalset.name, scale, name, pred, failures)
            line = (f"{label} {name}: PSNR {p:.4f}" + (f" SSIM {s:.4f}" if s is not None else "")
                    + f" ({elapsed:.3f} s{', with JIT compilation' if compiles else ''})")
            if bar is not None:
                bar.write(line, file=sys.stderr)  # above the bar, not through it
                bar.set_postfix(psnr=f"{p:.2f}", time=f"{elapsed:.3f}s")
                bar.update(1)
            else:
                log.debug("%s", line)
    finally:
        if bar is not None:
            bar.close()
    if not per_image:
        return None
    ssims = [r["ssim"] for r in per_image.values()]
    return ScaleResult(
        psnr=float(np.mean([r["psnr"] for r in per_image.values()])),
        ssim=float(np.mean(ssims)) if with_ssim else None,
        per_image=per_image, lr_source=source, protocol=preset.name, shave=shave,
        degradation="file" if source == "paired" else degradation)


def _save_prediction(save_dir: str, dataset: str, scale: float, name: str, pred: np.ndarray,
                     failures: Optional[list[str]]) -> None:
    stem = reports.safe_component(os.path.splitext(name)[0])
    out = os.path.join(save_dir, reports.safe_component(dataset), f"x{format_scale(scale)}",
                       f"{stem}.png")
    try:
        images.save_png(out, pred)
    except OSError as e:
        msg = f"--save_images: {out}: cannot be written ({e.strerror or e})"
        log.error("%s", msg)
        if failures is not None:
            failures.append(Failure.of(msg, errors.OutputError(msg)))


def evaluate(predictor: predictors.Predictor, evalset: EvalSet, scales: Sequence[float],
             preset: ScoringPreset, **kw) -> dict[float, Optional[ScaleResult]]:
    """`evaluate_scale` at each scale: {scale: ScaleResult or None}, keys as floats."""
    return {float(s): evaluate_scale(predictor, evalset, float(s), preset, **kw)
            for s in scales}


def summary_line(method: str, dataset: str, scale: float, r: ScaleResult) -> str:
    """One line per (dataset, scale): means, image count, time per image, compile time."""
    line = (f"{method} {dataset} x{format_scale(scale)}: PSNR {r.psnr:.4f}"
            + (f" SSIM {r.ssim:.4f}" if r.ssim is not None else "")
            + f", {len(r.per_image)} images, {r.mean_time():.2f} s/image")
    compiled = [v["time_s"] for v in r.per_image.values() if v.get("compiled")]
    if compiled:
        line += f" ({len(compiled)} with JIT compilation, {sum(compiled):.1f} s)"
    return line


# ---------------------------------------------------------------------------- driver

def default_config() -> ml_collections.ConfigDict:
    """Every evaluation setting (evaluate.py's flags fill these)."""
    c = ml_collections.ConfigDict()
    c.checkpoint = ""          # project checkpoint dir or official .pth (model 'msit')
    c.model = "msit"           # 'msit' | 'bicubic' | 'bicubic_y'
    c.data = []                # benchmark names, folders, 'NAME=PATH' or 'tfds:NAME[:SPLIT]'
    c.data_root = ""           # where benchmark names are looked up ('': $MSIT_DATA, ./data)
    c.scales = [2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 18.0, 24.0, 30.0]
    c.protocol = ["auto"]      # one per dataset, or one for all; 'auto' = reference default
    c.lr_source = "auto"       # 'auto' (reference's choice) | 'paired' | 'downsample'
    c.degradation = "pillow"   # 'pillow' (reference) | 'matlab'
    c.fold = True              # fold RIM/BatchNorm first (faster; round-off differences)
    c.chunk = 0                # queries per decoder call (0: per platform, 4096 on CPU)
    c.method = "auto"          # decoder: 'auto' | 'grid' (fast at large scales) | 'query' (reference formulation)
    c.dtype = "float32"        # compute dtype: 'float32' | 'bfloat16'
    c.precision = "highest"    # matmul/conv precision: 'highest' | 'high' | 'default'
    c.fft_min_kernel = -1      # FFT threshold of the multi-scale convs (-1: per platform)
    c.with_bicubic = False     # also score the bicubic baseline (always with plot)
    c.self_ensemble = False    # mean over the 8 flips/transposes ("MSIT+"), 8x the work
    c.json = ""
    c.save_images = ""
    c.plot = ""
    c.tfds_data_dir = ""
    c.progress = True
    return c


def presets_for(cfg: ml_collections.ConfigDict, sets: Sequence[EvalSet]) -> list[ScoringPreset]:
    names = list(cfg.protocol) or ["auto"]
    if len(names) == 1:
        names = names * len(sets)
    if len(names) != len(sets):
        raise ValueError(f"give one protocol, or one per dataset ({len(sets)}), got {names}")
    return [protocol.get_preset(protocol.default_preset(d.name) if p == "auto" else p)
            for p, d in zip(names, sets)]


def _check_config(cfg: ml_collections.ConfigDict) -> list[float]:
    if not cfg.data:
        raise ValueError("no data: give one or more benchmark names, HR folders or "
                         "tfds:NAME[:SPLIT]")
    scales = [float(s) for s in cfg.scales]
    if not scales or min(scales) < 1 or not all(math.isfinite(s) for s in scales):
        raise ValueError(f"scales must be finite numbers >= 1, got {scales}")
    if cfg.degradation not in protocol.DEGRADATIONS:
        raise ValueError(f"unknown degradation {cfg.degradation!r}, expected one of "
                         f"{protocol.DEGRADATIONS}")
    return scales


def run(cfg: ml_collections.ConfigDict, *, verbose_progress: bool = False
        ) -> tuple[Results, Optional[Results], list[str]]:
    """Evaluate per the config -> (results, bicubic baseline or None, failure messages).

    Writes the JSON, images and plot the config asks for. verbose_progress: time
    the stages (load, fold) and print a line per (dataset, scale) and the paths
    written on stderr (`msit_jax.console`), as the command line does.
    """

    quiet = not verbose_progress
    scales = _check_config(cfg)
    # Before any work: a finished evaluation must not be lost to an unwritable path or a
    # missing optional dependency.
    if cfg.plot:
        reports.require_matplotlib("--plot")
    if cfg.json:
        reports.check_writable(cfg.json, "--json")
    if cfg.plot:
        reports.check_writable(cfg.plot, "--plot")
    if cfg.save_images:
        reports.check_writable(cfg.save_images, "--save_images", directory=True)
    # Every --data names something before anything is opened or loaded.
    resolved = [datasets.resolve(spec, cfg.data_root or None) for spec in cfg.data]
    failures: list[str] = []
    sets = []
    for name, path in resolved:
        with console.stage(f"open {path}", quiet=quiet):
            ds = datasets.open_resolved(name, path, tfds_data_dir=cfg.tfds_data_dir or None)
        for e in ds.skipped:
            msg = f"{ds.name}: {errors.one_line(str(e))}"
            console.note(f"error: {msg} (left out)", quiet=quiet)
            failures.append(Failure.of(msg, e))
        sets.append(ds)
    presets = presets_for(cfg, sets)
    predictor = predictors.make_predictor(cfg, quiet=quiet)
    baseline_pred = None
    if (cfg.with_bicubic or cfg.plot) and cfg.model == "msit":
        baseline_pred = predictors.BicubicPredictor(cfg.degradation)

    results: Results = {}
    baseline: Optional[Results] = {} if baseline_pred else None
    for ds, preset in zip(sets, presets):
        for scale in scales:
            kw = dict(lr_source=cfg.lr_source, degradation=cfg.degradation,
                      progress=cfg.progress, failures=failures)
            r = evaluate_scale(predictor, ds, scale, preset, save_dir=cfg.save_images or None,
                               **kw)
            if r is not None:
                results.setdefault(ds.name, {})[scale] = r
                console.note(summary_line(predictor.name, ds.name, scale, r), quiet=quiet)
            if baseline_pred is not None:  # an unreadable image was reported above already
                b = evaluate_scale(baseline_pred, ds, scale, preset, **{**kw, "failures": None})
                if b is not None:
                    baseline.setdefault(ds.name, {})[scale] = b
    if cfg.json:
        try:
            reports.write_json(cfg.json, results, baseline)
            console.note(f"wrote {os.path.abspath(cfg.json)}", quiet=quiet)
        except OSError as e:
            msg = f"--json {cfg.json}: cannot be written ({e.strerror or e})"
            log.error("%s", msg)
            failures.append(Failure.of(msg, errors.OutputError(msg)))
    if cfg.plot:
        ds_name = sets[0].name
        curves = [(predictor.name, {s: r.psnr for s, r in results.get(ds_name, {}).items()})]
        if baseline:
            curves.append((baseline_pred.name,
                           {s: r.psnr for s, r in baseline.get(ds_name, {}).items()}))
        try:
            reports.plot_psnr_vs_scale(curves, ds_name, cfg.plot)
            console.note(f"wrote {os.path.abspath(cfg.plot)}", quiet=quiet)
        except OSError as e:
            msg = f"--plot {cfg.plot}: cannot be written ({e.strerror or e})"
            log.error("%s", msg)
            failures.append(Failure.of(msg, errors.OutputError(msg)))
    return results, baseline, failures
