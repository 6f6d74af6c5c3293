"""HR image sources for training and validation: image folder, TFDS, embedded.

Every source is a random-access sequence of HR images:

    len(src)          number of images
    src[i]            (H, W, 3) uint8 RGB
    src.name(i)       a human-readable name (file path, TFDS record, skimage name)
    src.sizes         (N, 2) int64 array of (H, W), known without decoding

`sizes` is what the batch protocol needs to shrink the scale of a batch whose
smallest image is too small (DESIGN.md section 5), so it is computed once, up
front, from file headers / stored shapes, never by decoding every image.

Sources are plain picklable objects: grain ships them to its worker processes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from msit_jax.images import IMAGE_EXTENSIONS, ImageError, list_images, read_image

log = logging.getLogger(__name__)

# The colour photographs scikit-image ships (no download), split once and for all.
# Held out: a portrait with skin/hair/fabric and a cat with fur and whiskers; the
# training five cover coffee/ceramics, deep-sky noise, microscopy, retina and a rocket.
EMBEDDED_TRAIN = ("coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
EMBEDDED_VAL = ("astronaut", "chelsea")


def array_to_rgb_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """A decoded image array (H, W), (H, W, 1|3|4), uint8/uint16 -> (H, W, 3) uint8."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an (H, W, 1|3|4) image, got shape {a.shape}")
    if a.dtype == np.uint16:
        a = np.round(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"{name}: expected uint8 or uint16 pixels, got {a.dtype}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


class ImageSource:
    """Base class: subclasses set `self.sizes` and implement `_load` and `name`."""

    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        img = self._load(i)
        if img.shape[:2] != tuple(self.sizes[i]):
            raise ImageError(f"{self.name(i)}: decoded size {img.shape[:2]} differs from "
                             f"the size read up front {tuple(self.sizes[i])}")
        return img

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError


def _header_size(path: str) -> tuple[int, int]:
    """(H, W) from the file header (Pillow decodes no pixels here)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.mode == "F":
                raise ImageError(f"{path}: floating-point images (mode F) are not supported")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: not a readable image ({e})") from e
    return h, w


def read_file_list(meta_info: str, root: str) -> list[str]:
    """Files named by an official `meta_info` txt (first token of each non-empty line)."""
    if not os.path.isfile(meta_info):
        raise FileNotFoundError(f"meta_info file {meta_info}: no such file")
    with open(meta_info) as f:
        names = [line.split()[0] for line in f if line.strip()]
    files = [os.path.join(root, n) for n in names]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) listed in {meta_info} are missing "
                                f"under {root}, e.g. {missing[0]}")
    return files


class FolderSource(ImageSource):
    """PNG/JPEG/... files of a folder (DIV2K layout: `DIV2K_train_HR/0001.png`, ...).

    root: the folder; meta_info: optional official file list (`0001.png (1404,2040,3)`
    per line) choosing and ordering the files; first_k: keep the first k files.
    min_side: images whose smaller side is below it cannot give a training crop.
    skip_bad: False (default): an unreadable file or one smaller than `min_side`
      raises ImageError naming it. True: such files are dropped, counted and logged.
    cache_dir: optional folder for decoded `.npy` copies, memory-mapped at load
      time so a random crop reads only its rows instead of decoding a 2K PNG
      (what the reference's `cache: bin` is for). Created on first use.
    """

    def __init__(self, root: str, meta_info: Optional[str] = None, first_k: Optional[int] = None,
                 min_side: int = 1, skip_bad: bool = False, cache_dir: Optional[str] = None):
        root = os.fspath(root)
        files = read_file_list(meta_info, root) if meta_info else list_images(root)
        if first_k:
            files = files[:first_k]
        if not files:
            raise FileNotFoundError(f"{root}: no image files (looked for "
                                    f"{', '.join(IMAGE_EXTENSIONS)})")
        kept, sizes, skipped = [], [], []
        for path in files:
            try:
                h, w = _header_size(path)
                if min(h, w) < min_side:
                    raise ImageError(f"{path}: {h}x{w} is smaller than the {min_side}-pixel "
                                     "minimum side a training crop needs")
            except ImageError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
                continue
            kept.append(path)
            sizes.append((h, w))
        if skipped:
            log.warning("skipped %d of %d images in %s (data.skip_bad_images=True):\n  %s",
                        len(skipped), len(files), root, "\n  ".join(skipped))
        if not kept:
            raise FileNotFoundError(f"{root}: none of the {len(files)} images is usable")
        self.root = root
        self.files = kept
        self.skipped = skipped
        self.sizes = np.asarray(sizes, np.int64)
        self.cache_dir = cache_dir

    def name(self, i: int) -> str:
        return self.files[i]

    def _load(self, i: int) -> np.ndarray:
        if not self.cache_dir:
            return read_image(self.files[i])
        path = os.path.abspath(self.files[i])
        key = hashlib.sha1(path.encode()).hexdigest()[:10]  # same basename, other folder
        cached = os.path.join(self.cache_dir,
                              f"{os.path.splitext(os.path.basename(path))[0]}_{key}.npy")
        if not os.path.exists(cached):
            img = read_image(self.files[i])
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{cached}.{os.getpid()}.tmp.npy"  # atomic: workers may race
            np.save(tmp, img)
            os.replace(tmp, cached)
            return img
        return np.load(cached, mmap_mode="r")


def _raw_size(raw, name: str) -> Optional[tuple[int, int]]:
    """(H, W) of an undecoded TFDS image feature, or None when it can't be read cheaply."""
    if isinstance(raw, dict) and "shape" in raw:  # Tensor feature: shape stored beside bytes
        shape = np.asarray(raw["shape"]).tolist()
        return int(shape[0]), int(shape[1])
    if isinstance(raw, (bytes, np.bytes_)):  # Image feature: encoded PNG/JPEG bytes
        try:
            with Image.open(io.BytesIO(bytes(raw))) as img:
                return img.size[1], img.size[0]
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{name}: not a readable image ({e})") from e
    return None


class TFDSSource(ImageSource):
    """A prepared TFDS dataset read through `tfds.data_source` (ArrayRecord, no TensorFlow).

    name: TFDS name (e.g. 'div2k/bicubic_x4' or this project's 'msit_images');
    split: e.g. 'train'; data_dir: TFDS data dir (None: TFDS's default);
    image_key: the HR image feature ('hr' for both div2k and msit_images).
    The dataset must already be prepared; see `msit_jax.data.tfds_builder` to
    prepare one from an image folder without TensorFlow.
    """

    def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
                 image_key: str = "hr", first_k: Optional[int] = None, min_side: int = 1):
        import tensorflow_datasets as tfds

        self.tfds_name, self.split, self.data_dir, self.image_key = name, split, data_dir, image_key
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} split {split!r} is not prepared under "
                f"{data_dir or 'the default TFDS data dir'} ({type(e).__name__}: "
                f"{str(e).splitlines()[0]})") from e
        features = self._ds.dataset_info.features
        if image_key not in features:
            raise KeyError(f"TFDS dataset {name!r} has no feature {image_key!r} "
                           f"(features: {sorted(features.keys())})")
        n = len(self._ds) if not first_k else min(first_k, len(self._ds))
        if n == 0:
            raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} is empty")
        self.sizes = np.asarray(self._read_sizes(tfds, n), np.int64)
        small = np.nonzero(self.sizes.min(axis=1) < min_side)[0]
        if len(small):
            raise ImageError(f"{self.name(int(small[0]))}: {tuple(self.sizes[small[0]])} is "
                             f"smaller than the {min_side}-pixel minimum side a training "
                             f"crop needs ({len(small)} such records)")

    def _read_sizes(self, tfds, n: int) -> list[tuple[int, int]]:
        try:  # shapes / headers without decoding pixels
            raw = tfds.data_source(self.tfds_name, split=self.split, data_dir=self.data_dir,
                                   decoders={self.image_key: tfds.decode.SkipDecoding()})
            sizes = [_raw_size(raw[i][self.image_key], self.name(i)) for i in range(n)]
            if all(s is not None for s in sizes):
                return sizes
        except ImageError:
            raise
        except Exception as e:  # pragma: no cover - depends on the feature type
            log.info("TFDS %s: no cheap size lookup (%s); decoding to read sizes", self.tfds_name, e)
        return [self._load(i).shape[:2] for i in range(n)]

    def name(self, i: int) -> str:
        return f"tfds:{self.tfds_name}/{self.split}[{i}]"

    def _load(self, i: int) -> np.ndarray:
        return array_to_rgb_uint8(self._ds[i][self.image_key], self.name(i))


