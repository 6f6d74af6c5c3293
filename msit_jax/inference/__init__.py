"""The running model: one front door for every surface that upscales images.

    engine    Engine: encoder once per image, chunked (or grid) decoding, tiling
    frontend  image types, output sizes, scale/size checks (no Flax: the exported
              runners use it too)
    api       Upscaler.from_pretrained(...): the Python API
    cli       msit-upscale (`python -m msit_jax.inference`)

Submodules are imported on first use, so `msit_jax.inference.frontend` can be used
without importing Flax or the model.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Upscaler": "msit_jax.inference.api", "Engine": "msit_jax.inference.engine"}

__all__ = ["Engine", "Upscaler"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msit_jax.inference' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
