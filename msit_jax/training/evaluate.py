"""Validation PSNR and the end-of-run demo (MSIT vs bicubic table, side-by-side PNG).

Protocol (DESIGN.md section 6): for scale s, h = floor(H / s + 1e-9), the HR
image is cropped to round(h * s) from the top-left and the LR input is its
Pillow bicubic resize. PSNR on RGB (or Y with y_channel) with
shave = ceil(s) + shave_extra border pixels (benchmarks: 0 extra; DIV2K: 6).
The bicubic baseline is Pillow bicubic upscaling of the same uint8 LR.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from msit_jax.data.sources import ImageSource
from msit_jax.eval.evaluation import degrade, shave_pixels
from msit_jax.images import resize_bicubic, save_png, to_float
from msit_jax.inference import Upscaler
from msit_jax.eval.metrics import psnr


def eval_pair(hr: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(lr, hr_crop) uint8 for one scale, as the reference's test protocol."""
    lr, crop = degrade(hr, scale)
    return lr, np.ascontiguousarray(crop)


def center_crop(img: np.ndarray, max_side: int) -> np.ndarray:
    """The central region of at most max_side x max_side (0: the whole image)."""
    if not max_side:
        return img
    h, w = img.shape[:2]
    ch, cw = min(h, max_side), min(w, max_side)
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y:y + ch, x:x + cw]


def bicubic_upscale(lr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Pillow bicubic upscaling of a uint8 LR image -> float [0, 1]."""
    return to_float(resize_bicubic(lr, out_hw))


class EvaluationAborted(Exception):
    """`evaluate` stopped early because `should_stop()` became true (e.g. SIGTERM)."""


def evaluate(upscaler: Optional[Upscaler], source: ImageSource, scales: Sequence[float], *,
             max_images: int = 0, max_side: int = 0, shave_extra: int = 0,
             y_channel: bool = False, bicubic: bool = False,
             should_stop: Optional[Callable[[], bool]] = None
             ) -> dict[float, dict[str, float]]:
    """Mean PSNR per scale: {scale: {'msit': dB, 'bicubic': dB}} (keys present as requested).

    should_stop: polled before each image; EvaluationAborted when it returns True.
    """
    n = len(source) if not max_images else min(max_images, len(source))
    out = {}
    for s in scales:
        acc: dict[str, list[float]] = {}
        for i in range(n):
            if should_stop is not None and should_stop():
                raise EvaluationAborted("evaluation stopped early")
            lr, hr = eval_pair(center_crop(source[i], max_side), s)
            gt = to_float(hr)
            kw = dict(shave=shave_pixels(s, shave_extra), y_channel=y_channel)
            if upscaler is not None:
                acc.setdefault("msit", []).append(psnr(upscaler(to_float(lr), hr.shape[:2]), gt, **kw))
            if bicubic:
                acc.setdefault("bicubic", []).append(psnr(bicubic_upscale(lr, hr.shape[:2]), gt, **kw))
        out[float(s)] = {k: float(np.mean(v)) for k, v in acc.items()}
    return out


def format_table(results: dict[float, dict[str, float]], title: str = "") -> str:
    """A plain-text table: scale | MSIT | bicubic | gain."""
    lines = [title] if title else []
    lines.append(f"{'scale':>6} | {'MSIT (dB)':>9} | {'bicubic (dB)':>12} | {'gain (dB)':>9}")
    lines.append("-" * len(lines[-1]))
    for s, r in results.items():
        m, b = r.get("msit", float("nan")), r.get("bicubic", float("nan"))
        lines.append(f"{'x%g' % s:>6} | {m:9.2f} | {b:12.2f} | {m - b:+9.2f}")
    return "\n".join(lines)


def side_by_side(upscaler: Upscaler, hr_image: np.ndarray, scale: float, path: str,
                 window: int = 192) -> str:
    """Write a PNG of [LR (nearest) | bicubic | MSIT | HR] over a central HR window."""
    lr, hr = eval_pair(hr_image, scale)
    size = hr.shape[:2]
    panels = [
        ("LR x%g (nearest)" % scale,
         np.asarray(Image.fromarray(lr).resize(size[::-1], Image.NEAREST))),
        ("bicubic", resize_bicubic(lr, size)),
        ("MSIT", np.round(upscaler(to_float(lr), size) * 255).astype(np.uint8)),
        ("HR", hr),
    ]
    crops = [(name, center_crop(img, window)) for name, img in panels]
    ph, pw = crops[0][1].shape[:2]
    gap, head = 4, 16
    canvas = Image.new("RGB", (len(crops) * pw + (len(crops) - 1) * gap, ph + head), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (name, img) in enumerate(crops):
        x = k * (pw + gap)
        canvas.paste(Image.fromarray(np.ascontiguousarray(img)), (x, head))
        draw.text((x + 2, 2), name, fill="black")
    save_png(path, np.asarray(canvas))
    return path
