"""MATLAB-compatible bicubic `imresize` and `rgb2ycbcr`.

The benchmark LR files (`LR_bicubic/X{s}`) and the bicubic rows of the
published SR tables were made with MATLAB's `imresize(img, 1/s, 'bicubic')`,
which differs from Pillow's bicubic (used by the MSIT reference to make LR on
the fly): MATLAB's cubic kernel has a = -0.5 (Pillow: -0.5 too, but different
support/normalisation at borders), mirrors the image at its borders
("symmetric" padding), widens the kernel by 1/scale when shrinking
(antialiasing), resizes one axis at a time (the axis with the smaller scale
first) and, for uint8 images, rounds to uint8 after *each* pass.

This is an independent implementation of the algorithm described by MATLAB's
`imresize.m` (`contributions`, `cubic`, `resizeAlongDim`):

  for output index x = 1..out (1-based), u = x / scale + 0.5 * (1 - 1 / scale)
  taps left = floor(u - width / 2) + (0 .. ceil(width) + 1)
  weights h(u - tap), normalised to sum 1 per output pixel,
  h(t) = cubic(t) (upscaling) or scale * cubic(scale * t) (downscaling, width 4 / scale)
  taps outside 1..n are mirrored: [1..n, n..1] repeated (the edge pixel repeats).

Images are numpy (H, W) or (H, W, C); uint8 in -> uint8 out (round half away from
zero and saturate, as MATLAB), float in -> float64 out.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np

# MATLAB rgb2ycbcr: Y = 16 + (65.481 R + 128.553 G + 24.966 B) for R, G, B in [0, 1].
from msit_jax.eval.color import YCBCR_Y, YCBCR_Y_OFFSET

KERNEL_WIDTH = 4.0  # support of the cubic kernel, in input pixels (upscaling)


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'), elementwise."""
    ax = np.abs(np.asarray(x, np.float64))
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0)))


def contributions(in_len: int, out_len: int, scale: float, antialias: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based source indices of one axis: both (out_len, taps).

    Row o holds the input pixels (already mirrored into [0, in_len)) and the
    normalised weights that make output pixel o. Tap columns that are zero for
    every output pixel are dropped, as MATLAB does.
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"axis lengths must be positive, got {in_len} -> {out_len}")
    if scale < 1.0 and antialias:
        def kernel(t):
            return scale * cubic(scale * t)
        width = KERNEL_WIDTH / scale
    else:
        kernel, width = cubic, KERNEL_WIDTH
    x = np.arange(1, out_len + 1, dtype=np.float64)  # 1-based output positions
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # matching 1-based input position
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based
    w = kernel(u[:, None] - idx)
    w = w / np.sum(w, axis=1, keepdims=True)
    # Symmetric padding: index sequence 1..n, n..1 repeated; the edge pixel repeats.
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx0 = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(w != 0, axis=0)
    return w[:, keep], idx0[:, keep]


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8: round half away from zero, saturate to [0, 255]."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _resize_axis(img: np.ndarray, axis: int, out_len: int, scale: float,
                 antialias: bool) -> np.ndarray:
    w, idx = contributions(img.shape[axis], out_len, scale, antialias)
    src = np.moveaxis(img, axis, 0).astype(np.float64)  # (n, ...)
    out = np.zeros((out_len,) + src.shape[1:], np.float64)
    extra = (slice(None),) + (None,) * (src.ndim - 1)
    for k in range(w.shape[1]):  # weighted sum over taps, in MATLAB's tap order
        out += w[extra + (k,)] * src[idx[:, k]]
    out = np.moveaxis(out, 0, axis)
    # MATLAB's resize kernel returns the input class: uint8 images are rounded
    # between the two passes, not only at the end.
    return _round_uint8(out) if img.dtype == np.uint8 else out


def output_size(in_hw: Sequence[int], scale: Union[float, Sequence[float]]) -> tuple[int, int]:
    """MATLAB's output size for a scale factor: ceil(scale * size) per axis."""
    sy, sx = (scale, scale) if np.isscalar(scale) else scale
    return int(math.ceil(sy * in_hw[0])), int(math.ceil(sx * in_hw[1]))


def imresize(img: np.ndarray, scale: Optional[Union[float, Sequence[float]]] = None, *,
             output_shape: Optional[Sequence[int]] = None, antialias: bool = True
             ) -> np.ndarray:
    """MATLAB `imresize(img, scale, 'bicubic')` or `imresize(img, [h w], 'bicubic')`.

    img: (H, W) or (H, W, C), uint8 or float. Give `scale` (a number or (sy, sx);
    output size ceil(scale * size)) or `output_shape` (h, w; the scales are then
    h / H and w / W, as MATLAB derives them). Returns (h, w[, C]); uint8 input
    gives uint8 (rounded after each axis pass, as MATLAB), float gives float64.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects (H, W) or (H, W, C), got shape {img.shape}")
    if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"imresize supports uint8 and float images, got {img.dtype}")
    in_hw = img.shape[:2]
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale and output_shape")
    if output_shape is not None:
        out_hw = (int(output_shape[0]), int(output_shape[1]))
        if min(out_hw) < 1:
            raise ValueError(f"output_shape must be positive, got {output_shape}")
        scales = (out_hw[0] / in_hw[0], out_hw[1] / in_hw[1])
    else:
        scales = (float(scale), float(scale)) if np.isscalar(scale) else tuple(map(float, scale))
        if min(scales) <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        out_hw = output_size(in_hw, scales)
    # MATLAB resizes the dimension with the smallest scale first (stable order).
    order = sorted(range(2), key=lambda d: scales[d])
    out = img
    for d in order:
        out = _resize_axis(out, d, out_hw[d], scales[d], antialias)
    return out


def rgb2ycbcr_y(img: np.ndarray) -> np.ndarray:
    """Y of MATLAB's `rgb2ycbcr`: (H, W, 3) -> (H, W).

    uint8 in: Y = 65.481/255 R + 128.553/255 G + 24.966/255 B + 16, rounded to
    uint8 (values in [16, 235]), exactly as MATLAB does for uint8 images.
    float in ([0, 1]): Y in [16/255, 235/255], float64, not rounded.
    """
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"rgb2ycbcr_y expects (H, W, 3), got shape {img.shape}")
    if img.dtype == np.uint8:
        x = img.astype(np.float64)
        y = (x[..., 0] * (YCBCR_Y[0] / 255.0) + x[..., 1] * (YCBCR_Y[1] / 255.0)
             + x[..., 2] * (YCBCR_Y[2] / 255.0) + YCBCR_Y_OFFSET)
        return _round_uint8(y)
    x = img.astype(np.float64)
    return (x @ YCBCR_Y + YCBCR_Y_OFFSET) / 255.0


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W down to multiples of an integer scale (top-left anchored)."""
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale]


def im2uint8(img: np.ndarray) -> np.ndarray:
    """MATLAB's `im2uint8` / `uint8(x * 255)` for a float image in [0, 1]: x * 255 in
    float64, rounded half away from zero, saturated.

    Not `msit_jax.images.to_uint8` (half to even): the two agree on float32
    input, but the published tables' float64 Y pipeline (`BicubicYPredictor`)
    lands on exact ties, which MATLAB rounds up.
    """
    return _round_uint8(np.asarray(img, np.float64) * 255.0)
