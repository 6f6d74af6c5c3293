"""The one memory model: estimated peak bytes of one upscale, the tile that fits a
budget, and the checks every surface (msit-upscale, the demo, the Python API) runs
before any work.

    est = memory_estimate(model_cfg, (h, w), (out_h, out_w), chunk, tile)
    tile = auto_tile(model_cfg, (h, w), budget_bytes(max_memory_gb))
    check_decoder(model_cfg, chunk, max_memory_gb)            # once per model
    check(model_cfg, (h, w), (out_h, out_w), chunk, tile, max_memory_gb)  # per image

Every check raises `OverBudget` (a ResourceError: exit code 6 in the command lines)
with one line naming the estimate, the budget and what to change. The messages
name the command line's flags (--tile, --chunk, --max_memory_gb); the Python API's
keywords have the same names.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Union

import ml_collections

from msit_jax import console
from msit_jax.errors import ResourceError, UsageError
from msit_jax.inference import tiling
from msit_jax.models.encoders import encoder_spec

# Bytes per pixel (or per query feature), measured on CPU at the paper size.
# Output: the float32 prediction, its denormalised copy and the uint8 quantisation
# (measured peak ~60 B per output pixel).
OUTPUT_BYTES_PER_PIXEL = 64
# Input: the decoded image and its float copies.
INPUT_BYTES_PER_PIXEL = 40
# Decoder: each query gathers (2r+1)^2 keys of `dim` features for Q/K and V with
# intermediates (~0.6 GB per 4096 queries at the paper size).
DECODER_BYTES_PER_QUERY_FEATURE = 12
# Self-ensemble: the float32 running sum of the 8 passes, beside each pass's output.
ENSEMBLE_BYTES_PER_PIXEL = 12
# Encoder: the convolutional feature path after the backbone (and conv backbones),
# per window pixel and feature channel (measured peak for the paper-size model).
ENCODER_BYTES_PER_PIXEL_CHANNEL = 64
# The smallest tile auto_tile picks: below it the halo dominates the work.
MIN_TILE = 32


class OverBudget(ResourceError):
    """An estimate over the memory budget: `part` ('decoder', 'buffers' or 'encoder'),
    `need` and `budget` in bytes; the message is the one line every surface prints."""

    def __init__(self, message: str, *, part: str, need: float, budget: float):
        super().__init__(message)
        self.part, self.need, self.budget = part, float(need), float(budget)


def budget_bytes(max_memory_gb: float) -> float:
    """A budget in GB (GiB: 2**30 bytes) -> bytes; UsageError unless finite and > 0."""
    try:
        gb = float(max_memory_gb)
    except (TypeError, ValueError):
        gb = math.nan
    if isinstance(max_memory_gb, (bool, str)) or not (math.isfinite(gb) and gb > 0):
        raise UsageError(f"--max_memory_gb must be a finite number > 0, got {max_memory_gb}")
    return gb * 2 ** 30


def format_gb(x: float) -> str:
    """Bytes as '1.23 GB' (GiB), as every budget message writes them."""
    return f"{x / 2 ** 30:.3g} GB"


def encoder_bytes_per_pixel(model_cfg: ml_collections.ConfigDict) -> float:
    """Feature-path bytes per LR pixel: ENCODER_BYTES_PER_PIXEL_CHANNEL x dim (the
    convolutional stages after the encoder and conv encoders), or the encoder's own
    `EncoderSpec.bytes_per_pixel` when it is larger (SwinIR's attention); the encoder's
    activations are freed before the stages after it run, so the peak is the larger of
    the two, not their sum."""
    spec = encoder_spec(model_cfg.encoder)
    base = float(ENCODER_BYTES_PER_PIXEL_CHANNEL) * model_cfg.dim
    if spec.bytes_per_pixel is None:
        return base
    return max(base, float(spec.bytes_per_pixel(model_cfg[spec.sub_config])))


def output_bytes(out_hw: tuple[int, int], self_ensemble: bool = False) -> float:
    """The output's buffers for an out_hw (H, W) image (the self-ensemble's sum too)."""
    out_px = OUTPUT_BYTES_PER_PIXEL + (ENSEMBLE_BYTES_PER_PIXEL if self_ensemble else 0)
    return float(out_hw[0]) * out_hw[1] * out_px


def memory_estimate(model_cfg: ml_collections.ConfigDict, in_hw: tuple[int, int],
                    out_hw: tuple[int, int], chunk: int, tile: int,
                    self_ensemble: bool = False) -> dict[str, float]:
    """Estimated peak bytes of one image: {'output', 'input', 'decoder', 'encoder'}.

    in_hw, out_hw: (H, W) of the input and the output; chunk: queries per decoder call;
    tile: the encoder's LR tile (0: the whole image), whose window adds the halo.
    """
    n = (2 * model_cfg.radius + 1) ** 2
    enc_hw = in_hw if tile <= 0 else tuple(min(s, tile + 2 * tiling.halo(model_cfg))
                                            for s in in_hw)
    return {"output": output_bytes(out_hw, self_ensemble),
            "input": float(in_hw[0]) * in_hw[1] * INPUT_BYTES_PER_PIXEL,
            "decoder": float(chunk) * n * model_cfg.dim * DECODER_BYTES_PER_QUERY_FEATURE,
            "encoder": float(enc_hw[0]) * enc_hw[1] * encoder_bytes_per_pixel(model_cfg)}


def auto_tile(model_cfg: ml_collections.ConfigDict, lr_hw: tuple[int, int],
              budget: float) -> int:
    """A tile side keeping the encoder's estimated activations (`encoder_bytes_per_pixel`
    per window pixel) under `budget` bytes; 0 = no tiling (it fits, or the encoder
    cannot be tiled: `tiling.tileable`). At least MIN_TILE."""
    per_px = encoder_bytes_per_pixel(model_cfg)
    if lr_hw[0] * lr_hw[1] * per_px <= budget or not tiling.tileable(model_cfg):
        return 0
    side = int(math.sqrt(budget / per_px)) - 2 * tiling.halo(model_cfg)
    return max(side, MIN_TILE)


def parse_tile(tile: Union[str, int, None], model_cfg: Optional[ml_collections.ConfigDict]
               = None) -> Union[str, int]:
    """'auto' or a tile side >= 0 (int or digits); UsageError otherwise, or for a tile
    > 0 on an encoder that cannot be tiled (when model_cfg is given)."""
    if tile is None or tile == "auto":
        return "auto"
    if isinstance(tile, str) and re.fullmatch(r"\d+", tile):
        tile = int(tile)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
        raise UsageError(f"--tile must be a non-negative integer or 'auto', got {tile}")
    if tile > 0 and model_cfg is not None and not tiling.tileable(model_cfg):
        raise UsageError(
            f"--tile {tile}: the {model_cfg.encoder} encoder "
            f"{encoder_spec(model_cfg.encoder).untiled}, so tiles cannot reproduce its "
            "output; use --tile 0 or auto")
    return tile


def check_output(out_hw: tuple[int, int], max_memory_gb: float, what: str) -> float:
    """The output's buffers alone (`output_bytes`), checked before the input is read or
    the model loaded; OverBudget when over max_memory_gb. what: how the size was asked
    for ('--size 4100x4100'). The image's whole check (`check`) follows per image."""
    need = output_bytes(out_hw)
    if need > budget_bytes(max_memory_gb):
        raise OverBudget(
            f"{what} needs ~{format_gb(need)} for the {console.format_hw(out_hw)} output "
            f"alone, over --max_memory_gb {max_memory_gb:g}", part="buffers", need=need,
            budget=budget_bytes(max_memory_gb))
    return need


