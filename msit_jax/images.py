"""Image I/O and the reference degradation (Pillow bicubic on uint8).

Images here are numpy (H, W, 3) uint8 RGB unless a function says float.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from msit_jax.errors import EXIT_RESOURCE, InputError, ResourceError, one_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(InputError):
    """An image file could not be read as an RGB image; the message names the file."""


class ImageTooLargeError(ImageError, ResourceError):
    """An image exceeds Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`)."""

    exit_code = EXIT_RESOURCE


def bomb_error(path: str, e: Exception) -> ImageTooLargeError:
    """The one-line error for Pillow's DecompressionBombError on `path`."""
    return ImageTooLargeError(f"{path}: {e} (Pillow's decompression-bomb limit, "
                              "PIL.Image.MAX_IMAGE_PIXELS)")


def pil_to_rgb_uint8(img: Image.Image, name: str = "image") -> np.ndarray:
    """Any Pillow image -> (H, W, 3) uint8 RGB.

    Grayscale is replicated to 3 channels; alpha is dropped (as the reference's
    `convert('RGB')`); 16-bit and 32-bit integer images are scaled to 8 bits
    (Pillow's own convert would clip them).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode == "F":
        raise ImageError(f"{name}: floating-point images (mode F) are not supported")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def unreadable_error(path: str, e: BaseException) -> ImageError:
    """The one-line error for a file Pillow cannot identify or decode."""
    return ImageError(f"{path}: not a readable image ({one_line(str(e))})")


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


def read_image(path: str, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB; ImageError names a bad file
    (see `open_image` for the checks and `pil_to_rgb_uint8` for the conversion)."""
    with open_image(path, max_pixels=max_pixels) as img:
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise unreadable_error(path, e) from e
        return pil_to_rgb_uint8(img, path)


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


def save_png(path: str, img: np.ndarray) -> None:
    """Save an RGB(A) image (uint8, or float in [0, 1]) as PNG, atomically: the file is
    written beside `path` and renamed, so an interrupted save never leaves a partial
    file (nor a partly overwritten one)."""
    if img.dtype != np.uint8:
        img = to_uint8(img)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.png"
    try:
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
