"""Training: train state, LR schedule, sharded train step, checkpoints, stage-2 init,
metrics, evaluation, and the loop (`train_and_evaluate`).

`train_and_evaluate` and `TrainResult` are imported on first use: importing a
light submodule (`msit_jax.training.config` from a config file, `.state` and
`.step` for lowering) does not import the loop and its input pipeline (grain,
of the `train` extra).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"TrainResult": "msit_jax.training.loop",
         "train_and_evaluate": "msit_jax.training.loop"}

__all__ = ["TrainResult", "train_and_evaluate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msit_jax.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
