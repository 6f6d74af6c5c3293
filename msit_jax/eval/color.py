"""Luma constants and RGB -> Y shared by the metrics and the MATLAB resize.

Two different Y definitions are in use, on purpose:

  * `Y_WEIGHTS` (65.738, 129.057, 25.064) / 256: the official MSIT `calc_psnr`
    weights the RGB *difference* with these (no offset), for PSNR on Y;
  * `YCBCR_Y` (65.481, 128.553, 24.966) and offset 16: MATLAB's `rgb2ycbcr`
    (ITU-R BT.601, studio range), Y = 16 + YCBCR_Y . RGB for RGB in [0, 1], so Y
    in [16, 235]; the SR tables' SSIM and the `matlab` preset use it.
"""

from __future__ import annotations

import numpy as np

Y_WEIGHTS = np.array([65.738, 129.057, 25.064], np.float64) / 256.0

YCBCR_Y = np.array([65.481, 128.553, 24.966], np.float64)
YCBCR_Y_OFFSET = 16.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] -> (H, W) float64 Y in [16, 235] (MATLAB rgb2ycbcr, not rounded)."""
    img = np.asarray(img, np.float64)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects (H, W, 3), got shape {img.shape}")
    return img @ YCBCR_Y + YCBCR_Y_OFFSET
