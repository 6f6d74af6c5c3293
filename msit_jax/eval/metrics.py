"""Image quality metrics with the reference's conventions.

PSNR follows the official `calc_psnr`: float predictions (clamped to [0, 1] by
the caller, not quantised), the difference optionally reduced to Y with
weights (65.738, 129.057, 25.064) / 256, `shave` pixels cut from each border.

SSIM is the common definition of the SR literature (Wang et al. 2004 as in
MATLAB's `ssim_index.m` and BasicSR's `calculate_ssim`): an 11x11 Gaussian
window with sigma 1.5 (normalised), K1 = 0.01, K2 = 0.03, dynamic range
L = 255, statistics over "valid" windows only (no padding), mean of the SSIM
map; on the Y channel Y = 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in
[0, 1], so Y in [16, 235]), computed on the float image (not rounded, as the
PSNR), after shaving `shave` pixels from each border. The official MSIT code
reports no SSIM; its `utils.ssim` (RGB in [0, 1], zero-padded windows) is not
the definition papers print.
"""

from __future__ import annotations

import numpy as np

Y_WEIGHTS = np.array([65.738, 129.057, 25.064], np.float64) / 256.0

# BasicSR / MATLAB rgb2ycbcr Y for RGB in [0, 1]: Y in [16, 235].
YCBCR_Y = np.array([65.481, 128.553, 24.966], np.float64)
YCBCR_Y_OFFSET = 16.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


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


def _shave(x: np.ndarray, shave: int) -> np.ndarray:
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
    diff = _shave(diff, shave)
    mse = float(np.mean(np.square(diff)))
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def psnr_gray(pred: np.ndarray, gt: np.ndarray, *, data_range: float = 255.0,
              shave: int = 0) -> float:
    """PSNR in dB of two (H, W) images with peak `data_range` (e.g. uint8 Y)."""
    pred, gt = _check_pair(pred, gt, "psnr_gray", channels=False)
    diff = _shave(pred - gt, shave)
    mse = float(np.mean(np.square(diff)))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] -> (H, W) float64 Y in [16, 235] (MATLAB rgb2ycbcr, not rounded)."""
    img = np.asarray(img, np.float64)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects (H, W, 3), got shape {img.shape}")
    return img @ YCBCR_Y + YCBCR_Y_OFFSET


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian (size,); its outer product is MATLAB's fspecial('gaussian')."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (H, W) with g x g: (H - k + 1, W - k + 1)."""
    k = g.shape[0]
    h, w = x.shape
    rows = sum(g[i] * x[i:h - k + 1 + i, :] for i in range(k))
    return sum(g[i] * rows[:, i:w - k + 1 + i] for i in range(k))


def ssim_gray(pred: np.ndarray, gt: np.ndarray, *, data_range: float = 255.0,
              shave: int = 0) -> float:
    """Mean SSIM of two (H, W) images (11x11 Gaussian, sigma 1.5, valid windows).

    Both images (after shaving) must be at least 11x11.
    """
    pred, gt = _check_pair(pred, gt, "ssim_gray", channels=False)
    x, y = _shave(pred, shave), _shave(gt, shave)
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} after "
                         f"shaving, got {x.shape}")
    g = gaussian_window()
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mu_x * mu_x
    syy = _filter_valid(y * y, g) - mu_y * mu_y
    sxy = _filter_valid(x * y, g) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


def ssim(pred: np.ndarray, gt: np.ndarray, *, shave: int = 0, y_channel: bool = True) -> float:
    """SSIM of (H, W, 3) images in [0, 1] (float, not quantised).

    y_channel=True: on Y in [16, 235] (`rgb_to_y`), L = 255 (the SR-table SSIM).
    y_channel=False: the mean of the per-channel SSIMs of RGB * 255 (BasicSR's
    RGB convention).
    """
    pred, gt = _check_pair(pred, gt, "ssim")
    if y_channel:
        return ssim_gray(rgb_to_y(pred), rgb_to_y(gt), data_range=255.0, shave=shave)
    return float(np.mean([ssim_gray(pred[..., c] * 255.0, gt[..., c] * 255.0, data_range=255.0,
                                    shave=shave) for c in range(3)]))
