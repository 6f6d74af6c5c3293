"""The one-call API, and the one loader every surface uses.

    from msit_jax import Upscaler

    up = Upscaler.from_pretrained("msit-lite")         # bundled weights, or any path
    big = up(Image.open("photo.png"), scale=3.5)        # PIL in, PIL out
    arr = up(uint8_array, size=(1080, 1920))            # uint8 in, uint8 out
    flt = up(float_array, scale=(2, 3), progress=True)  # float in, float out; a progress bar
    huge = up(arr, size=(4100, 4100), tile="auto", max_memory_gb=2)  # within a budget

`from_pretrained` folds RIMs and BatchNorms into plain convolutions
(`msit_jax.models.reparam.fold`): the deployment model, same outputs. With a
memory budget (max_memory_gb) every call is checked against it before any work
(`msit_jax.inference.budget`, the same checks and messages as msit-upscale), and
tile="auto" tiles the encoder when its estimate does not fit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import ml_collections
import numpy as np

from msit_jax import console
from msit_jax.inference import budget, tiling
from msit_jax.inference.engine import Engine, Stage
from msit_jax.inference.frontend import ImageRunner, Progress
from msit_jax.io import pretrained
from msit_jax.models import reparam
from msit_jax.ops.runtime import RuntimeOptions

Tile = Union[str, int]  # "auto" or a tile side (0: the whole image)


def load(path: str, model_cfg: Optional[ml_collections.ConfigDict] = None, *,
         fold: bool = True, quiet: bool = True, label: Optional[str] = None
         ) -> tuple[ml_collections.ConfigDict, Any]:
    """Weights from `path` (anything `pretrained.load` reads, bundled names included)
    -> (model_cfg, variables), folded unless fold=False. model_cfg: the config to read
    the weights with (`pretrained.load`; None: the one the checkpoint records). The
    load ('load LABEL', LABEL defaulting to the path) and the fold ('fold') are timed
    stages on stderr unless `quiet`."""
    with console.stage(f"load {label or path}", quiet=quiet):
        model_cfg, variables = pretrained.load(path, model_cfg)
    if fold:
        with console.stage("fold", quiet=quiet):
            model_cfg, variables = reparam.fold(model_cfg, variables)
    return model_cfg, variables


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs: tile (the encoder's LR tile; 0: the whole image), grid (the
    grid decoder; tiles never use it), estimate (`budget.memory_estimate`, bytes), and
    the model config (the tile's halo)."""

    tile: int
    grid: bool
    estimate: dict
    model_cfg: ml_collections.ConfigDict


