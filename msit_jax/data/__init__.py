"""Training data: HR image sources, the official batch protocol, the grain pipeline."""

from msit_jax.data.protocol import BatchPlanner, Protocol, make_example
from msit_jax.data.sources import (EmbeddedSource, FolderSource, ImageSource, TFDSSource,
                                   make_source)

__all__ = ["BatchPlanner", "EmbeddedSource", "FolderSource", "ImageSource", "Protocol",
           "TFDSSource", "make_example", "make_source"]
