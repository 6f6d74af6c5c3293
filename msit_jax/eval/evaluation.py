"""The reference's evaluation protocol: LR making, paired LR folders, metrics, results.

    cfg = evaluation.default_config()
    cfg.checkpoint, cfg.data, cfg.scales = "epoch-best.pth", ["Set5"], [2.0, 4.0]
    results, baseline, failures = evaluation.run(cfg)

Protocol (official `test.py` with `configs/test/*.yaml`, DESIGN.md section 6):
  * LR on the fly (`sr-implicit-downsampled-cascaded`): for scale s, h = floor(H/s + 1e-9),
    w likewise; the HR image is cropped top-left to (round(h*s), round(w*s)) and the LR is
    the Pillow bicubic resize of that uint8 crop; the full HR grid is predicted.
  * Paired LR files (`sr-implicit-paired-cascaded`, the reference's choice for Set14 and
    B100 at x2-x4): s = H_hr // h_lr, prediction of (round(h*s), round(w*s)), HR cropped
    top-left to that size, the prediction cropped to the HR's size.
  * Predictions are clamped to [0, 1] and not quantised. `benchmark` preset: PSNR on Y
    (weights (65.738, 129.057, 25.064) / 256), shave s; `div2k`: PSNR on RGB, shave s + 6.
    For a non-integer s (the reference evaluates integer scales only) shave = ceil(s).
  * SSIM (not reported by the reference): the SR-table definition in `msit_jax.eval.metrics`,
    on Y for `benchmark`/`matlab`, the mean over R, G, B for `div2k`, same shave as PSNR.
  * `matlab` preset (the published tables' way): predictions quantised to uint8, Y from
    MATLAB's rgb2ycbcr rounded to integers, PSNR/SSIM on that Y, shave s.

Images are numpy (H, W, 3) uint8 RGB unless a name says float.

Nothing lost, nothing silent: output paths (--json, --save_images, --plot) are
checked writable before any image is scored; an image that fails (unreadable,
too small, mismatched paired LR, a non-finite model output, an image that
cannot be saved) is reported as a `Failure` and the others go on; a failure to
write the JSON or plot at the end is reported too, after the results exist.
Dataset names are sanitised before they become folder names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

import ml_collections
import numpy as np

from PIL import Image

from msit_jax import errors, images
from msit_jax.eval import matlab_resize, metrics

log = logging.getLogger(__name__)

DEGRADATIONS = ("pillow", "matlab")
LR_SOURCES = ("auto", "paired", "downsample")
MODELS = ("msit", "bicubic", "bicubic_y")

# Datasets whose official test configs read LR files (paired-image-folders) and at which
# scales; every other (dataset, scale) makes its LR on the fly.
REFERENCE_PAIRED = {"set14": (2, 3, 4), "b100": (2, 3, 4)}
DATASET_ALIASES = {"bsd100": "b100", "bsds100": "b100"}
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")


class Failure(str):
    """A failure message (what `run` returns in its list) with the exit code of its cause."""

    exit_code: int = errors.EXIT_FAILURE

    @classmethod
    def of(cls, message: str, exc: BaseException) -> "Failure":
        f = cls(message)
        f.exit_code = errors.exit_code_for(exc)
        return f


def safe_component(name: str) -> str:
    """A dataset name as one safe path component: runs of characters outside
    [A-Za-z0-9._-] (separators included) become '_', and leading/trailing dots and
    underscores go, so it can never be '..' or absolute ('../../x' -> 'x',
    'div2k/bicubic_x4' -> 'div2k_bicubic_x4')."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return out or "dataset"