class EmbeddedSource(ImageSource):
    """scikit-image's bundled colour photographs; split 'train' or 'val' (no download)."""

    def __init__(self, split: str = "train", names: Optional[Sequence[str]] = None):
        if names is None:
            if split not in ("train", "val"):
                raise ValueError(f"embedded split must be 'train' or 'val', got {split!r}")
            names = EMBEDDED_TRAIN if split == "train" else EMBEDDED_VAL
        self.names = tuple(names)
        self._cache: dict[int, np.ndarray] = {}
        self.sizes = np.asarray([self._load(i).shape[:2] for i in range(len(self.names))],
                                np.int64)

    def name(self, i: int) -> str:
        return f"skimage.data.{self.names[i]}"

    def _load(self, i: int) -> np.ndarray:
        if i not in self._cache:  # a few MB in all: keep them
            import skimage.data

            fn = getattr(skimage.data, self.names[i], None)
            if fn is None:
                raise ValueError(f"skimage.data has no image {self.names[i]!r}")
            self._cache[i] = array_to_rgb_uint8(fn(), self.name(i))
        return self._cache[i]

    def __getstate__(self):  # workers reload the few images they need
        return {**self.__dict__, "_cache": {}}


def make_source(cfg: ml_collections.ConfigDict, min_side: int = 1) -> ImageSource:
    """A source from a config block with `kind` in {'embedded', 'folder', 'tfds'}.

    Fields: embedded: split; folder: path, meta_info, first_k, skip_bad_images,
    cache_dir; tfds: name, split, data_dir, image_key, first_k.
    """
    kind = cfg.get("kind", "embedded")
    first_k = cfg.get("first_k") or None
    if kind == "embedded":
        return EmbeddedSource(cfg.get("split", "train"))
    if kind == "folder":
        if not cfg.get("path"):
            raise ValueError("data source kind='folder' needs `path` (the image folder)")
        return FolderSource(cfg.path, meta_info=cfg.get("meta_info") or None, first_k=first_k,
                            min_side=min_side, skip_bad=bool(cfg.get("skip_bad_images", False)),
                            cache_dir=cfg.get("cache_dir") or None)
    if kind == "tfds":
        if not cfg.get("name"):
            raise ValueError("data source kind='tfds' needs `name` (a prepared TFDS dataset)")
        return TFDSSource(cfg.name, cfg.get("split", "train"), data_dir=cfg.get("data_dir") or None,
                          image_key=cfg.get("image_key", "hr"), first_k=first_k, min_side=min_side)
    raise ValueError(f"unknown data source kind {kind!r}; choose 'embedded', 'folder' or 'tfds'")
