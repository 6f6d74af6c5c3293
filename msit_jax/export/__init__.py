"""Exports of a trained model and their runners.

    cli          msit-export (`python -m msit_jax.export`): stablehlo, onnx, pth, safetensors
    stablehlo    the StableHLO artifact runner (`load(folder)`; JAX only, no Flax)
    onnx_graph   the ONNX graph builder (`build_graph`; needs the model modules and onnx)
    onnx_runner  the ONNX runner (`load(path)`; onnxruntime only, no builder, no Flax)

The two runners are also `load_stablehlo` and `load_onnx` here. Everything is
imported on first use, so `import msit_jax.export` loads nothing, and a runner
never imports the exporter or the builder.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {  # name -> (module, its attribute)
    "load_stablehlo": ("msit_jax.export.stablehlo", "load"),
    "load_onnx": ("msit_jax.export.onnx_runner", "load"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'msit_jax.export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