def check_writable(path: str, flag: str, directory: bool = False) -> None:
    """OutputError naming `flag` unless `path` (a file, or a directory with directory=True)
    can be created or written; creates missing parent directories as writing would."""
    target = path if directory else os.path.dirname(os.path.abspath(path))
    ancestor = os.path.abspath(target)
    while ancestor and not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if ancestor and not os.path.isdir(ancestor):
        raise errors.OutputError(f"{flag} {path}: {ancestor} is a file, not a directory")
    try:
        if directory and os.path.exists(path) and not os.path.isdir(path):
            raise errors.OutputError(f"{flag} {path}: exists and is not a directory")
        if not directory and os.path.isdir(path):
            raise errors.OutputError(f"{flag} {path}: is a directory")
        os.makedirs(target, exist_ok=True)
        probe = os.path.join(target, f".msit_write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
        if not directory and os.path.exists(path) and not os.access(path, os.W_OK):
            raise errors.OutputError(f"{flag} {path}: not writable")
    except errors.OutputError:
        raise
    except OSError as e:
        raise errors.OutputError(f"{flag} {path}: cannot be written ({e.strerror or e})") \
            from None


# ---------------------------------------------------------------------------- protocol

@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a prediction is scored.

    y_channel: PSNR on Y (else RGB); extra_shave: border pixels dropped beyond the
    scale; quantize: round predictions to uint8 and take MATLAB's rounded Y.
    """

    name: str
    y_channel: bool
    extra_shave: int
    quantize: bool


PROTOCOLS = {
    "benchmark": Protocol("benchmark", y_channel=True, extra_shave=0, quantize=False),
    "div2k": Protocol("div2k", y_channel=False, extra_shave=6, quantize=False),
    "matlab": Protocol("matlab", y_channel=True, extra_shave=0, quantize=True),
}


def canonical_name(dataset: str) -> str:
    """'Set14' -> 'set14', 'BSD100' -> 'b100': the key of the reference defaults."""
    key = re.sub(r"[^a-z0-9]", "", dataset.lower())
    return DATASET_ALIASES.get(key, key)


def default_protocol(dataset: str) -> str:
    """The reference's preset for a dataset name: 'div2k' for DIV2K, else 'benchmark'."""
    return "div2k" if "div2k" in canonical_name(dataset) else "benchmark"


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}, expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def is_integer_scale(scale: float) -> bool:
    return float(scale).is_integer()


def shave_pixels(scale: float, extra: int = 0) -> int:
    """Border pixels dropped: the scale (ceil for non-integer scales) plus `extra`."""
    return int(math.ceil(scale - 1e-9)) + int(extra)


def shave_for(scale: float, protocol: Protocol) -> int:
    """Border pixels dropped under a protocol preset."""
    return shave_pixels(scale, protocol.extra_shave)


def format_scale(scale: float) -> str:
    """2.0 -> '2', 3.5 -> '3.5' (JSON keys, table headers, folder names)."""
    return f"{float(scale):g}"


# ---------------------------------------------------------------------------- LR making

def lr_size(hr_hw: Sequence[int], scale: float) -> tuple[int, int]:
    """The reference's LR size for an HR size and scale: floor(H / s + 1e-9) per axis."""
    return (math.floor(hr_hw[0] / scale + 1e-9), math.floor(hr_hw[1] / scale + 1e-9))


def hr_size(lr_hw: Sequence[int], scale: float) -> tuple[int, int]:
    """The predicted HR grid for an LR size: round(h * s) per axis (Python's round, as the reference)."""
    return round(lr_hw[0] * scale), round(lr_hw[1] * scale)


def degrade(hr: np.ndarray, scale: float, degradation: str = "pillow", name: str = "image"
            ) -> tuple[np.ndarray, np.ndarray]:
    """HR (H, W, 3) uint8 -> (lr (h, w, 3), gt (round(h*s), round(w*s), 3)), both uint8.

    pillow: the reference (Pillow bicubic of the uint8 crop); matlab: MATLAB's
    antialiased bicubic imresize to (h, w), as the benchmark LR files were made.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    h, w = lr_size(hr.shape[:2], scale)
    if h < 1 or w < 1:
        raise ValueError(f"{name}: {hr.shape[1]}x{hr.shape[0]} is too small for x{scale:g}")
    gh, gw = hr_size((h, w), scale)
    gt = hr[:gh, :gw]
    if degradation == "pillow":
        lr = images.resize_bicubic(gt, (h, w))
    elif degradation == "matlab":
        lr = matlab_resize.imresize(gt, output_shape=(h, w))
    else:
        raise ValueError(f"unknown degradation {degradation!r}, expected one of {DEGRADATIONS}")
    return lr, gt


def paired_lr_dir(hr_root: str, scale: float) -> Optional[str]:
    """The benchmarks' `LR_bicubic/X{s}` folder beside (or above) an HR folder, or None."""
    if not is_integer_scale(scale):
        return None
    sub = os.path.join("LR_bicubic", f"X{int(scale)}")
    for root in (hr_root, os.path.dirname(os.path.abspath(hr_root))):
        path = os.path.join(root, sub)
        if os.path.isdir(path):
            return path
    return None


