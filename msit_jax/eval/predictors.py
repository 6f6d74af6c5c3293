"""What is evaluated: MSIT and the bicubic baselines behind one interface.

A predictor has a `name` (the table's row label) and maps a uint8 LR image to a
float prediction on the HR grid:

    pred(lr, out_hw) -> (out_h, out_w, 3) float32 in [0, 1]
    lr: (h, w, 3) uint8; out_hw: (H, W)

`BicubicYPredictor` (the published tables' bicubic rows) works on Y only and
makes its own LR from the HR Y; it sets `needs_hr_y` and implements `predict_y`
instead, and is scored by the `matlab` preset only.
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections
import numpy as np

from msit_jax import images
from msit_jax.eval import matlab_resize
from msit_jax.eval.protocol import DEGRADATIONS
from msit_jax.inference import api, frontend
from msit_jax.inference.engine import Engine
from msit_jax.ops.runtime import RuntimeOptions

MODELS = ("msit", "bicubic", "bicubic_y")


class Predictor:
    """The interface (see the module docstring); subclasses set `name`."""

    name: str = "predictor"
    needs_hr_y: bool = False  # True: call predict_y(gt, lr_hw, gray) instead

    def __call__(self, lr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def predict_y(self, gt: np.ndarray, lr_hw: tuple[int, int], gray: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{self.name} predicts RGB from an LR image")


class BicubicPredictor(Predictor):
    """The baseline row: bicubic upsampling of the uint8 LR (Pillow, or MATLAB's imresize)."""

    def __init__(self, kernel: str = "pillow"):
        if kernel not in DEGRADATIONS:
            raise ValueError(f"unknown bicubic kernel {kernel!r}")
        self.kernel = kernel
        self.name = "Bicubic" if kernel == "pillow" else "Bicubic (MATLAB)"

    def __call__(self, lr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 -> (H, W, 3) float32 in [0, 1]."""
        if self.kernel == "pillow":
            up = images.resize_bicubic(lr, out_hw)
        else:
            up = matlab_resize.imresize(lr, output_shape=out_hw)
        return images.to_float(up)


class BicubicYPredictor(Predictor):
    """The published tables' bicubic rows (SRCNN/VDSR code): Y only, in floating point.

    Y = rgb2ycbcr(HR) rounded to uint8 (a single-channel file, such as Set14's
    bridge, is its own Y: MATLAB reads it as 2-D and those scripts skip
    rgb2ycbcr); LR = MATLAB imresize of Y / 255 (float); SR = MATLAB imresize of
    that back to the HR size, quantised to uint8 (MATLAB's im2uint8). Scored by
    `matlab` only (it never sees an RGB LR).
    """

    name = "Bicubic (Y, published tables)"
    needs_hr_y = True

    def predict_y(self, gt: np.ndarray, lr_hw: tuple[int, int], gray: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
        """gt (H, W, 3) uint8 -> (SR Y, HR Y), both (H, W) uint8."""
        y = gt[..., 0].copy() if gray else matlab_resize.rgb2ycbcr_y(gt)
        lr = matlab_resize.imresize(y.astype(np.float64) / 255.0, output_shape=lr_hw)
        sr = matlab_resize.imresize(lr, output_shape=y.shape)
        return matlab_resize.im2uint8(sr), y


class MSITPredictor(Predictor):
    """MSIT through `msit_jax.inference.Engine` (encoder once, chunked queries).

    check_finite: raise NonFiniteError for a prediction with NaN/inf values
    (evaluation reports the image and goes on); False passes them through, so a
    training validation of a diverging model logs a NaN PSNR instead of stopping.
    `compiled_sizes` records the (LR, HR) sizes already called: the first call of
    each size includes JIT compilation. self_ensemble: the mean over the 8
    flips/transposes (`msit_jax.inference.ensemble`), 8x the work; the name gets a "+".
    """

    def __init__(self, model_cfg: ml_collections.ConfigDict, variables: Any,
                 chunk: Optional[int] = None, name: str = "MSIT", method: str = "auto",
                 runtime: Optional[Any] = None, check_finite: bool = True,
                 self_ensemble: bool = False):

        self.up = Engine(model_cfg, variables, chunk=chunk, method=method, runtime=runtime,
                         self_ensemble=self_ensemble)
        self.name = name + ("+" if self_ensemble else "")  # EDSR's convention: "EDSR+"
        self.check_finite = check_finite
        self.compiled_sizes: set[tuple[tuple[int, int], tuple[int, int]]] = set()

    def is_compiled(self, lr_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
        """Whether a call with these sizes runs without compiling first."""
        return (tuple(lr_hw), tuple(out_hw)) in self.compiled_sizes

    def __call__(self, lr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 -> clamped (H, W, 3) float32; NonFiniteError (check_finite) when
        the model output has NaN/inf values."""
        out = self.up(images.to_float(lr), out_hw, clamp=False)
        self.compiled_sizes.add((tuple(lr.shape[:2]), tuple(int(v) for v in out_hw)))
        if self.check_finite:
            frontend.check_finite(out)
        return np.clip(out, 0.0, 1.0)


def load_msit(checkpoint: str, *, fold: bool = True, chunk: Optional[int] = None,
              method: str = "auto", dtype: str = "float32", precision: str = "highest",
              fft_min_kernel: int = -1, quiet: bool = True,
              self_ensemble: bool = False) -> MSITPredictor:
    """An MSITPredictor from a msit-jax checkpoint dir or an official .pth (`api.load`,
    the loader of every surface); the load and the fold are timed on stderr unless
    `quiet` (`msit_jax.console.stage`)."""

    runtime = RuntimeOptions(precision, dtype, fft_min_kernel)
    model_cfg, variables = api.load(checkpoint, fold=fold, quiet=quiet)
    return MSITPredictor(model_cfg, variables, chunk, method=method, runtime=runtime,
                         self_ensemble=self_ensemble)


def make_predictor(cfg: ml_collections.ConfigDict, *, quiet: bool = True) -> Predictor:
    """The predictor an evaluation config asks for (`cfg.model`, see `runner.default_config`)."""
    if cfg.model == "bicubic":
        return BicubicPredictor(cfg.degradation)
    if cfg.model == "bicubic_y":
        return BicubicYPredictor()
    if cfg.model != "msit":
        raise ValueError(f"unknown model {cfg.model!r}, expected one of {MODELS}")
    if not cfg.checkpoint:
        raise ValueError("model 'msit' needs a checkpoint (a msit-jax checkpoint dir or an "
                         "official .pth); or use --model bicubic")
    return load_msit(cfg.checkpoint, fold=cfg.fold, chunk=cfg.chunk or None, method=cfg.method,
                     dtype=cfg.dtype, precision=cfg.precision,
                     fft_min_kernel=cfg.fft_min_kernel, quiet=quiet,
                     self_ensemble=cfg.get("self_ensemble", False))
