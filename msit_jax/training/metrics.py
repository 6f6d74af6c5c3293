"""Metric logging: JSONL (machine-readable) and TensorBoard event files.

WORKDIR/metrics.jsonl holds one JSON object per line:
  {"step": 100, "split": "train", "loss": ..., "lr": ..., "steps_per_sec": ..., ...}
  {"step": 500, "split": "val", "psnr_x2": ..., "val_psnr": ...}
TensorBoard files go to WORKDIR/tensorboard via tensorboardX (pure Python, no
TensorFlow; skipped with a log line if it is not installed). Viewing them
needs the `tensorboard` package, which training does not need
(pip install "msit-jax[tensorboard]"; `tensorboard --logdir WORKDIR/tensorboard`).
On resume, records after the restored step (written by the interrupted run
past its last checkpoint) are dropped, so the log reads as one uninterrupted
run. A metrics.jsonl with unreadable lines (not UTF-8, not JSON) is set aside
as `metrics.jsonl.corrupt-<time>` (bytes kept, one warning naming it) and its
readable records carry on in a new metrics.jsonl; a last line cut short by a
crash is only dropped.

Every line is strict JSON: a NaN or infinite value is written as null.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping, Optional

from msit_jax.io.workdir import read_text_lines, set_aside

log = logging.getLogger(__name__)

JSONL_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def finite_or_none(v: float) -> Optional[float]:
    """float(v), or None (JSON null) when it is NaN or infinite."""
    v = float(v)
    return v if math.isfinite(v) else None


def _step(rec: dict) -> float:
    """A record's step (a record without a readable one sorts after every step)."""
    step = rec.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


def _clean(rec: dict) -> dict:
    return {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in rec.items()}


def scan_jsonl(path: str) -> tuple[list[dict], list[str]]:
    """(the readable records of a metrics file, its problems): lines that are not UTF-8,
    not JSON or not a JSON object, each said as `line N: ...`. A last line cut short by a
    crash is not a problem (it is dropped). Never raises for the file's content."""
    if not os.path.exists(path):
        return [], []
    lines, not_utf8 = read_text_lines(path)
    problems = [f"line {n}: not UTF-8" for n in not_utf8]
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    out = []
    for i, (n, line) in enumerate(numbered):
        try:
            rec = json.loads(line)  # also reads bare NaN of older files
        except json.JSONDecodeError:
            if i == len(numbered) - 1 and not not_utf8:  # cut short by a crash
                log.warning("%s: skipping an unreadable last line (%.60s)", path, line.strip())
            else:
                problems.append(f"line {n}: not JSON")
            continue
        if not isinstance(rec, dict):
            problems.append(f"line {n}: not a JSON object")
            continue
        out.append(rec)
    return out, problems


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics file; unreadable lines (a line cut short by a crash,
    bytes that are not UTF-8 or not JSON) are skipped, with a warning naming the file."""
    recs, problems = scan_jsonl(path)
    if problems:
        log.warning("%s: skipped %d unreadable line(s) (%s)", path, len(problems),
                    "; ".join(problems[:3]))
    return recs


class MetricLogger:
    """Writes metrics of one process (pass enabled=False on all but process 0)."""

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, JSONL_FILE)
        self._tb = None
        if not enabled:
            return
        recs, problems = scan_jsonl(self.path)
        if problems:  # set aside (bytes kept); the readable records carry on below
            set_aside(self.path, f"{len(problems)} bad line(s), first {problems[0]}")
        kept = [_clean(r) for r in recs if _step(r) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        os.replace(tmp, self.path)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.info("tensorboardX is not installed: no TensorBoard files (metrics.jsonl "
                         "has everything)")
            else:
                self._tb = SummaryWriter(os.path.join(workdir, TB_DIR),
                                         purge_step=resume_step + 1)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: finite_or_none(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "split": split, **clean},
                               allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