def find_lr_file(lr_dir: str, hr_name: str, scale: float) -> str:
    """The LR file for an HR file name: `{stem}x{s}`, `{stem}_x{s}` or `{stem}`, any extension."""
    stem = os.path.splitext(os.path.basename(hr_name))[0]
    s = int(scale)
    candidates = {c.lower() for c in (f"{stem}x{s}", f"{stem}_x{s}", f"{stem}X{s}", stem)}
    for f in sorted(os.listdir(lr_dir)):
        base, ext = os.path.splitext(f)
        if ext.lower() in images.IMAGE_EXTENSIONS and base.lower() in candidates:
            return os.path.join(lr_dir, f)
    raise FileNotFoundError(f"{lr_dir}: no LR file for {hr_name} (tried {sorted(candidates)})")


def pair(hr: np.ndarray, lr: np.ndarray, scale: float, name: str = "image"
         ) -> tuple[np.ndarray, tuple[int, int]]:
    """A paired (HR, LR) -> (gt, predicted HR size), as `sr-implicit-paired-cascaded`.

    The scale is H_hr // h_lr (it must equal `scale`); the model predicts
    (round(h*s), round(w*s)); gt is the HR cropped to that, and the caller crops
    the prediction to gt's size.
    """
    s = hr.shape[0] // lr.shape[0]
    sx = hr.shape[1] // lr.shape[1]
    if s != scale or sx != scale:
        raise errors.InputError(f"{name}: HR {hr.shape[1]}x{hr.shape[0]} and LR {lr.shape[1]}x"
                         f"{lr.shape[0]} make scale {s} (height) and {sx} (width), expected "
                         f"{scale:g} in both")
    out_hw = hr_size(lr.shape[:2], s)
    return hr[:out_hw[0], :out_hw[1]], out_hw


# ---------------------------------------------------------------------------- datasets

@dataclasses.dataclass
class Dataset:
    """A named list of HR images. `load(i)` -> (H, W, 3) uint8; `root` is the HR folder;
    `is_gray(i)`: whether the stored image is single-channel (MATLAB reads it as 2-D)."""

    name: str
    names: list[str]
    load: Callable[[int], np.ndarray]
    root: Optional[str] = None
    is_gray: Optional[Callable[[int], bool]] = None

    def __len__(self) -> int:
        return len(self.names)


def open_folder(path: str, name: Optional[str] = None) -> Dataset:
    """An HR folder (or a benchmark folder holding `HR/`) as a Dataset."""
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    hr_dir = os.path.join(path, "HR") if os.path.isdir(os.path.join(path, "HR")) else path
    if name is None:
        name = os.path.basename(path)
        if name.upper() == "HR":
            name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    files = images.list_images(hr_dir)
    if not files:
        raise FileNotFoundError(f"{hr_dir}: no images ({', '.join(images.IMAGE_EXTENSIONS)})")

    def is_gray(i: int) -> bool:
        with Image.open(files[i]) as im:
            return im.mode in GRAY_MODES

    return Dataset(name, [os.path.basename(f) for f in files],
                   lambda i: images.read_image(files[i]), root=hr_dir, is_gray=is_gray)


def _pick_image(example: dict, name: str) -> np.ndarray:
    for key in ("hr", "image", "hr_image"):
        if key in example:
            img = np.asarray(example[key])
            break
    else:
        raise ValueError(f"{name}: no 'hr' or 'image' feature (features: {sorted(example)})")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4) or img.dtype != np.uint8:
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    return img[..., :3]


