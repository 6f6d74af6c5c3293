"""Metric logging: JSONL (machine-readable) and TensorBoard event files.

WORKDIR/metrics.jsonl holds one JSON object per line:
  {"step": 100, "split": "train", "loss": ..., "lr": ..., "steps_per_sec": ..., ...}
  {"step": 500, "split": "val", "psnr_x2": ..., "val_psnr": ...}
TensorBoard files go to WORKDIR/tensorboard via tensorboardX (pure Python, no
TensorFlow); skipped with a log line if it is not installed. On resume, records
after the restored step (written by the interrupted run past its last
checkpoint) are dropped, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

log = logging.getLogger(__name__)

JSONL_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricLogger:
    """Writes metrics of one process (pass enabled=False on all but process 0)."""

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, JSONL_FILE)
        self._tb = None
        if not enabled:
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
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
        clean = {k: float(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
