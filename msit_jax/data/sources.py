"""HR image sources for training and validation: image folder, TFDS, embedded.

Every source is a random-access sequence of HR images:

    len(src)          number of images
    src[i]            (H, W, 3) uint8 RGB
    src.name(i)       a human-readable name (file path, TFDS record, skimage name)
    src.key(i)        a short name, unique in the source (file name, TFDS record id,
                      skimage name): per-image keys of evaluation results and files
    src.is_gray(i)    whether the stored image is single-channel
    src.sizes         (N, 2) int64 array of (H, W), known without decoding

`sizes` is what the batch protocol needs to shrink the scale of a batch whose
smallest image is too small (docs/design.md#5-training-batch-protocol), so it is computed once, up
front, from file headers / stored shapes. With `skip_bad_images` a folder's
images are also fully decoded once, up front, so a file with a valid header and
a truncated body is dropped before training; the verdicts are cached (per file
path, size and modification time) so a resumed run does not decode again.

Sources are plain picklable objects: grain ships them to its worker processes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
from typing import Mapping, Optional, Sequence

import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from msit_jax.data import catalog
from msit_jax.errors import ConfigError
from msit_jax.images import IMAGE_EXTENSIONS, ImageError, list_images, open_image, read_image

log = logging.getLogger(__name__)

# Pillow modes of single-channel images (MATLAB reads such a file as 2-D).
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")
# TFDS features tried, in order, for the HR image and for a record's name.
TFDS_IMAGE_KEYS = ("hr", "image", "hr_image")
TFDS_NAME_KEYS = ("id", "name", "file_name", "filename")

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

    def key(self, i: int) -> str:
        """A short per-image name, unique in the source (default: the index, 4 digits)."""
        return f"{int(i):04d}"

    def identity(self, i: int) -> str:
        """What image i *is*, across sources: a real file path, a TFDS record, a skimage
        name. Two sources share an image when they share an identity (`check_disjoint`)."""
        return self.name(i)

    def is_gray(self, i: int) -> bool:
        """Whether image i is single-channel (default: its three channels are equal)."""
        img = self[i]
        return bool(np.array_equal(img[..., 0], img[..., 1])
                    and np.array_equal(img[..., 1], img[..., 2]))


def _header_size(path: str) -> tuple[int, int]:
    """(H, W) from the file header (Pillow decodes no pixels here)."""
    with open_image(path) as img:
        w, h = img.size
        if img.mode == "F":
            raise ImageError(f"{path}: floating-point images (mode F) are not supported")
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


def _file_key(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


class _CheckCache:
    """Full-decode verdicts per file, {abspath: {"key": [size, mtime_ns], "hw" | "error"}},
    in one JSON file (None: no cache). A changed file is decoded again."""

    def __init__(self, path: Optional[str]):
        self.path, self.entries = path, {}
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    self.entries = json.load(f).get("files", {})
            except (OSError, ValueError, AttributeError):
                log.warning("%s: unreadable image-check cache; checking every image again", path)
                self.entries = {}

    def get(self, path: str) -> Optional[dict]:
        e = self.entries.get(os.path.abspath(path))
        try:
            return e if e is not None and e.get("key") == _file_key(path) else None
        except OSError:
            return None

    def put(self, path: str, **verdict) -> None:
        self.entries[os.path.abspath(path)] = {"key": _file_key(path), **verdict}

    def save(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"version": 1, "files": self.entries}, f)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not write the image-check cache %s (%s)", self.path, e)


class FolderSource(ImageSource):
    """PNG/JPEG/... files of a folder (DIV2K layout: `DIV2K_train_HR/0001.png`, ...).

    root: the folder; meta_info: optional official file list (`0001.png (1404,2040,3)`
    per line) choosing and ordering the files; first_k: keep the first k files.
    min_side: images whose smaller side is below it cannot give a training crop.
    skip_bad: False (default): an unreadable file header or an image smaller than
      `min_side` raises ImageError naming it. True: every image is fully decoded
      once, up front (in threads), and files that fail (header, truncated body,
      size) are dropped, counted and logged.
    check_cache: optional JSON file caching the full-decode verdicts (skip_bad).
    quiet: log nothing (the up-front decode, the skipped files): for a caller that
      reports `skipped_errors` itself, as evaluation does.
    cache_dir: optional folder for decoded `.npy` copies, memory-mapped at load
      time so a random crop reads only its rows instead of decoding a 2K PNG
      (what the reference's `cache: bin` is for). Created on first use; with
      skip_bad the up-front decode fills it.
    """

    def __init__(self, root: str, meta_info: Optional[str] = None, first_k: Optional[int] = None,
                 min_side: int = 1, skip_bad: bool = False, cache_dir: Optional[str] = None,
                 check_cache: Optional[str] = None, quiet: bool = False):
        root = os.fspath(root)
        files = read_file_list(meta_info, root) if meta_info else list_images(root)
        if first_k:
            files = files[:first_k]
        if not files:
            raise FileNotFoundError(f"{root}: no image files (looked for "
                                    f"{', '.join(IMAGE_EXTENSIONS)})")
        self.cache_dir = cache_dir
        sizes_or_errors = (self._decode_all(files, check_cache, quiet) if skip_bad
                           else [self._header(p) for p in files])
        kept, sizes, skipped = [], [], []  # skipped: the ImageError of each dropped file
        for path, hw in zip(files, sizes_or_errors):
            try:
                if isinstance(hw, ImageError):
                    raise hw
                h, w = hw
                if min(h, w) < min_side:
                    raise ImageError(f"{path}: {h} x {w} (H x W) is smaller than the "
                                     f"{min_side}-pixel minimum side a training crop needs")
            except ImageError as e:
                if not skip_bad:
                    raise
                skipped.append(e)
                continue
            kept.append(path)
            sizes.append((h, w))
        if skipped and not quiet:
            log.warning("skipped %d of %d images in %s (skip_bad_images=True):\n  %s",
                        len(skipped), len(files), root, "\n  ".join(map(str, skipped)))
        if not kept:
            raise FileNotFoundError(f"{root}: none of the {len(files)} images is usable"
                                    + (f" ({skipped[0]})" if skipped else ""))
        self.root = root
        self.files = kept
        self.skipped_errors: list[ImageError] = skipped
        self.skipped = [str(e) for e in skipped]
        self.sizes = np.asarray(sizes, np.int64)

    @staticmethod
    def _header(path: str):
        return _header_size(path)

    def _decode_all(self, files: Sequence[str], check_cache: Optional[str],
                    quiet: bool = False) -> list:
        """(H, W) or the ImageError of each file, from a full decode (cached verdicts)."""
        cache = _CheckCache(check_cache)
        out: list = [None] * len(files)
        todo = []
        for i, path in enumerate(files):
            hit = cache.get(path)
            if hit is None:
                todo.append(i)
            else:
                out[i] = tuple(hit["hw"]) if "hw" in hit else ImageError(hit["error"])

        def check(path: str):
            try:
                img = read_image(path)
            except ImageError as e:
                return e
            if self.cache_dir:
                self._write_npy(path, img)
            return img.shape[:2]

        if todo:
            if not quiet:
                log.info("decoding %d images once to check them (skip_bad_images=True)",
                         len(todo))
            workers = min(len(todo), os.cpu_count() or 1, 8)
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                for i, res in zip(todo, pool.map(check, [files[i] for i in todo])):
                    out[i] = res
                    if isinstance(res, ImageError):
                        cache.put(files[i], error=str(res))
                    else:
                        cache.put(files[i], hw=list(res))
            cache.save()
        return out

    def name(self, i: int) -> str:
        return self.files[i]

    def key(self, i: int) -> str:
        return os.path.basename(self.files[i])

    def identity(self, i: int) -> str:
        return os.path.realpath(self.files[i])

    def is_gray(self, i: int) -> bool:
        """From the file header: a single-channel mode (an RGB file of equal channels is not)."""
        with open_image(self.files[i]) as img:
            return img.mode in GRAY_MODES

    def _npy_path(self, file: str) -> str:
        path = os.path.abspath(file)
        key = hashlib.sha1(path.encode()).hexdigest()[:10]  # same basename, other folder
        return os.path.join(self.cache_dir,
                            f"{os.path.splitext(os.path.basename(path))[0]}_{key}.npy")

    def _write_npy(self, file: str, img: np.ndarray) -> None:
        cached = self._npy_path(file)
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.{id(img)}.tmp.npy"  # atomic: workers may race
        np.save(tmp, img)
        os.replace(tmp, cached)

    def _load(self, i: int) -> np.ndarray:
        if not self.cache_dir:
            return read_image(self.files[i])
        cached = self._npy_path(self.files[i])
        if not os.path.exists(cached):
            img = read_image(self.files[i])
            self._write_npy(self.files[i], img)
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
    image_key: the HR image feature ('hr' for both div2k and msit_images; None: the
    first of TFDS_IMAGE_KEYS the dataset has). `key(i)` is the record's 'id' /
    'file_name' / 'filename' feature when it has one.
    The dataset must already be prepared; see `msit_jax.data.tfds_builder` to
    prepare one from an image folder without TensorFlow.
    """

    def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
                 image_key: Optional[str] = "hr", first_k: Optional[int] = None,
                 min_side: int = 1):
        import tensorflow_datasets as tfds

        self.tfds_name, self.split, self.data_dir = name, split, data_dir
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} split {split!r} is not prepared under "
                f"{data_dir or 'the default TFDS data dir'} ({type(e).__name__}: "
                f"{str(e).splitlines()[0]})") from e
        features = self._ds.dataset_info.features
        if image_key is None:
            image_key = next((k for k in TFDS_IMAGE_KEYS if k in features), None)
            if image_key is None:
                raise KeyError(f"TFDS dataset {name!r} has none of the image features "
                               f"{TFDS_IMAGE_KEYS} (features: {sorted(features.keys())})")
        if image_key not in features:
            raise KeyError(f"TFDS dataset {name!r} has no feature {image_key!r} "
                           f"(features: {sorted(features.keys())})")
        self.image_key = image_key
        self.name_key = next((k for k in TFDS_NAME_KEYS if k in features), None)
        self._keys: Optional[list[str]] = None  # read on first use
        n = len(self._ds) if not first_k else min(first_k, len(self._ds))
        if n == 0:
            raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} is empty")
        self.sizes = np.asarray(self._read_sizes(tfds, n), np.int64)
        small = np.nonzero(self.sizes.min(axis=1) < min_side)[0]
        if len(small):
            raise ImageError(f"{self.name(int(small[0]))}: {tuple(self.sizes[small[0]])} is "
                             f"smaller than the {min_side}-pixel minimum side a training "
                             f"crop needs ({len(small)} such records)")

    def _undecoded(self, tfds):
        """The records with the image feature left encoded (cheap to read)."""
        return tfds.data_source(self.tfds_name, split=self.split, data_dir=self.data_dir,
                                decoders={self.image_key: tfds.decode.SkipDecoding()})

    def _read_sizes(self, tfds, n: int) -> list[tuple[int, int]]:
        try:  # shapes / headers without decoding pixels
            raw = self._undecoded(tfds)
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

    def key(self, i: int) -> str:
        if self.name_key is None:
            return super().key(i)
        if self._keys is None:
            import tensorflow_datasets as tfds

            raw = self._undecoded(tfds)
            vals = [raw[j][self.name_key] for j in range(len(self))]
            self._keys = [v.decode() if isinstance(v, bytes) else str(v) for v in vals]
        return self._keys[i]

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

    def key(self, i: int) -> str:
        return self.names[i]

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