def open_tfds(spec: str, data_dir: Optional[str] = None) -> Dataset:
    """'NAME[:SPLIT]' (split default 'validation') -> Dataset via `tfds.data_source`.

    Uses the example's 'hr' (or 'image') feature; names come from 'id' / 'file_name'
    when present. TensorFlow is not needed for already-prepared datasets.
    """
    import tensorflow_datasets as tfds

    ds_name, _, split = spec.partition(":")
    split = split or "validation"
    source = tfds.data_source(ds_name, split=split, data_dir=data_dir)
    names = []
    for i in range(len(source)):
        ex = source[i]
        key = next((k for k in ("id", "file_name", "filename") if k in ex), None)
        val = ex[key] if key else f"{i:04d}"
        names.append(val.decode() if isinstance(val, bytes) else str(val))
    label = f"{ds_name}:{split}"

    def is_gray(i: int) -> bool:
        img = _pick_image(source[i], f"{label}[{i}]")
        return bool(np.all(img[..., 0] == img[..., 1]) and np.all(img[..., 1] == img[..., 2]))

    return Dataset(ds_name, names, lambda i: _pick_image(source[i], f"{label}[{i}]"),
                   is_gray=is_gray)


def open_dataset(spec: str, tfds_data_dir: Optional[str] = None) -> Dataset:
    """'PATH', 'NAME=PATH' or 'tfds:NAME[:SPLIT]' -> Dataset."""
    if spec.startswith("tfds:"):
        return open_tfds(spec[len("tfds:"):], tfds_data_dir)
    name, sep, path = spec.partition("=")
    if sep and not os.path.exists(spec):
        return open_folder(path, name)
    return open_folder(spec)


# ---------------------------------------------------------------------------- predictors