class Upscaler(ImageRunner):
    """A ready model: `up(image, scale=s | (sy, sx))` or `up(image, size=(h, w))`.

    image: a PIL image, or an (H, W, 3) uint8 / float [0, 1] array; the result
    has the same type (see `msit_jax.inference.frontend`). chunk, method, runtime:
    see `msit_jax.inference.engine.Engine`. tile: "auto" (tile the encoder only when
    its estimate exceeds max_memory_gb) or an LR tile side (0: never tile).
    max_memory_gb: the budget every call is checked against (None: no checks, and
    "auto" never tiles). Both can be overridden per call: `up(img, size=..., tile=...,
    max_memory_gb=...)`. self_ensemble: the mean over the 8 flips/transposes of the
    input (EDSR's "+"; `msit_jax.inference.ensemble`), 8x the work.
    """

    def __init__(self, model_cfg: ml_collections.ConfigDict, variables: Any, *,
                 chunk: Optional[int] = None, method: str = "auto",
                 runtime: Optional[RuntimeOptions] = None, self_ensemble: bool = False,
                 tile: Tile = "auto", max_memory_gb: Optional[float] = None):
        self.tile = budget.parse_tile(tile, model_cfg)
        if max_memory_gb is not None:
            budget.budget_bytes(max_memory_gb)  # refused now rather than at the first call
        self.max_memory_gb = max_memory_gb
        self.engine = Engine(model_cfg, variables, chunk, method, runtime,
                             self_ensemble=self_ensemble)

    @classmethod
    def from_pretrained(cls, path_or_name: str, *, fold: bool = True,
                        chunk: Optional[int] = None, tile: Tile = "auto",
                        max_memory_gb: Optional[float] = None, method: str = "auto",
                        runtime: Optional[RuntimeOptions] = None, self_ensemble: bool = False,
                        quiet: bool = True, label: Optional[str] = None) -> "Upscaler":
        """Load weights from `path_or_name` and fold them (fold=False keeps the RIM /
        BatchNorm layout, same outputs, slower); the other settings: see the class.

        path_or_name: an official .pth, a .safetensors file, a hub folder, a msit-jax
        checkpoint or training workdir, or the name of a bundled model
        (`msit_jax.weights.available()`, e.g. "msit-lite"), which is used only
        when no file or folder of that name exists: a real path always wins.
        quiet=False times the load and the fold on stderr (`load`; label names it)."""
        model_cfg, variables = load(path_or_name, fold=fold, quiet=quiet, label=label)
        return cls(model_cfg, variables, chunk=chunk, method=method, runtime=runtime,
                   self_ensemble=self_ensemble, tile=tile, max_memory_gb=max_memory_gb)

    @property
    def model_cfg(self) -> ml_collections.ConfigDict:
        return self.engine.model_cfg

    @property
    def chunk(self) -> int:
        """Queries per decoder call."""
        return self.engine.chunk

    @property
    def self_ensemble(self) -> bool:
        return self.engine.self_ensemble

    def plan(self, in_hw: tuple[int, int], out_hw: tuple[int, int], *,
             tile: Optional[Tile] = None, max_memory_gb: Optional[float] = None,
             name: str = "image", what: Optional[str] = None, decoder: bool = True) -> Plan:
        """How an in_hw -> out_hw (H, W) call would run, checked against the budget
        (`budget.check_decoder` and `budget.check`: OverBudget, a ResourceError, naming
        the part over it) when there is one. tile, max_memory_gb: this call's (None:
        the upscaler's); name, what: the image and the size request in messages;
        decoder=False leaves out the decoder's check (a surface that checked its chunk
        once for the model)."""
        tile = budget.parse_tile(self.tile if tile is None else tile, self.model_cfg)
        gb = self.max_memory_gb if max_memory_gb is None else max_memory_gb
        auto = tile == "auto"
        if auto:
            tile = 0 if gb is None else budget.auto_tile(self.model_cfg, in_hw,
                                                         budget.budget_bytes(gb))
        if gb is None:
            est = budget.memory_estimate(self.model_cfg, in_hw, out_hw, self.chunk, tile,
                                         self.self_ensemble)
        else:
            if decoder:
                budget.check_decoder(self.model_cfg, self.chunk, gb)
            est = budget.check(self.model_cfg, in_hw, out_hw, self.chunk, tile, gb,
                               auto=auto, self_ensemble=self.self_ensemble, name=name,
                               what=what)
        tile = tile if tiling.tiled(in_hw, tile) else 0
        return Plan(tile=tile, grid=self.engine.uses_grid(in_hw, out_hw, tile),
                    estimate=est, model_cfg=self.model_cfg)

    def encode(self, lr: np.ndarray) -> Any:
        """The untiled encoder alone on one (H, W, 3) [0, 1] image (to time it, say):
        (feat_q, feat_v), each (1, H, W, dim), on the device."""
        return self.engine.features(lr)[1]

    def upscale_array(self, lr: np.ndarray, out_hw: tuple[int, int], *, clamp: bool = True,
                      progress: Progress = False, tile: Optional[Tile] = None,
                      max_memory_gb: Optional[float] = None, stage: Stage = None,
                      plan: Optional[Plan] = None) -> np.ndarray:
        """lr (H, W, 3) float32 [0, 1] -> (out_h, out_w, 3) float32, as `plan` says (None:
        `self.plan(...)` with this call's tile and max_memory_gb). stage: the engine's
        stage callback (msit-upscale's timed 'compile+encode')."""
        if plan is None:
            plan = self.plan(lr.shape[:2], out_hw, tile=tile, max_memory_gb=max_memory_gb)
        return self.engine(lr, out_hw, clamp=clamp, progress=progress, tile=plan.tile,
                           stage=stage)