class ConcatSource(ImageSource):
    """Several sources as one: images of the first, then of the second, ...

    labels: one per source (e.g. 'T91', 'BSD200'); keys become 'label/key', so
    they stay unique when two sets hold files of the same name.
    """

    def __init__(self, parts: Sequence[ImageSource], labels: Sequence[str]):
        if not parts:
            raise ValueError("ConcatSource needs at least one source")
        if len(parts) != len(labels):
            raise ValueError(f"{len(parts)} sources but {len(labels)} labels")
        self.parts, self.labels = list(parts), list(labels)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.sizes = np.concatenate([p.sizes for p in self.parts]).astype(np.int64)
        self.skipped = [m for p in self.parts for m in getattr(p, "skipped", [])]

    def _locate(self, i: int) -> tuple[ImageSource, int, str]:
        j = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[j], i - int(self.offsets[j]), self.labels[j]

    def _load(self, i: int) -> np.ndarray:
        part, k, _ = self._locate(i)
        return part[k]

    def name(self, i: int) -> str:
        part, k, _ = self._locate(i)
        return part.name(k)

    def key(self, i: int) -> str:
        part, k, label = self._locate(i)
        return f"{label}/{part.key(k)}"

    def identity(self, i: int) -> str:
        part, k, _ = self._locate(i)
        return part.identity(k)

    def is_gray(self, i: int) -> bool:
        part, k, _ = self._locate(i)
        return part.is_gray(k)


