"""The reference's evaluation protocol: scoring presets, LR making, paired LR files, shave.

Protocol (official `test.py` with `configs/test/*.yaml`; see docs/evaluation.md):
  * LR on the fly (`sr-implicit-downsampled-cascaded`): for scale s, h = floor(H/s + 1e-9),
    w likewise; the HR image is cropped top-left to (round(h*s), round(w*s)) and the LR is
    the Pillow bicubic resize of that uint8 crop; the full HR grid is predicted.
  * Paired LR files (`sr-implicit-paired-cascaded`, the reference's choice for Set14 and
    B100 at x2-x4): s = H_hr // h_lr, prediction of (round(h*s), round(w*s)), HR cropped
    top-left to that size, the prediction cropped to the HR's size.
  * Predictions are clamped to [0, 1] and not quantised. `benchmark` preset: PSNR on Y
    (`color.Y_WEIGHTS`), shave s; `div2k`: PSNR on RGB, shave s + 6. For a non-integer s
    (the reference evaluates integer scales only) shave = ceil(s).
  * SSIM (not reported by the reference): the SR-table definition in `msit_jax.eval.metrics`,
    on Y for `benchmark`/`matlab`, the mean over R, G, B for `div2k`, same shave as PSNR.
  * `matlab` preset (the published tables' way): predictions quantised to uint8, Y from
    MATLAB's rgb2ycbcr rounded to integers, PSNR/SSIM on that Y, shave s.

Training validation uses the same LR making and PSNR with a preset built from its
config (`eval.y_channel`, `eval.shave_extra`), optionally on central crops.

Images are numpy (H, W, 3) uint8 RGB unless a name says float; sizes are (H, W).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional, Sequence

import numpy as np

from msit_jax import errors, images
from msit_jax.eval import matlab_resize, metrics
from msit_jax.inference import frontend

DEGRADATIONS = ("pillow", "matlab")
LR_SOURCES = ("auto", "paired", "downsample")

# Datasets whose official test configs read LR files (paired-image-folders) and at which
# scales; every other (dataset, scale) makes its LR on the fly.
REFERENCE_PAIRED = {"set14": (2, 3, 4), "b100": (2, 3, 4)}
DATASET_ALIASES = {"bsd100": "b100", "bsds100": "b100"}


@dataclasses.dataclass(frozen=True)
class ScoringPreset:
    """How a prediction is scored.

    y_channel: PSNR on Y (else RGB); extra_shave: border pixels dropped beyond the
    scale; quantize: round predictions to uint8 and take MATLAB's rounded Y.
    """

    name: str
    y_channel: bool
    extra_shave: int
    quantize: bool


PRESETS = {
    "benchmark": ScoringPreset("benchmark", y_channel=True, extra_shave=0, quantize=False),
    "div2k": ScoringPreset("div2k", y_channel=False, extra_shave=6, quantize=False),
    "matlab": ScoringPreset("matlab", y_channel=True, extra_shave=0, quantize=True),
}


def canonical_name(dataset: str) -> str:
    """'Set14' -> 'set14', 'BSD100' -> 'b100': the key of the reference defaults."""
    key = re.sub(r"[^a-z0-9]", "", dataset.lower())
    return DATASET_ALIASES.get(key, key)


def default_preset(dataset: str) -> str:
    """The reference's preset for a dataset name: 'div2k' for DIV2K, else 'benchmark'."""
    return "div2k" if "div2k" in canonical_name(dataset) else "benchmark"


def get_preset(name: str) -> ScoringPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown protocol {name!r}, expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def is_integer_scale(scale: float) -> bool:
    return float(scale).is_integer()


def shave_pixels(scale: float, extra: int = 0) -> int:
    """Border pixels dropped: the scale (ceil for non-integer scales) plus `extra`."""
    return int(math.ceil(scale - 1e-9)) + int(extra)


