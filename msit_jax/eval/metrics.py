"""Image quality metrics with the reference's conventions.

PSNR follows the official `calc_psnr`: float predictions (clamped to [0, 1] by
the caller, not quantised), the difference optionally reduced to Y with
`color.Y_WEIGHTS`, `shave` pixels cut from each border.

SSIM is the common definition of the SR literature (Wang et al. 2004 as in
MATLAB's `ssim_index.m` and BasicSR's `calculate_ssim`): an 11x11 Gaussian
window with sigma 1.5 (normalised), K1 = 0.01, K2 = 0.03, dynamic range
L = 255, population (not sample) covariances, statistics over "valid" windows
only (no padding), mean of the SSIM map. That is scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`: its Gaussian is truncated at
3.5 sigma (11 taps) and it averages the map without the window-radius border,
i.e. over the valid windows. On the Y channel Y = 16 + 65.481 R + 128.553 G +
24.966 B (R, G, B in [0, 1], so Y in [16, 235]; `color.rgb_to_y`), computed on
the float image (not rounded, as the PSNR), after shaving `shave` pixels from
each border. The official MSIT code reports no SSIM; its `utils.ssim` (RGB in
[0, 1], zero-padded windows) is not the definition papers print.

Images are numpy arrays: (H, W, 3) RGB or (H, W) single-channel.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

from msit_jax.eval.color import Y_WEIGHTS, rgb_to_y

SSIM_WINDOW = 11  # what sigma 1.5 truncated at 3.5 sigma gives in scikit-image
SSIM_SIGMA = 1.5


def _check_pair(pred: np.ndarray, gt: np.ndarray, name: str, channels: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    ok = pred.ndim == 3 and pred.shape[-1] == 3 if channels else pred.ndim == 2
    if pred.shape != gt.shape or not ok:
        want = "(H, W, 3)" if channels else "(H, W)"
        raise ValueError(f"{name} needs two {want} images of one shape, got {pred.shape} "
                         f"and {gt.shape}")
    return pred, gt


def shave_border(x: np.ndarray, shave: int) -> np.ndarray:
    """x (H, W[, C]) without `shave` pixels on every side; ValueError if nothing is left."""
    shave = int(shave)
    if shave < 0:
        raise ValueError(f"shave must be >= 0, got {shave}")
    if shave:
        if 2 * shave >= min(x.shape[:2]):
            raise ValueError(f"shave={shave} leaves nothing of a {x.shape[:2]} image")
        x = x[shave:-shave, shave:-shave]
    return x


def psnr(pred: np.ndarray, gt: np.ndarray, *, shave: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB of (H, W, 3) images in [0, 1].

    y_channel: measure on the Y difference (benchmark protocol); shave: border
    pixels dropped on every side (benchmark: scale; DIV2K: scale + 6).
    """
    pred, gt = _check_pair(pred, gt, "psnr")
    diff = pred - gt
    if y_channel:
        diff = diff @ Y_WEIGHTS
    diff = shave_border(diff, shave)
    mse = float(np.mean(np.square(diff)))
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def psnr_gray(pred: np.ndarray, gt: np.ndarray, *, data_range: float = 255.0,
              shave: int = 0) -> float:
    """PSNR in dB of two (H, W) images with peak `data_range` (e.g. uint8 Y)."""
    pred, gt = _check_pair(pred, gt, "psnr_gray", channels=False)
    diff = shave_border(pred - gt, shave)
    mse = float(np.mean(np.square(diff)))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)


def _ssim(x: np.ndarray, y: np.ndarray, data_range: float, channel_axis=None) -> float:
    if min(x.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} after "
                         f"shaving, got {x.shape[:2]}")
    return float(structural_similarity(x, y, gaussian_weights=True, sigma=SSIM_SIGMA,
                                       use_sample_covariance=False, data_range=data_range,
                                       channel_axis=channel_axis))


def ssim_gray(pred: np.ndarray, gt: np.ndarray, *, data_range: float = 255.0,
              shave: int = 0) -> float:
    """Mean SSIM of two (H, W) images (11x11 Gaussian, sigma 1.5, valid windows).

    Both images (after shaving) must be at least 11x11.
    """
    pred, gt = _check_pair(pred, gt, "ssim_gray", channels=False)
    return _ssim(shave_border(pred, shave), shave_border(gt, shave), data_range)


def ssim(pred: np.ndarray, gt: np.ndarray, *, shave: int = 0, y_channel: bool = True) -> float:
    """SSIM of (H, W, 3) images in [0, 1] (float, not quantised).

    y_channel=True: on Y in [16, 235] (`color.rgb_to_y`), L = 255 (the SR-table
    SSIM). y_channel=False: the mean of the per-channel SSIMs of RGB * 255
    (BasicSR's RGB convention).
    """
    pred, gt = _check_pair(pred, gt, "ssim")
    if y_channel:
        return ssim_gray(rgb_to_y(pred), rgb_to_y(gt), data_range=255.0, shave=shave)
    return _ssim(shave_border(pred * 255.0, shave), shave_border(gt * 255.0, shave), 255.0,
                 channel_axis=-1)