def check_disjoint(train: ImageSource, val: ImageSource) -> None:
    """ConfigError when a validation image is also a training image (same file, TFDS
    record or embedded photograph), naming the first and the count."""
    seen = {train.identity(i) for i in range(len(train))}
    both = [v for v in map(val.identity, range(len(val))) if v in seen]
    if both:
        raise ConfigError(f"invalid config: eval.source shares {len(both)} of its {len(val)} "
                          f"images with data.train (e.g. {both[0]}); a validation set must not "
                          "be a training set")


def check_not_benchmark(src: ImageSource, what: str = "data.train") -> None:
    """ConfigError when a source reads a benchmark set's folder (Set5, Set14, B100,
    Urban100, Manga109): evaluation data, never training data."""
    for i in range(len(src)):
        ident = src.identity(i)  # a file path for folders; TFDS / skimage names are not
        bench = catalog.benchmark_folder(ident) if os.path.isabs(ident) else None
        if bench:
            raise ConfigError(f"invalid config: {what} reads {src.name(i)}, an image of the "
                              f"benchmark set {bench}; benchmark sets are evaluation data, "
                              f"never training data (see {catalog.TRAINING_DOCS})")


def named_source(names: str, data_root: str = "", data_dir: str = "", min_side: int = 1,
                 skip_bad: bool = False, cache_dir: Optional[str] = None,
                 check_cache: Optional[str] = None,
                 environ: Mapping[str, str] = os.environ) -> ImageSource:
    """The training sets `names` ('t91+bsd200', 'div2k', '291', ...) under the data root
    (`data_root`, else $MSIT_DATA, else ./data) as one source; see `msit_jax.data.catalog`.
    data_dir: the TFDS data dir for sets found through TFDS (div2k)."""
    root, where = catalog.data_root(data_root or None, environ)
    parts, labels = [], []
    for n in catalog.parse_names(names):
        kind, loc = catalog.locate(n, root, where, data_dir or None)
        if kind == "folder":
            parts.append(FolderSource(loc, min_side=min_side, skip_bad=skip_bad,
                                      cache_dir=cache_dir, check_cache=check_cache))
        else:
            parts.append(TFDSSource(loc, catalog.TRAINING_SETS[n].tfds_split,
                                    data_dir=data_dir or None, image_key="hr",
                                    min_side=min_side))
        labels.append(catalog.TRAINING_SETS[n].name)
    return parts[0] if len(parts) == 1 else ConcatSource(parts, labels)