def shave_for(scale: float, preset: ScoringPreset) -> int:
    """Border pixels dropped under a scoring preset."""
    return shave_pixels(scale, preset.extra_shave)


def format_scale(scale: float) -> str:
    """2.0 -> '2', 3.5 -> '3.5' (JSON keys, table headers, folder names)."""
    return f"{float(scale):g}"


# ---------------------------------------------------------------------------- LR making

def lr_size(hr_hw: Sequence[int], scale: float) -> tuple[int, int]:
    """The reference's LR size (h, w) for an HR size and scale: floor(H / s + 1e-9) per axis."""
    return (math.floor(hr_hw[0] / scale + 1e-9), math.floor(hr_hw[1] / scale + 1e-9))


def hr_size(lr_hw: Sequence[int], scale: float) -> tuple[int, int]:
    """The predicted HR grid (H, W) for an LR size: round(h * s) per axis (Python's round,
    as the reference), the output size every surface uses (`frontend.output_size`)."""
    return frontend.output_size(tuple(lr_hw), scale=scale)


def center_crop(img: np.ndarray, max_side: int) -> np.ndarray:
    """The central region of at most max_side x max_side of (H, W, C) (0: the whole image)."""
    if not max_side:
        return img
    h, w = img.shape[:2]
    ch, cw = min(h, max_side), min(w, max_side)
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y:y + ch, x:x + cw]


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
        raise ValueError(f"{name}: {hr.shape[0]} x {hr.shape[1]} is too small for x{scale:g}")
    gh, gw = hr_size((h, w), scale)
    gt = np.ascontiguousarray(hr[:gh, :gw])
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
    """A paired (HR, LR) -> (gt, predicted HR size (H, W)), as `sr-implicit-paired-cascaded`.

    The scale is H_hr // h_lr (it must equal `scale`); the model predicts
    (round(h*s), round(w*s)); gt is the HR cropped to that, and the caller crops
    the prediction to gt's size.
    """
    s = hr.shape[0] // lr.shape[0]
    sx = hr.shape[1] // lr.shape[1]
    if s != scale or sx != scale:
        raise errors.InputError(f"{name}: HR {hr.shape[0]} x {hr.shape[1]} and LR "
                                f"{lr.shape[0]} x {lr.shape[1]} make scale {s} (height) and "
                                f"{sx} (width), expected {scale:g} in both")
    out_hw = hr_size(lr.shape[:2], s)
    return hr[:out_hw[0], :out_hw[1]], out_hw


# ---------------------------------------------------------------------------- scoring

def score(pred: np.ndarray, gt: np.ndarray, scale: float, preset: ScoringPreset, *,
          with_ssim: bool = True) -> tuple[float, Optional[float]]:
    """(PSNR, SSIM or None) of a float [0, 1] prediction (H, W, 3) against a uint8 gt of
    one shape."""
    shave = shave_for(scale, preset)
    if preset.quantize:
        yp = matlab_resize.rgb2ycbcr_y(matlab_resize.im2uint8(pred)).astype(np.float64)
        yg = matlab_resize.rgb2ycbcr_y(gt).astype(np.float64)
        return score_y(yp, yg, shave, with_ssim=with_ssim)
    g = images.to_float(gt)
    p = metrics.psnr(pred, g, shave=shave, y_channel=preset.y_channel)
    s = metrics.ssim(pred, g, shave=shave, y_channel=preset.y_channel) if with_ssim else None
    return p, s


def score_y(sr_y: np.ndarray, gt_y: np.ndarray, shave: int, *, with_ssim: bool = True
            ) -> tuple[float, Optional[float]]:
    """(PSNR, SSIM or None) of two (H, W) Y images in [0, 255] (the `matlab` preset)."""
    ys, yg = np.asarray(sr_y, np.float64), np.asarray(gt_y, np.float64)
    p = metrics.psnr_gray(ys, yg, shave=shave)
    return p, (metrics.ssim_gray(ys, yg, shave=shave) if with_ssim else None)
