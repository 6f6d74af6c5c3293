"""msit-jax: the Multi-Scale Implicit Transformer (MSIT) for arbitrary-scale SR in JAX/Flax.

Top-level names are imported lazily, so light modules (`msit_jax.geometry`,
`msit_jax.inference.frontend`, the exported-artifact runner
`msit_jax.export.stablehlo`) can be used without importing Flax or the model.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MSIT": "msit_jax.models.model",
    "build_model": "msit_jax.models.model",
    "model_config": "msit_jax.models.config",
    "tiny_model_config": "msit_jax.models.config",
    "Upscaler": "msit_jax.inference.api",
}

__all__ = ["MSIT", "Upscaler", "build_model", "model_config", "tiny_model_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msit_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