class BicubicPredictor:
    """The baseline row: bicubic upsampling of the uint8 LR (Pillow, or MATLAB's imresize)."""

    def __init__(self, kernel: str = "pillow"):
        if kernel not in DEGRADATIONS:
            raise ValueError(f"unknown bicubic kernel {kernel!r}")
        self.kernel = kernel
        self.name = "Bicubic" if kernel == "pillow" else "Bicubic (MATLAB)"

    def __call__(self, lr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 -> (out_h, out_w, 3) float32 in [0, 1]."""
        if self.kernel == "pillow":
            up = images.resize_bicubic(lr, out_hw)
        else:
            up = matlab_resize.imresize(lr, output_shape=out_hw)
        return images.to_float(up)


class BicubicYPredictor:
    """The published tables' bicubic rows (SRCNN/VDSR code): Y only, in floating point.

    Y = rgb2ycbcr(HR) rounded to uint8 (a single-channel file, such as Set14's
    bridge, is its own Y: MATLAB reads it as 2-D and those scripts skip
    rgb2ycbcr); LR = MATLAB imresize of Y / 255 (float); SR = MATLAB imresize of
    that back to the HR size, quantised to uint8. Scored by `matlab` only (it
    never sees an RGB LR).
    """

    name = "Bicubic (Y, published tables)"

    @staticmethod
    def predict_y(gt: np.ndarray, lr_hw: tuple[int, int], gray: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
        """gt (H, W, 3) uint8 -> (SR Y, HR Y), both (H, W) uint8."""
        y = gt[..., 0].copy() if gray else matlab_resize.rgb2ycbcr_y(gt)
        lr = matlab_resize.imresize(y.astype(np.float64) / 255.0, output_shape=lr_hw)
        sr = matlab_resize.imresize(lr, output_shape=y.shape)
        return matlab_resize.to_uint8(sr), y


class MSITPredictor:
    """MSIT through `msit_jax.inference.Upscaler` (encoder once, chunked queries)."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, variables: Any,
                 chunk: Optional[int] = None, name: str = "MSIT", method: str = "auto",
                 runtime: Optional[Any] = None):
        from msit_jax.inference import Upscaler

        self.up = Upscaler(model_cfg, variables, chunk=chunk, method=method, runtime=runtime)
        self.name = name

    def __call__(self, lr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        """Clamped prediction; NonFiniteError when the model output has NaN/inf values."""
        out = self.up(images.to_float(lr), out_hw, clamp=False)
        finite = np.isfinite(out)
        if not finite.all():
            raise errors.NonFiniteError(f"the model output has {int(finite.size - finite.sum())}"
                                        f" non-finite value(s) of {finite.size}")
        return np.clip(out, 0.0, 1.0)


# ---------------------------------------------------------------------------- scoring

def score(pred: np.ndarray, gt: np.ndarray, scale: float, protocol: Protocol
          ) -> tuple[float, float]:
    """(PSNR, SSIM) of a float [0, 1] prediction against a uint8 gt of one shape."""
    shave = shave_for(scale, protocol)
    if protocol.quantize:
        yp = matlab_resize.rgb2ycbcr_y(matlab_resize.to_uint8(pred)).astype(np.float64)
        yg = matlab_resize.rgb2ycbcr_y(gt).astype(np.float64)
        return (metrics.psnr_gray(yp, yg, shave=shave), metrics.ssim_gray(yp, yg, shave=shave))
    g = images.to_float(gt)
    return (metrics.psnr(pred, g, shave=shave, y_channel=protocol.y_channel),
            metrics.ssim(pred, g, shave=shave, y_channel=protocol.y_channel))


@dataclasses.dataclass
class ScaleResult:
    """Means and per-image figures of one (dataset, scale)."""

    psnr: float
    ssim: float
    per_image: dict[str, dict[str, Any]]
    lr_source: str
    protocol: str
    shave: int
    degradation: str

    def to_json(self) -> dict[str, Any]:
        return {"psnr": self.psnr, "ssim": self.ssim, "per_image": self.per_image,
                "lr_source": self.lr_source, "protocol": self.protocol, "shave": self.shave,
                "degradation": self.degradation, "n_images": len(self.per_image)}


def choose_lr_source(dataset: Dataset, scale: float, lr_source: str) -> tuple[str, Optional[str]]:
    """('paired', dir) or ('downsample', None) for one (dataset, scale); see LR_SOURCES."""
    if lr_source not in LR_SOURCES:
        raise ValueError(f"unknown lr_source {lr_source!r}, expected one of {LR_SOURCES}")
    lr_dir = paired_lr_dir(dataset.root, scale) if dataset.root else None
    if lr_source == "downsample":
        return "downsample", None
    if lr_source == "paired":
        if lr_dir is None:
            raise FileNotFoundError(f"{dataset.name}: no LR_bicubic/X{format_scale(scale)} "
                                    f"folder beside {dataset.root}")
        return "paired", lr_dir
    wants = scale in REFERENCE_PAIRED.get(canonical_name(dataset.name), ())
    if wants and lr_dir is None:
        log.warning("%s x%s: the reference reads LR files (LR_bicubic/X%s) here, but none were "
                    "found beside %s; making LR on the fly instead", dataset.name,
                    format_scale(scale), format_scale(scale), dataset.root)
        return "downsample (reference: paired, not found)", None
    return ("paired", lr_dir) if wants else ("downsample", None)


def evaluate_scale(predictor, dataset: Dataset, scale: float, protocol: Protocol, *,
                   lr_source: str = "auto", degradation: str = "pillow",
                   save_dir: Optional[str] = None, progress: bool = True,
                   failures: Optional[list[str]] = None) -> Optional[ScaleResult]:
    """Score a predictor on every image of a dataset at one scale.

    An image that cannot be read or is too small (or whose prediction is not
    finite) is logged, appended to `failures` (a `Failure`) and left out; an
    image scored but not saved is appended too. Returns None when no image
    could be scored.
    """
    y_only = hasattr(predictor, "predict_y")
    if y_only and (not protocol.quantize or lr_source == "paired" or degradation != "matlab"):
        raise ValueError("bicubic_y reproduces the published tables: it needs protocol 'matlab', "
                         "degradation 'matlab' and LR made on the fly")
    # The published tables' bicubic makes its own (Y-only) LR; no LR files are involved.
    source, lr_dir = choose_lr_source(dataset, scale, "downsample" if y_only else lr_source)
    per_image: dict[str, dict[str, Any]] = {}
    shave = shave_for(scale, protocol)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), desc=f"{dataset.name} x{format_scale(scale)}",
                   unit="img", leave=False)
    for i, name in enumerate(dataset.names):
        try:
            hr = dataset.load(i)
            if source == "paired":
                lr = images.read_image(find_lr_file(lr_dir, name, scale))
                gt, out_hw = pair(hr, lr, scale, name)
            else:
                lr, gt = degrade(hr, scale, degradation, name)
                out_hw = gt.shape[:2]
            if 2 * shave >= min(gt.shape[:2]):
                raise ValueError(f"{name}: {gt.shape[1]}x{gt.shape[0]} is too small to shave "
                                 f"{shave} pixels at x{format_scale(scale)}")
            t0 = time.perf_counter()
            if y_only:
                gray = bool(dataset.is_gray(i)) if dataset.is_gray else False
                sr_y, gt_y = predictor.predict_y(gt, lr.shape[:2], gray)
                elapsed = time.perf_counter() - t0
                ys, yg = sr_y.astype(np.float64), gt_y.astype(np.float64)
                p = metrics.psnr_gray(ys, yg, shave=shave)
                s = metrics.ssim_gray(ys, yg, shave=shave)
                pred = None
            else:
                pred = predictor(lr, out_hw)
                elapsed = time.perf_counter() - t0
                pred = pred[:gt.shape[0], :gt.shape[1]]  # paired: HR may be smaller
                p, s = score(pred, gt, scale, protocol)
        except (images.ImageError, ValueError, FileNotFoundError, errors.NonFiniteError,
                MemoryError) as e:
            msg = errors.one_line(str(e))
            if isinstance(e, errors.NonFiniteError):
                msg = f"{name}: {msg}"
            log.error("%s x%s: %s", dataset.name, format_scale(scale), msg)
            if failures is not None:
                failures.append(Failure.of(f"{dataset.name} x{format_scale(scale)}: {msg}", e))
            if bar is not None:
                bar.update(1)
            continue
        per_image[name] = {"psnr": p, "ssim": s, "time_s": elapsed,
                           "lr_hw": list(lr.shape[:2]), "hr_hw": list(gt.shape[:2])}
        if save_dir is not None and pred is not None:
            stem = safe_component(os.path.splitext(name)[0])
            out = os.path.join(save_dir, safe_component(dataset.name),
                               f"x{format_scale(scale)}", f"{stem}.png")
            try:
                images.save_png(out, pred)
            except OSError as e:
                msg = f"--save_images: {out}: cannot be written ({e.strerror or e})"
                log.error("%s", msg)
                if failures is not None:
                    failures.append(Failure.of(msg, errors.OutputError(msg)))
        line = (f"{dataset.name} x{format_scale(scale)} {name}: PSNR {p:.4f} SSIM {s:.4f} "
                f"({elapsed:.3f}s)")
        if bar is not None:
            bar.write(line, file=sys.stderr)  # above the bar, not through it
            bar.set_postfix(psnr=f"{p:.2f}", time=f"{elapsed:.3f}s")
            bar.update(1)
        else:
            log.info(line)
    if bar is not None:
        bar.close()
    if not per_image:
        return None
    return ScaleResult(
        psnr=float(np.mean([r["psnr"] for r in per_image.values()])),
        ssim=float(np.mean([r["ssim"] for r in per_image.values()])),
        per_image=per_image, lr_source=source, protocol=protocol.name, shave=shave,
        degradation="file" if source == "paired" else degradation)