def make_source(cfg: ml_collections.ConfigDict, min_side: int = 1,
                check_cache: Optional[str] = None) -> ImageSource:
    """A source from a config block with `kind` in {'embedded', 'folder', 'tfds', 'named'}.

    Fields: embedded: split; folder: path, meta_info, first_k, skip_bad_images,
    cache_dir; tfds: name, split, data_dir, image_key, first_k; named: name (training
    sets joined by '+', e.g. 't91+bsd200'), data_root, skip_bad_images, cache_dir,
    data_dir (TFDS, for div2k). check_cache: a
    JSON file for the full-decode verdicts of skip_bad_images (the training
    loop keeps it in the workdir).
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
                            cache_dir=cfg.get("cache_dir") or None, check_cache=check_cache)
    if kind == "tfds":
        if not cfg.get("name"):
            raise ValueError("data source kind='tfds' needs `name` (a prepared TFDS dataset)")
        return TFDSSource(cfg.name, cfg.get("split", "train"), data_dir=cfg.get("data_dir") or None,
                          image_key=cfg.get("image_key", "hr"), first_k=first_k, min_side=min_side)
    if kind == "named":
        if not cfg.get("name"):
            raise ValueError("data source kind='named' needs `name` (training sets, e.g. "
                             "'t91+bsd200')")
        return named_source(cfg.name, data_root=cfg.get("data_root") or "",
                            data_dir=cfg.get("data_dir") or "", min_side=min_side,
                            skip_bad=bool(cfg.get("skip_bad_images", False)),
                            cache_dir=cfg.get("cache_dir") or None, check_cache=check_cache)
    raise ValueError(f"unknown data source kind {kind!r}; choose 'embedded', 'folder', "
                     "'tfds' or 'named'")
