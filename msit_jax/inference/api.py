"""The one-call API.

    from msit_jax import Upscaler

    up = Upscaler.from_pretrained("msit-lite")         # bundled weights, or any path
    big = up(Image.open("photo.png"), scale=3.5)        # PIL in, PIL out
    arr = up(uint8_array, size=(1080, 1920))            # uint8 in, uint8 out
    flt = up(float_array, scale=(2, 3), progress=True)  # float in, float out; a progress bar

`from_pretrained` folds RIMs and BatchNorms into plain convolutions
(`msit_jax.models.reparam.fold`): the deployment model, same outputs.
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections
import numpy as np

from msit_jax.inference import engine as inference
from msit_jax.io import pretrained
from msit_jax.models import reparam
from msit_jax.ops.runtime import RuntimeOptions
from msit_jax.inference.frontend import ImageRunner, Progress


class Upscaler(ImageRunner):
    """A ready model: `up(image, scale=s | (sy, sx))` or `up(image, size=(h, w))`.

    image: a PIL image, or an (H, W, 3) uint8 / float [0, 1] array; the result
    has the same type (see `msit_jax.serving`). chunk, method, runtime: see
    `msit_jax.inference.Engine`. self_ensemble: the mean over the 8
    flips/transposes of the input (EDSR's "+"; `msit_jax.ensemble`), 8x the work.
    """

    def __init__(self, model_cfg: ml_collections.ConfigDict, variables: Any, *,
                 chunk: Optional[int] = None, method: str = "auto",
                 runtime: Optional[RuntimeOptions] = None, self_ensemble: bool = False):
        self.engine = inference.Engine(model_cfg, variables, chunk, method, runtime,
                                         self_ensemble=self_ensemble)

    @classmethod
    def from_pretrained(cls, path: str, *, fold: bool = True, chunk: Optional[int] = None,
                        method: str = "auto", runtime: Optional[RuntimeOptions] = None,
                        self_ensemble: bool = False) -> "Upscaler":
        """Load weights from `path` and fold them (fold=False keeps the RIM /
        BatchNorm layout, same outputs, slower).

        path: an official .pth, a .safetensors file, a hub folder, a msit-jax
        checkpoint or training workdir, or the name of a bundled model
        (`msit_jax.weights.available()`, e.g. "msit-lite"), which is used only
        when no file or folder of that name exists: a real path always wins."""
        model_cfg, variables = pretrained.load(path)
        if fold:
            model_cfg, variables = reparam.fold(model_cfg, variables)
        return cls(model_cfg, variables, chunk=chunk, method=method, runtime=runtime,
                   self_ensemble=self_ensemble)

    @property
    def model_cfg(self) -> ml_collections.ConfigDict:
        return self.engine.model_cfg

    def upscale_array(self, lr: np.ndarray, out_hw: tuple[int, int], *, clamp: bool = True,
                      progress: Progress = False) -> np.ndarray:
        return self.engine(lr, out_hw, clamp=clamp, progress=progress)
