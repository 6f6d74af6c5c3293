"""Metric logging: JSONL (machine-readable) and TensorBoard event files.

WORKDIR/metrics.jsonl holds one JSON object per line:
  {"step": 100, "split": "train", "loss": ..., "lr": ..., "steps_per_sec": ..., ...}
  {"step": 500, "split": "val", "psnr_x2": ..., "val_psnr": ...}
TensorBoard files go to WORKDIR/tensorboard via tensorboardX (pure Python, no
TensorFlow; skipped with a log line if it is not installed). Viewing them
needs the `tensorboard` package, which training does not need
(requirements-tensorboard.txt; `tensorboard --logdir WORKDIR/tensorboard`).
On resume, records after the restored step (written by the interrupted run
past its last checkpoint) are dropped, so the log reads as one uninterrupted
run.

Every line is strict JSON: a NaN or infinite value is written as null.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping, Optional

log = logging.getLogger(__name__)

JSONL_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def finite_or_none(v: float) -> Optional[float]:
    """float(v), or None (JSON null) when it is NaN or infinite."""
    v = float(v)
    return v if math.isfinite(v) else None


def _clean(rec: dict) -> dict:
    return {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in rec.items()}


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics file (lines cut short by a crash are skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))  # also reads bare NaN of older files
            except json.JSONDecodeError:
                log.warning("%s: skipping an unreadable line (%.60s)", path, line.strip())
    return out


class MetricLogger:
    """Writes metrics of one process (pass enabled=False on all but process 0)."""

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, JSONL_FILE)
        self._tb = None
        if not enabled:
            return
        kept = [_clean(r) for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
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
