"""Image quality metrics with the reference's conventions.

PSNR follows the official `calc_psnr`: float predictions (clamped to [0, 1] by
the caller, not quantised), the difference optionally reduced to Y with
weights (65.738, 129.057, 25.064) / 256, `shave` pixels cut from each border.
"""

from __future__ import annotations

import numpy as np

Y_WEIGHTS = np.array([65.738, 129.057, 25.064], np.float64) / 256.0


def psnr(pred: np.ndarray, gt: np.ndarray, *, shave: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB of (H, W, 3) images in [0, 1].

    y_channel: measure on the Y difference (benchmark protocol); shave: border
    pixels dropped on every side (benchmark: scale; DIV2K: scale + 6).
    """
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 3:
        raise ValueError(f"psnr needs two (H, W, 3) images of one shape, got {pred.shape} "
                         f"and {gt.shape}")
    diff = pred - gt
    if y_channel:
        diff = diff @ Y_WEIGHTS
    if shave:
        if 2 * shave >= min(diff.shape[:2]):
            raise ValueError(f"shave={shave} leaves nothing of a {diff.shape[:2]} image")
        diff = diff[shave:-shave, shave:-shave]
    mse = float(np.mean(np.square(diff)))
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)