# ---------------------------------------------------------------------------- reports

Results = dict[str, dict[float, ScaleResult]]  # dataset -> scale -> result


def results_to_json(results: Results, baseline: Optional[Results] = None) -> dict[str, Any]:
    """{dataset: {scale: {"psnr", "ssim", "per_image", ...[, "bicubic": {...}]}}}."""
    out: dict[str, Any] = {}
    for ds, by_scale in results.items():
        out[ds] = {}
        for scale, r in by_scale.items():
            entry = r.to_json()
            if baseline and scale in baseline.get(ds, {}):
                entry["bicubic"] = baseline[ds][scale].to_json()
            out[ds][format_scale(scale)] = entry
    return out


def _json_safe(x: Any) -> Any:
    """NaN/inf floats -> None (null), recursively: the file stays strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: str, results: Results, baseline: Optional[Results] = None) -> None:
    """Write the results (atomically: a failed write leaves no partial file)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(_json_safe(results_to_json(results, baseline)), f, indent=2,
                      allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def markdown_table(rows: Sequence[tuple[str, Results]], scales: Sequence[float]) -> str:
    """Methods x datasets rows, scales as columns, 'PSNR / SSIM' cells (papers' precision).

    A cell whose LR was made on the fly where the reference reads LR files is
    marked with a dagger and a footnote.
    """
    head = "| Method | Dataset | " + " | ".join(f"x{format_scale(s)}" for s in scales) + " |"
    lines = [head, "|" + "---|" * (2 + len(scales))]
    dagger = False
    for method, results in rows:
        for ds, by_scale in results.items():
            cells = []
            for s in scales:
                r = by_scale.get(s)
                if r is None:
                    cells.append("-")
                    continue
                mark = ""
                if "not found" in r.lr_source:
                    mark, dagger = " †", True
                cells.append(f"{r.psnr:.2f} / {r.ssim:.4f}{mark}")
            lines.append(f"| {method} | {ds} | " + " | ".join(cells) + " |")
    if dagger:
        lines.append("")
        lines.append("† LR made on the fly (--degradation); the reference reads "
                     "LR_bicubic/X{s} files here, which were not found.")
    return "\n".join(lines)


def plot_psnr_vs_scale(curves: Sequence[tuple[str, dict[float, float]]], dataset: str,
                       path: str) -> None:
    """PSNR (dB) against scale for each (label, {scale: psnr}) curve; saved to `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib, an optional dependency: "
                          "pip install -r requirements-plot.txt") from e
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, pts in curves:
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log")
    # The reference trains on x1-x4: beyond that the scales are out of distribution.
    ax.axvspan(1.0, 4.0, color="0.9", zorder=0, label="training scales (x1-x4)")
    ticks = sorted({x for _, pts in curves for x in pts})
    ax.set_xticks(ticks)
    ax.set_xticklabels([format_scale(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(min(ticks) / 1.1, max(ticks) * 1.1)
    ax.set_xlabel("scale factor")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"PSNR vs. scale on {dataset}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- driver

def default_config() -> ml_collections.ConfigDict:
    """Every evaluation setting (evaluate.py's flags fill these)."""
    c = ml_collections.ConfigDict()
    c.checkpoint = ""          # project checkpoint dir or official .pth (model 'msit')
    c.model = "msit"           # 'msit' | 'bicubic' | 'bicubic_y'
    c.data = []                # folders, 'NAME=PATH' or 'tfds:NAME[:SPLIT]'
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
    c.json = ""
    c.save_images = ""
    c.plot = ""
    c.tfds_data_dir = ""
    c.progress = True
    return c


def make_predictor(cfg: ml_collections.ConfigDict):
    if cfg.model == "bicubic":
        return BicubicPredictor(cfg.degradation)
    if cfg.model == "bicubic_y":
        return BicubicYPredictor()
    if cfg.model != "msit":
        raise ValueError(f"unknown model {cfg.model!r}, expected one of {MODELS}")
    if not cfg.checkpoint:
        raise ValueError("model 'msit' needs a checkpoint (a msit-jax checkpoint dir or an "
                         "official .pth); or use --model bicubic")
    from msit_jax.io import pretrained
    from msit_jax.models import reparam
    from msit_jax.ops.runtime import RuntimeOptions

    runtime = RuntimeOptions(cfg.precision, cfg.dtype, cfg.fft_min_kernel)
    model_cfg, variables = pretrained.load(cfg.checkpoint)
    if cfg.fold:
        model_cfg, variables = reparam.fold(model_cfg, variables)
    return MSITPredictor(model_cfg, variables, cfg.chunk or None, method=cfg.method,
                         runtime=runtime)


def protocols_for(cfg: ml_collections.ConfigDict, datasets: Sequence[Dataset]) -> list[Protocol]:
    names = list(cfg.protocol) or ["auto"]
    if len(names) == 1:
        names = names * len(datasets)
    if len(names) != len(datasets):
        raise ValueError(f"give one protocol, or one per dataset ({len(datasets)}), got {names}")
    return [get_protocol(default_protocol(d.name) if p == "auto" else p)
            for p, d in zip(names, datasets)]


def run(cfg: ml_collections.ConfigDict) -> tuple[Results, Optional[Results], list[str]]:
    """Evaluate per the config -> (results, bicubic baseline or None, failure messages).

    Writes the JSON, images and plot the config asks for.
    """
    if not cfg.data:
        raise ValueError("no data: give one or more HR folders (or tfds:NAME[:SPLIT])")
    scales = [float(s) for s in cfg.scales]
    if not scales or min(scales) < 1 or not all(math.isfinite(s) for s in scales):
        raise ValueError(f"scales must be finite numbers >= 1, got {scales}")
    if cfg.degradation not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {cfg.degradation!r}, expected one of "
                         f"{DEGRADATIONS}")
    # Output paths first: a finished evaluation must not be lost to an unwritable path.
    if cfg.json:
        check_writable(cfg.json, "--json")
    if cfg.plot:
        check_writable(cfg.plot, "--plot")
    if cfg.save_images:
        check_writable(cfg.save_images, "--save_images", directory=True)
    datasets = [open_dataset(d, cfg.tfds_data_dir or None) for d in cfg.data]
    protos = protocols_for(cfg, datasets)
    predictor = make_predictor(cfg)
    baseline_pred = None
    if (cfg.with_bicubic or cfg.plot) and cfg.model == "msit":
        baseline_pred = BicubicPredictor(cfg.degradation)

    failures: list[str] = []
    results: Results = {}
    baseline: Optional[Results] = {} if baseline_pred else None
    for ds, proto in zip(datasets, protos):
        for scale in scales:
            kw = dict(lr_source=cfg.lr_source, degradation=cfg.degradation,
                      progress=cfg.progress, failures=failures)
            r = evaluate_scale(predictor, ds, scale, proto,
                               save_dir=cfg.save_images or None, **kw)
            if r is not None:
                results.setdefault(ds.name, {})[scale] = r
                log.info("%s %s x%s: PSNR %.4f SSIM %.4f, %.2fs/image", predictor.name,
                         ds.name, format_scale(scale), r.psnr, r.ssim,
                         np.mean([v["time_s"] for v in r.per_image.values()]))
            if baseline_pred is not None:  # an unreadable image was reported above already
                b = evaluate_scale(baseline_pred, ds, scale, proto, **{**kw, "failures": None})
                if b is not None:
                    baseline.setdefault(ds.name, {})[scale] = b
    if cfg.json:
        try:
            write_json(cfg.json, results, baseline)
        except OSError as e:
            msg = f"--json {cfg.json}: cannot be written ({e.strerror or e})"
            log.error("%s", msg)
            failures.append(Failure.of(msg, errors.OutputError(msg)))
    if cfg.plot:
        ds = datasets[0].name
        curves = [(predictor.name, {s: r.psnr for s, r in results.get(ds, {}).items()})]
        if baseline:
            curves.append((baseline_pred.name,
                           {s: r.psnr for s, r in baseline.get(ds, {}).items()}))
        try:
            plot_psnr_vs_scale(curves, ds, cfg.plot)
        except OSError as e:
            msg = f"--plot {cfg.plot}: cannot be written ({e.strerror or e})"
            log.error("%s", msg)
            failures.append(Failure.of(msg, errors.OutputError(msg)))
    return results, baseline, failures