def check_decoder(model_cfg: ml_collections.ConfigDict, chunk: int, max_memory_gb: float,
                  chunk_flag: Optional[str] = None) -> float:
    """The decoder's estimated bytes for `chunk` queries per call; OverBudget when over
    max_memory_gb (chunk_flag: how the message names the chunk, e.g. '--chunk 8192')."""
    budget = budget_bytes(max_memory_gb)
    need = memory_estimate(model_cfg, (1, 1), (1, 1), chunk, 0)["decoder"]
    if need > budget:
        flag = chunk_flag or f"the default chunk {chunk}"
        raise OverBudget(
            f"{flag} needs ~{format_gb(need)} of decoder memory (dim {model_cfg.dim}, radius "
            f"{model_cfg.radius}), over --max_memory_gb {max_memory_gb:g}; lower --chunk or "
            "raise --max_memory_gb", part="decoder", need=need, budget=budget)
    return need


def check(model_cfg: ml_collections.ConfigDict, in_hw: tuple[int, int],
          out_hw: tuple[int, int], chunk: int, tile: int, max_memory_gb: float, *,
          auto: bool = True, self_ensemble: bool = False, name: str = "input",
          what: Optional[str] = None) -> dict[str, float]:
    """One image against the budget: its buffers (set by the output size) and its
    encoder (set by the tile) -> the estimate (`memory_estimate`); OverBudget naming
    the part over max_memory_gb and what to change. The decoder (set by the chunk,
    the same for every image) is `check_decoder`'s.

    tile: the tile that will run (0: none); auto: whether it came from `auto_tile`
    (then an encoder still over budget at MIN_TILE is let through: the tile is as
    small as tiling goes). name: the image in the message (a path); what: how the
    output size was asked for (e.g. '--scale 2').
    """
    budget = budget_bytes(max_memory_gb)
    est = memory_estimate(model_cfg, in_hw, out_hw, chunk, tile, self_ensemble)
    fmt_in, fmt_out = console.format_hw(in_hw), console.format_hw(out_hw)
    buffers = est["output"] + est["input"]
    if buffers > budget:
        how = f", {what}" if what else ""
        raise OverBudget(
            f"{name}: {fmt_in} -> {fmt_out} (H x W{how}) needs ~{format_gb(buffers)} for "
            f"the image buffers, over --max_memory_gb {max_memory_gb:g}; choose a smaller "
            "output or raise --max_memory_gb", part="buffers", need=buffers, budget=budget)
    enc = est["encoder"]
    if enc > budget and not tiling.tileable(model_cfg):
        raise OverBudget(
            f"{name}: a {fmt_in} input needs ~{format_gb(enc)} of encoder memory, over "
            f"--max_memory_gb {max_memory_gb:g}, and the {model_cfg.encoder} encoder cannot "
            f"be tiled (it {encoder_spec(model_cfg.encoder).untiled})",
            part="encoder", need=enc, budget=budget)
    if enc > budget and not auto:
        raise OverBudget(
            f"{name}: --tile {tile} on a {fmt_in} input needs ~{format_gb(enc)} of encoder "
            f"memory, over --max_memory_gb {max_memory_gb:g}; use --tile auto or a smaller "
            "tile", part="encoder", need=enc, budget=budget)
    return est

