"""The image front end every upscaler shares: PIL image or array in, the same type out.

    up(image, scale=3.5)            # or per axis: scale=(2, 3)
    up(image, size=(1080, 1920))    # output (height, width)

Numpy, Pillow and tqdm only: no JAX model import, so the exported-artifact runners
(`msit_jax.export.stablehlo`, the ONNX runner) use it as well as
`msit_jax.Upscaler`. It also holds what every surface (the API, msit-upscale, the
demo, evaluation) checks the same way: the scale (`check_scale`), the output size
(`output_size`, the one place it is computed) and a non-finite model output
(`check_finite`). A subclass implements `upscale_array` on a float32 (H, W, 3)
image in [0, 1]; this module converts inputs and outputs:

* `PIL.Image.Image` -> `PIL.Image.Image`: RGB stays RGB, 'L' comes back 'L'
  (the luma of the RGB result), an alpha channel is resized bicubically and
  kept (RGBA / LA); 16-bit images are reduced to 8 bits; a 32-bit float 'F'
  image (float TIFF) is read at full precision (NaN/inf refused, values outside
  [0, 1] clipped with a warning: `msit_jax.images.float_image`) and comes back
  'F' (the luma of the RGB result, float32).
* uint8 (H, W, 3) array -> uint8 array (rounded to nearest).
* float (H, W, 3) array in [0, 1] -> float array of the same dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from msit_jax.console import format_hw
from msit_jax.errors import CheckpointError, NonFiniteError, UsageError, one_line
from msit_jax.images import pil_to_rgb_float, pil_to_rgb_uint8, to_uint8

# Queries per decoder call unless a platform says otherwise (the engine's
# per-platform table, the exports' fixed chunk). Each query gathers 2 x 49 x dim
# features, so at dim 256 a 4096-query chunk holds ~0.6 GB of intermediates.
DEFAULT_CHUNK = 4096

f32 = np.float32


class ArtifactError(CheckpointError):
    """An export artifact (a StableHLO folder's export.json or program, an ONNX graph) is
    missing, truncated, corrupt or inconsistent with itself; the message names the file
    and the field. A CheckpointError: exit code 5 in the command lines."""


def artifact_error(path: str, what: str, cause: BaseException | None = None) -> ArtifactError:
    """`path: what` (with the cause's one-line reason, at most 300 characters)."""
    reason = f" ({type(cause).__name__}: {one_line(str(cause), 300)})" if cause is not None \
        else ""
    return ArtifactError(f"{path}: {what}{reason}", path=path)


# progress: False / None (off), True (a tqdm bar) or a callable (done, total)
# called after each decoded chunk.
Progress = Union[bool, None, Callable[[int, int], Any]]


def normalize(img: np.ndarray) -> np.ndarray:
    """[0, 1] image -> the network's input space, (x - 0.5) / 0.5."""
    return (np.asarray(img, f32) - f32(0.5)) / f32(0.5)


def denormalize(x: np.ndarray) -> np.ndarray:
    """The network's output space -> [0, 1] (unclamped)."""
    return np.asarray(x, f32) * f32(0.5) + f32(0.5)


def check_image(lr: Any, name: str = "lr") -> np.ndarray:
    """A float (H, W, 3) image in [0, 1] -> float32; ValueError/TypeError otherwise."""
    lr = np.asarray(lr)
    if lr.ndim != 3 or lr.shape[-1] != 3:
        raise ValueError(f"{name} must be an (H, W, 3) RGB image, got shape {lr.shape}")
    if not np.issubdtype(lr.dtype, np.floating):
        raise TypeError(f"{name} must be float in [0, 1], got dtype {lr.dtype} "
                        "(divide uint8 images by 255)")
    if min(lr.shape[:2]) < 1:
        raise ValueError(f"{name} is empty: shape {lr.shape}")
    return lr.astype(f32)


def check_out_hw(out_hw: Any) -> tuple[int, int]:
    """(height, width) as two positive ints; ValueError naming the value otherwise."""
    try:
        h, w = (int(v) for v in out_hw)
    except (TypeError, ValueError):
        raise ValueError(f"out_hw must be (height, width), got {out_hw!r}") from None
    if h < 1 or w < 1 or (h, w) != tuple(out_hw):
        raise ValueError(f"out_hw must be two positive integers, got {out_hw!r}")
    return h, w


def check_scale(scale: Any, flag: str = "scale", text: Optional[str] = None
                ) -> tuple[float, float]:
    """A scale s or (sy, sx) -> (sy, sx) floats, each >= 1 (MSIT upsamples); ValueError
    for anything else (UsageError for a number < 1 or not positive and finite). flag,
    text: how the message names the setting and the value ('--scale', '0.5')."""
    try:
        sy, sx = (float(scale), float(scale)) if np.ndim(scale) == 0 else map(float, scale)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be a number or (sy, sx), got {scale!r}") from None
    shown = text if text is not None else repr(scale)
    if not (math.isfinite(sy) and math.isfinite(sx) and sy > 0 and sx > 0):
        raise UsageError(f"{flag} must be positive and finite, got {shown}")
    if min(sy, sx) < 1:
        raise UsageError(f"{flag} must be >= 1 (MSIT upsamples; use a resampler to shrink), "
                         f"got {shown}")
    return sy, sx


def output_size(in_hw: tuple[int, int], scale: Any = None, size: Any = None, *,
                name: str = "image", flag: str = "size") -> tuple[int, int]:
    """The output (height, width): `size`, or round(H * sy), round(W * sx) for
    `scale` = s or (sy, sx) (at least 1 pixel; `check_scale`). Exactly one must be
    given; UsageError for a size smaller than the input (MSIT upsamples). name, flag:
    how the message names the image and the size's setting (a path, '--size')."""
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale= (e.g. 3.5 or (2, 3)) or size=(height, width)")
    if size is not None:
        try:
            size = check_out_hw(size)
        except ValueError:
            raise ValueError(f"size must be (height, width), two positive integers, "
                             f"got {size!r}") from None
        if size[0] < in_hw[0] or size[1] < in_hw[1]:
            raise UsageError(f"{name}: {flag} {format_hw(size)} is smaller than the input "
                             f"{format_hw(in_hw)} (H x W; scale < 1, MSIT upsamples only)")
        return size
    sy, sx = check_scale(scale)
    return max(1, round(in_hw[0] * sy)), max(1, round(in_hw[1] * sx))


def check_finite(out: np.ndarray, name: str = "", hint: str = "") -> np.ndarray:
    """`out` unchanged when every value is finite; NonFiniteError otherwise, counting
    them: '{name}: the model output has N non-finite value(s) of M{hint}'."""
    finite = np.isfinite(out)
    if not finite.all():
        prefix = f"{name}: " if name else ""
        raise NonFiniteError(f"{prefix}the model output has {int(finite.size - finite.sum())} "
                             f"non-finite value(s) of {finite.size}{hint}")
    return out


def read_input(image: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """Any supported input -> (float32 (H, W, 3) in [0, 1], a function that turns a
    float32 (h, w, 3) result in [0, 1] back into the input's type)."""
    if isinstance(image, Image.Image):
        return _read_pil(image)
    if hasattr(image, "__array__") or isinstance(image, (list, tuple)):
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"image must be an (H, W, 3) RGB array or a PIL image, got "
                             f"shape {arr.shape}")
        if min(arr.shape[:2]) < 1:
            raise ValueError(f"image is empty: shape {arr.shape}")
        if arr.dtype == np.uint8:
            return arr.astype(f32) / f32(255), to_uint8
        if np.issubdtype(arr.dtype, np.floating):
            dtype = arr.dtype
            return arr.astype(f32), lambda out: np.asarray(out).astype(dtype)
        raise TypeError(f"image array must be uint8 (0-255) or float (0-1), got dtype {arr.dtype}")
    raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")


def _read_pil(img: Image.Image) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    if img.mode == "F":  # 32-bit float grayscale (float TIFF): float in, float 'F' out
        lr = pil_to_rgb_float(img, "image")

        def restore_float(out: np.ndarray):
            y = np.asarray(out, np.float64) @ np.array([0.299, 0.587, 0.114])  # as 'L'
            return Image.fromarray(y.astype(f32))  # float32 -> mode F

        return lr, restore_float
    rgb = pil_to_rgb_uint8(img, "image")
    alpha = None
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
    gray = img.mode in ("L", "LA", "1", "I;16", "I;16B", "I;16L", "I;16N", "I")

    def restore(out: np.ndarray):
        res = Image.fromarray(to_uint8(out))
        if gray:
            res = res.convert("L")
        if alpha is not None:
            res.putalpha(alpha.resize(res.size, Image.BICUBIC))
        return res

    return rgb.astype(f32) / f32(255), restore


def track(items: Iterable, total: int, progress: Progress, desc: str = "decode") -> Iterator:
    """Iterate `items`, reporting each finished item: a tqdm bar (progress=True)
    or progress(done, total) after each one (a callable)."""
    if not progress:
        yield from items
        return
    if callable(progress):
        done = 0
        for item in items:
            yield item
            done += 1
            progress(done, total)
        return
    yield from tqdm(items, total=total, desc=desc, unit="chunk", leave=False)


class ImageRunner:
    """Base of the one-call upscalers: `up(image, scale=... | size=...)`.

    Subclasses implement `upscale_array(lr, out_hw, *, clamp, progress, **options)`:
    lr (H, W, 3) float32 in [0, 1] -> (out_h, out_w, 3) float32.
    """

    def upscale_array(self, lr: np.ndarray, out_hw: tuple[int, int], *, clamp: bool = True,
                      progress: Progress = False) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, image: Any, scale: Union[float, Sequence[float], None] = None, *,
                 size: Optional[Sequence[int]] = None, clamp: bool = True,
                 progress: Progress = False, **options: Any) -> Any:
        """Upscale a PIL image or an (H, W, 3) uint8/float array to `scale` (s or (sy, sx),
        each >= 1) or `size` (height, width, no smaller than the image); returns the
        input's type (see the module doc). clamp=False (float arrays only) returns the
        raw prediction; progress: False, True (a bar) or a callable (done, total) called
        per decoded chunk; options: the runner's own keywords (`msit_jax.Upscaler`:
        tile=, max_memory_gb=)."""
        lr, restore = read_input(image)
        out_hw = output_size(lr.shape[:2], scale, size)
        out = self.upscale_array(lr, out_hw, clamp=clamp, progress=progress, **options)
        return restore(out)
