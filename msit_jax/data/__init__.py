"""Training data: HR image sources, the official batch protocol, the grain pipeline.

Names are imported on first use, so `import msit_jax.data.protocol` (or a
source) does not import the others; the pipeline (`msit_jax.data.pipeline`)
needs grain and the TFDS builder tensorflow-datasets, both of the `train`
extra.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BatchPlanner": "msit_jax.data.protocol",
    "Protocol": "msit_jax.data.protocol",
    "make_example": "msit_jax.data.protocol",
    "EmbeddedSource": "msit_jax.data.sources",
    "FolderSource": "msit_jax.data.sources",
    "ImageSource": "msit_jax.data.sources",
    "TFDSSource": "msit_jax.data.sources",
    "make_source": "msit_jax.data.sources",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msit_jax.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
