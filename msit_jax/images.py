"""Image I/O and the reference degradation (Pillow bicubic on uint8).

Images here are numpy (H, W, 3) uint8 RGB unless a function says float.

Inputs: anything Pillow decodes. 16-bit integer images (PNG, TIFF) are scaled by
65535; 32-bit float images (mode 'F', e.g. a float TIFF) are taken as intensities
in [0, 1]: NaN or infinite values are refused (ImageError naming the file) and
values outside [0, 1] are clipped with a one-line warning (logger
`msit_jax.images`). `read_image_float` / `pil_to_rgb_float` keep the file's
precision; `read_image` / `pil_to_rgb_uint8` round to 8 bits.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from msit_jax.errors import EXIT_RESOURCE, InputError, ResourceError, one_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")



class _StderrLine(logging.Handler):
    """Writes a record's message alone, as one line on the current sys.stderr (so the
    command lines show `warning: ...`, not a logging-framework prefix)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(one_line(record.getMessage()), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


# Warnings about the data read (float values clipped): one line on stderr. An
# application that routes logging itself can remove the handler and set propagate.
log = logging.getLogger(__name__)
if not log.handlers:
    log.addHandler(_StderrLine())
    log.propagate = False


class ImageError(InputError):
    """An image file could not be read as an RGB image; the message names the file."""


class ImageTooLargeError(ImageError, ResourceError):
    """An image exceeds Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`)."""

    exit_code = EXIT_RESOURCE


def bomb_error(path: str, e: Exception) -> ImageTooLargeError:
    """The one-line error for Pillow's DecompressionBombError on `path`."""
    return ImageTooLargeError(f"{path}: {e} (Pillow's decompression-bomb limit, "
                              "PIL.Image.MAX_IMAGE_PIXELS)")


INT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _int_top(img: Image.Image, a: np.ndarray) -> float:
    """The full-scale value of an integer image: 65535 for 16-bit modes, and for 32-bit
    'I' images 65535 when a value is over 255 (16-bit data stored as 'I'), else 255."""
    return 65535.0 if img.mode in INT16_MODES or (a.size and a.max() > 255) else 255.0


def float_image(a: np.ndarray, name: str = "image") -> np.ndarray:
    """A float image (H, W) or (H, W, C) as float32 in [0, 1], checked.

    NaN or infinite values are refused (ImageError naming `name`, with the count and
    the first pixel); values outside [0, 1] are clipped to it, with one warning line
    (logger `msit_jax.images`) giving the range found and the count clipped. There
    is no rescaling by the data's own range: the same file always means the same
    intensities, and a series of images keeps its relative brightness. Data in other
    units (counts, physical values) should be scaled to [0, 1] before upscaling.
    """
    a = np.asarray(a, np.float32)
    finite = np.isfinite(a)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise ImageError(f"{name}: {bad.shape[0]} of {a.size} values are NaN or infinite "
                         f"(first at row {bad[0][0]}, column {bad[0][1]}); a float image "
                         "must be finite")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        n = int(np.count_nonzero((a < 0) | (a > 1)))
        log.warning(f"warning: {name}: float values span [{lo:.6g}, {hi:.6g}]; {n} of {a.size} "
                    "outside [0, 1] are clipped (scale the image to [0, 1] to keep them)")
        a = np.clip(a, 0.0, 1.0)
    return a


def pil_to_rgb_float(img: Image.Image, name: str = "image") -> np.ndarray:
    """Any Pillow image -> (H, W, 3) float32 RGB in [0, 1], at the file's precision.

    8-bit modes: / 255 (grayscale replicated, alpha dropped, as `pil_to_rgb_uint8`).
    16-bit integers ('I;16', e.g. 16-bit PNG and TIFF): / 65535; 32-bit integers
    ('I'): / 65535 when a value exceeds 255, else / 255 (clipped to [0, 1]).
    32-bit float ('F', e.g. float TIFF): as is, checked by `float_image` (NaN/inf
    refused, values outside [0, 1] clipped with a warning). Pillow reads float
    TIFFs with one channel only; it reads 16-bit RGB TIFFs as 8-bit 'RGB'.
    """
    if img.mode in INT16_MODES or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a / _int_top(img, a), 0.0, 1.0).astype(np.float32)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode == "F":
        return np.repeat(float_image(np.asarray(img), name)[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255)


def pil_to_rgb_uint8(img: Image.Image, name: str = "image") -> np.ndarray:
    """Any Pillow image -> (H, W, 3) uint8 RGB.

    Grayscale is replicated to 3 channels; alpha is dropped (as the reference's
    `convert('RGB')`); 16-bit and 32-bit integer images are scaled to 8 bits
    (Pillow's own convert would clip them); 32-bit float images ('F') are read by
    `pil_to_rgb_float` (NaN/inf refused, outside [0, 1] clipped with a warning) and
    rounded to 8 bits (`to_uint8`).
    """
    if img.mode in INT16_MODES or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        top = _int_top(img, a)
        a = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode == "F":
        return to_uint8(pil_to_rgb_float(img, name))
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def unreadable_error(path: str, e: BaseException) -> ImageError:
    """The one-line error for a file Pillow cannot identify or decode."""
    hint = ""
    if path.lower().endswith((".tif", ".tiff")) and isinstance(e, UnidentifiedImageError):
        hint = ("; if it is a float image: Pillow reads 32-bit float TIFFs with one "
                "channel only (not float RGB, not 16- or 64-bit floats): save each channel "
                "as a 32-bit float TIFF, or the image as 16-bit integers")
    return ImageError(f"{path}: not a readable image ({one_line(str(e))}){hint}")


def open_image(path: str, *, max_pixels: int | None = None) -> Image.Image:
    """Open an image file lazily (header read, no pixels decoded); the caller closes it.

    Raises ImageError with a one-line reason naming the file: a directory, a
    missing file, a file Pillow cannot identify; ImageTooLargeError when the
    image exceeds Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`,
    Pillow's own check) or has more than `max_pixels` pixels (checked from the
    header, before any decoding). Decoding errors (`img.load()` on a truncated
    body) surface later, in the caller: wrap them with `unreadable_error`.
    """
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image file")
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise bomb_error(path, e) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise unreadable_error(path, e) from e
    if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
        w, h = img.size
        img.close()
        raise ImageTooLargeError(f"{path}: {h} x {w} = {h * w} pixels is over the limit of "
                                 f"{max_pixels} pixels")
    return img


def _decode(path: str, max_pixels: int | None,
            convert: Callable[[Image.Image, str], np.ndarray]) -> np.ndarray:
    """Open, fully decode and convert an image file; ImageError names a bad file."""
    with open_image(path, max_pixels=max_pixels) as img:
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise unreadable_error(path, e) from e
        return convert(img, path)


def read_image_float(path: str, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to (H, W, 3) float32 RGB in [0, 1] at the file's precision
    (16-bit and float TIFF/PNG included, see `pil_to_rgb_float`); ImageError names a
    bad file (see `open_image` for the checks)."""
    return _decode(path, max_pixels, pil_to_rgb_float)


def read_image(path: str, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB; ImageError names a bad file
    (see `open_image` for the checks and `pil_to_rgb_uint8` for the conversion)."""
    return _decode(path, max_pixels, pil_to_rgb_uint8)


def list_images(folder: str) -> list[str]:
    """Sorted image files in a folder (non-recursive)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such directory")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS))


def resize_bicubic(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Pillow bicubic resize of a uint8 RGB image to (h, w): the reference's LR maker."""
    if img.dtype != np.uint8:
        raise TypeError(f"resize_bicubic expects uint8, got {img.dtype}")
    h, w = int(out_hw[0]), int(out_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be positive, got {(h, w)}")
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC), dtype=np.uint8)


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return img.astype(np.float32) / np.float32(255)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8: x * 255 in float64, rounded half to even (numpy), clipped.

    For float32 input (model outputs) this equals MATLAB's half-away rounding
    (`msit_jax.eval.matlab_resize.im2uint8`): x * 255 is exact in float64 and
    the only tie in [0, 1] is x = 0.5, which both round to 128. Float64 input
    can land on other ties (e.g. 0.5 / 255 * 255); MATLAB pipelines use im2uint8.
    """
    return np.clip(np.round(np.asarray(img, np.float64) * 255.0), 0, 255).astype(np.uint8)


def save_image(path: str, img: np.ndarray, format: str = "PNG", **options: Any) -> None:
    """Save an RGB(A) image (uint8, or float in [0, 1]) in Pillow's `format` (with its
    save `options`), atomically: the file is written beside `path` and renamed, so an
    interrupted save never leaves a partial file (nor a partly overwritten one)."""
    if img.dtype != np.uint8:
        img = to_uint8(img)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.{format.lower()}"
    try:
        Image.fromarray(img).save(tmp, format=format, **options)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(path: str, img: np.ndarray) -> None:
    """`save_image` as PNG."""
    save_image(path, img, "PNG")
