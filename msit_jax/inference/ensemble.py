"""Geometric self-ensemble (EDSR's "+", BasicSR's `test_selfensemble`): the mean of
the predictions for the 8 flips and transposes of the input, each mapped back.

    sr = mean_over_transforms(predict, lr, (out_h, out_w))

`predict(lr, out_hw, progress)` is one model pass: lr (H, W, 3) -> (out_h, out_w, 3).
A transform that transposes the input also transposes the requested output size, so
non-square and anisotropic outputs (and the cell, which the model derives from the
two sizes) stay exact. It costs 8 passes, 8x the time of one.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from msit_jax.inference.frontend import Progress

N_TRANSFORMS = 8


class Transform(NamedTuple):
    """One element of the dihedral group of the square, as flips then a transpose."""

    flip_v: bool
    flip_h: bool
    transpose: bool

    def forward(self, img: np.ndarray) -> np.ndarray:
        """(H, W, C) -> the transformed image ((W, H, C) when transposing)."""
        if self.flip_v:
            img = img[::-1]
        if self.flip_h:
            img = img[:, ::-1]
        if self.transpose:
            img = img.transpose(1, 0, 2)
        return np.ascontiguousarray(img)

    def inverse(self, img: np.ndarray) -> np.ndarray:
        """Undo `forward` (the steps in reverse order; each is its own inverse)."""
        if self.transpose:
            img = img.transpose(1, 0, 2)
        if self.flip_h:
            img = img[:, ::-1]
        if self.flip_v:
            img = img[::-1]
        return img

    def size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The output size to request for the transformed input."""
        return (hw[1], hw[0]) if self.transpose else (hw[0], hw[1])


TRANSFORMS: tuple[Transform, ...] = tuple(
    Transform(bool(t & 1), bool(t & 2), bool(t & 4)) for t in range(N_TRANSFORMS))

Predict = Callable[[np.ndarray, tuple[int, int], Progress], np.ndarray]


def _pass_progress(progress: Progress, k: int) -> Progress:
    """Progress for pass k of 8: a callable sees (done, total) over all passes; a bar
    (progress=True) is drawn per pass, labelled by the caller's tqdm."""
    if not callable(progress):
        return progress

    def report(done: int, total: int) -> None:
        progress(k * total + done, N_TRANSFORMS * total)

    return report


def mean_over_transforms(predict: Predict, lr: np.ndarray, out_hw: tuple[int, int],
                         progress: Progress = False) -> np.ndarray:
    """The self-ensemble of `predict`: lr (H, W, C) -> (out_h, out_w, C) float32.

    Predictions are summed in a fixed order and divided once, so the result is
    deterministic; the caller clamps (averaging unclamped passes, as EDSR does)."""
    out_hw = (int(out_hw[0]), int(out_hw[1]))
    total = None
    for k, t in enumerate(TRANSFORMS):
        pred = predict(t.forward(lr), t.size(out_hw), _pass_progress(progress, k))
        pred = t.inverse(np.asarray(pred, np.float32))
        if pred.shape[:2] != out_hw:
            raise RuntimeError(f"self-ensemble pass {k} ({t}) returned {pred.shape[:2]}, "
                               f"not {out_hw}")
        if total is None:
            total = pred.copy()
        else:
            total += pred
    return total / np.float32(N_TRANSFORMS)
