"""Datasets by name under one data root: the SR training sets and the benchmark folders.

    root, where = data_root(flag_value)      # --data_root, else $MSIT_DATA, else ./data
    names = parse_names("291+div2k")         # ['t91', 'bsd200', 'div2k']
    kind, loc = locate("t91", root, where)   # ('folder', root/T91) or ('tfds', 'div2k/...')

`msit_jax.data.sources.named_source("t91+bsd200")` turns names into one ImageSource.

Training sets (docs/training.md#training-data says where each comes from):

    name     folder under the root (first match, any case)      else
    div2k    DIV2K/DIV2K_train_HR, DIV2K_train_HR                the TFDS `div2k` builder
    t91      T91, yang91, T91/HR
    bsd200   BSD200, bsd200, BSD200/HR
    291      t91 + bsd200 (the classic "291" set)

Names combine with `+` (`div2k+t91+bsd200`); a set named twice is read once.
The benchmark sets (Set5, Set14, B100, Urban100, Manga109) are evaluation data:
`benchmark_folder` recognises their folders, and the training loop refuses to
train on them (`msit_jax.data.sources.check_disjoint` keeps validation images out
of the training set too).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

from msit_jax.errors import InputError

DATA_ENV = "MSIT_DATA"
DEFAULT_DATA_ROOT = "data"  # relative to the working directory, as the docs' examples
TRAINING_DOCS = "docs/training.md#training-data"

# Folder names (lower case) of the benchmark sets: evaluation data, never training data.
BENCHMARK_FOLDERS = ("set5", "set14", "b100", "bsd100", "bsds100", "urban100", "manga109")


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """A public SR training set: its usual name, the folders (under the data root) it may
    be in (the first is the documented layout), and the TFDS datasets holding it, if any
    (tried, in order, when no folder exists)."""

    name: str
    folders: tuple[str, ...]
    tfds: tuple[str, ...] = ()
    tfds_split: str = "train"


TRAINING_SETS = {
    # Any config of the TFDS div2k builder stores the same 800 HR images under 'hr'.
    "div2k": TrainingSet("DIV2K_train_HR", ("DIV2K/DIV2K_train_HR", "DIV2K_train_HR"),
                         tfds=("div2k/bicubic_x2", "div2k/bicubic_x3", "div2k/bicubic_x4",
                               "div2k")),
    "t91": TrainingSet("T91", ("T91", "yang91", "T91/HR")),
    "bsd200": TrainingSet("BSD200", ("BSD200", "bsd200", "BSD200/HR")),
}
ALIASES = {"291": ("t91", "bsd200")}


def data_root(flag_value: Optional[str], environ: Mapping[str, str] = os.environ
              ) -> tuple[str, str]:
    """(root, where it came from): --data_root, else $MSIT_DATA, else ./data."""
    if flag_value:
        return os.path.expanduser(flag_value), f"--data_root {flag_value}"
    if environ.get(DATA_ENV):
        return os.path.expanduser(environ[DATA_ENV]), f"{DATA_ENV}={environ[DATA_ENV]}"
    return DEFAULT_DATA_ROOT, (f"the default data root ./{DEFAULT_DATA_ROOT} (no --data_root, "
                               f"{DATA_ENV} unset)")


def find_dir(root: str, rel: str) -> Optional[str]:
    """root/rel, matching each component case-insensitively (Set5 vs set5), or None."""
    path = root
    for part in rel.split("/"):
        if not os.path.isdir(path):
            return None
        exact = os.path.join(path, part)
        if os.path.isdir(exact):
            path = exact
            continue
        match = next((e for e in sorted(os.listdir(path)) if e.lower() == part.lower()
                      and os.path.isdir(os.path.join(path, e))), None)
        if match is None:
            return None
        path = os.path.join(path, match)
    return path


def benchmark_folder(path: str) -> Optional[str]:
    """The benchmark name a folder (or a file in it) belongs to, or None.

    Looks at the folder itself and, for `.../Set5/HR` or `.../Set5/LR_bicubic/X2`
    layouts, its parents (three levels up at most).
    """
    p = os.path.abspath(os.path.realpath(os.path.expanduser(path)))
    if os.path.isfile(p):
        p = os.path.dirname(p)
    for _ in range(3):
        base = os.path.basename(p)
        if base.lower() in BENCHMARK_FOLDERS:
            return base
        if base.lower() not in ("hr", "lr", "lr_bicubic", "x2", "x3", "x4", "x6", "x8",
                                "original", "image_srf_2", "image_srf_3", "image_srf_4"):
            return None
        p = os.path.dirname(p)
    return None


def parse_names(spec: str) -> list[str]:
    """'t91+BSD200' -> ['t91', 'bsd200']; '291' expands; duplicates dropped, order kept.

    InputError naming the known sets for an unknown or empty name.
    """
    out: list[str] = []
    parts = [s.strip().lower() for s in str(spec).split("+")]
    if not all(parts):
        raise InputError(f"training data {spec!r}: empty set name (names are joined by '+', "
                         f"e.g. 't91+bsd200')")
    for s in parts:
        if s in BENCHMARK_FOLDERS:
            raise InputError(f"training data {spec!r}: {s} is a benchmark set, evaluation "
                             f"data only; train on {', '.join(known_names())} "
                             f"(see {TRAINING_DOCS})")
        names = ALIASES.get(s, (s,))
        for n in names:
            if n not in TRAINING_SETS:
                raise InputError(f"training data {spec!r}: unknown set {s!r}; known: "
                                 f"{', '.join(known_names())} (see {TRAINING_DOCS})")
            if n not in out:
                out.append(n)
    return out


def known_names() -> list[str]:
    return [*TRAINING_SETS, *ALIASES]


def locate(name: str, root: str, where: str, tfds_data_dir: Optional[str] = None
           ) -> tuple[str, str]:
    """A training set -> ('folder', path) or ('tfds', dataset name), else InputError
    saying where to put it."""
    ts = TRAINING_SETS[name]
    for rel in ts.folders:
        found = find_dir(root, rel)
        if found is not None:
            return "folder", found
    if ts.tfds:
        found_tfds = _prepared_tfds(ts.tfds, ts.tfds_split, tfds_data_dir)
        if found_tfds is not None:
            return "tfds", found_tfds
    also = f" (or {', '.join(ts.folders[1:])})" if len(ts.folders) > 1 else ""
    via = (f", and no prepared TFDS {ts.tfds[0].split('/')[0]} dataset" if ts.tfds else "")
    raise InputError(f"training set {name}: no folder {ts.folders[0]}{also} under {where}"
                     f"{via}; put its HR images in {os.path.join(root, ts.folders[0])} "
                     f"(see {TRAINING_DOCS})")


def _prepared_tfds(names: tuple[str, ...], split: str, data_dir: Optional[str] = None
                   ) -> Optional[str]:
    """The first of `names` prepared in `data_dir` (None: TFDS's default), or None (also
    when tensorflow-datasets is not installed)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    for n in names:
        try:
            tfds.builder(n, data_dir=data_dir).info.splits[split]  # raises unless prepared
        except Exception:  # noqa: BLE001 - any failure means "not usable here"
            continue
        return n
    return None
