"""Evaluation outputs: Markdown and plain tables, JSON, the PSNR-vs-scale plot, the
side-by-side PNG of the training demo, and the checks run before any work
(writable outputs, matplotlib present)."""

from __future__ import annotations

import json
import math
import os
import re
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from msit_jax import console, errors, images
from msit_jax.eval.protocol import center_crop, degrade, format_scale

if TYPE_CHECKING:  # runner imports this module; the types only are needed here
    from msit_jax.eval.predictors import Predictor
    from msit_jax.eval.runner import Results



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


def require_matplotlib(flag: str = "--plot") -> None:
    """UsageError (exit 2) naming the plot extra unless matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise errors.UsageError(f"{flag} needs matplotlib, an optional dependency: "
                                f"{console.install_hint('plot')}") from None


# ---------------------------------------------------------------------------- evaluate.py

def results_to_json(results: "Results", baseline: Optional["Results"] = None) -> dict[str, Any]:
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


def json_safe(x: Any) -> Any:
    """NaN/inf floats -> None (null), recursively: the file stays strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path: str, results: "Results", baseline: Optional["Results"] = None) -> None:
    """Write the results (atomically: a failed write leaves no partial file)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(json_safe(results_to_json(results, baseline)), f, indent=2,
                      allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def markdown_table(rows: Sequence[tuple[str, "Results"]], scales: Sequence[float]) -> str:
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
                ssim = f"{r.ssim:.4f}" if r.ssim is not None else "-"
                cells.append(f"{r.psnr:.2f} / {ssim}{mark}")
            lines.append(f"| {method} | {ds} | " + " | ".join(cells) + " |")
    if dagger:
        lines.append("")
        lines.append("† LR made on the fly (--degradation); the reference reads "
                     "LR_bicubic/X{s} files here, which were not found.")
    return "\n".join(lines)


def plot_psnr_vs_scale(curves: Sequence[tuple[str, dict[float, float]]], dataset: str,
                       path: str) -> None:
    """PSNR (dB) against scale for each (label, {scale: psnr}) curve; saved to `path`."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# ---------------------------------------------------------------------------- training demo

def demo_table(results: dict[float, dict[str, float]], title: str = "") -> str:
    """A plain-text table from {scale: {'msit': dB, 'bicubic': dB}}: scale | MSIT | bicubic |
    gain."""
    lines = [title] if title else []
    lines.append(f"{'scale':>6} | {'MSIT (dB)':>9} | {'bicubic (dB)':>12} | {'gain (dB)':>9}")
    lines.append("-" * len(lines[-1]))
    for s, r in results.items():
        m, b = r.get("msit", float("nan")), r.get("bicubic", float("nan"))
        lines.append(f"{'x%g' % s:>6} | {m:9.2f} | {b:12.2f} | {m - b:+9.2f}")
    return "\n".join(lines)


def side_by_side(predictor: "Predictor", baseline: "Predictor", hr_image: np.ndarray,
                 scale: float, path: str, window: int = 192) -> str:
    """Write a PNG of [LR (nearest) | baseline | model | HR] over a central HR window of
    an (H, W, 3) uint8 image; returns `path`."""
    lr, hr = degrade(hr_image, scale)
    size = hr.shape[:2]
    panels = [
        ("LR x%g (nearest)" % scale,
         np.asarray(Image.fromarray(lr).resize(size[::-1], Image.NEAREST))),
        (baseline.name.lower(), images.to_uint8(baseline(lr, size))),
        (predictor.name, images.to_uint8(predictor(lr, size))),
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
    images.save_png(path, np.asarray(canvas))
    return path
