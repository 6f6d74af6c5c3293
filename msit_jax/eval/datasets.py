"""What `--data` names: benchmark names under a data root, folders, TFDS datasets.

    --data set5 --data_root ~/sr-data     -> ~/sr-data/Set5
    --data set5   (MSIT_DATA=~/sr-data)   -> ~/sr-data/Set5
    --data data/Set5                      -> that folder (a folder holding HR/ works too)
    --data Mine=photos/hr                 -> that folder, reported as "Mine"
    --data tfds:div2k/bicubic_x4:validation

The images are read through `msit_jax.data.sources` (FolderSource, TFDSSource);
an `EvalSet` adds what evaluation needs beside them: the dataset's name (its
scoring preset and paired-LR defaults follow from it), the HR folder beside
which `LR_bicubic/X{s}` is looked for, and the files that could not be read
(reported as failures, the others are still scored). Layout and sources of the
benchmark sets: docs/evaluation.md, "Benchmark data".
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

from msit_jax import errors
from msit_jax.data.catalog import DATA_ENV, data_root, find_dir
from msit_jax.data.sources import FolderSource, ImageSource, TFDSSource
from msit_jax.eval.protocol import canonical_name
from msit_jax.images import ImageError

DOCS_ANCHOR = "docs/evaluation.md#benchmark-data"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark set: its usual name and the folders (under the data root) it may be in;
    the first folder is the documented layout."""

    name: str
    folders: tuple[str, ...]


BENCHMARKS = {
    "set5": Benchmark("Set5", ("Set5",)),
    "set14": Benchmark("Set14", ("Set14",)),
    "b100": Benchmark("B100", ("B100", "BSD100", "BSDS100")),
    "urban100": Benchmark("Urban100", ("Urban100",)),
    "div2kvalid": Benchmark("DIV2K_valid_HR", ("DIV2K/DIV2K_valid_HR", "DIV2K_valid_HR")),
}
BENCHMARK_FLAGS = ("set5", "set14", "b100", "urban100", "div2k-valid")  # as help texts show them


@dataclasses.dataclass
class EvalSet:
    """A named image source to evaluate on.

    hr_dir: the HR folder (paired LR files are looked for beside it), None for
    TFDS; skipped: the files that could not be read, each an ImageError naming it.
    """

    name: str
    source: ImageSource
    hr_dir: Optional[str] = None
    skipped: list[ImageError] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.source)


def resolve(spec: str, root_flag: Optional[str] = None,
            environ: Mapping[str, str] = os.environ) -> tuple[Optional[str], str]:
    """A --data value -> (display name or None for the folder's own, path or 'tfds:...').

    An existing path is used as given; otherwise a benchmark name (set5, set14,
    b100 / bsd100, urban100, div2k-valid; any case) is looked up under the data
    root. InputError, in one line saying what to put where, when it is missing.
    """
    if spec.startswith("tfds:"):
        return None, spec
    name, sep, path = spec.partition("=")
    if sep and not os.path.exists(spec):
        if not os.path.isdir(os.path.expanduser(path)):
            raise errors.InputError(f"--data {spec}: {path}: no such directory")
        return name, os.path.expanduser(path)
    expanded = os.path.expanduser(spec)
    if os.path.exists(expanded) or os.sep in spec or "/" in spec:
        if not os.path.isdir(expanded):
            raise errors.InputError(f"--data {spec}: no such directory")
        return None, expanded
    bench = BENCHMARKS.get(canonical_name(spec))
    if bench is None:
        raise errors.InputError(
            f"--data {spec}: no such folder, and not a benchmark name (one of "
            f"{', '.join(BENCHMARK_FLAGS)}; see {DOCS_ANCHOR})")
    root, where = data_root(root_flag, environ)
    for rel in bench.folders:
        found = find_dir(root, rel)
        if found is not None:
            return None, found
    want = os.path.join(root, bench.folders[0])
    also = (f" (or {', '.join(bench.folders[1:])})" if len(bench.folders) > 1 else "")
    raise errors.InputError(
        f"--data {spec}: no folder {bench.folders[0]}{also} under {where}; download "
        f"{bench.name} (see {DOCS_ANCHOR}) and put its HR images in {want}")


def open_eval_set(spec: str, *, root_flag: Optional[str] = None,
                  tfds_data_dir: Optional[str] = None,
                  environ: Mapping[str, str] = os.environ) -> EvalSet:
    """A --data value ('PATH', 'NAME=PATH', a benchmark name, 'tfds:NAME[:SPLIT]') -> EvalSet.

    A folder holding `HR/` is read from there. Every image is decoded once up
    front: one that cannot be read is left out and listed in `skipped`.
    """
    return open_resolved(*resolve(spec, root_flag, environ), tfds_data_dir=tfds_data_dir)


def open_resolved(name: Optional[str], path: str, *, tfds_data_dir: Optional[str] = None
                  ) -> EvalSet:
    """`open_eval_set` of what `resolve` returned: (name or None, folder or 'tfds:...')."""
    if path.startswith("tfds:"):
        ds_name, _, split = path[len("tfds:"):].partition(":")
        source = TFDSSource(ds_name, split or "validation", data_dir=tfds_data_dir,
                            image_key=None)
        return EvalSet(ds_name, source)
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    hr_dir = os.path.join(path, "HR") if os.path.isdir(os.path.join(path, "HR")) else path
    if name is None:
        name = os.path.basename(path)
        if name.upper() == "HR":
            name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    source = FolderSource(hr_dir, skip_bad=True, quiet=True)
    return EvalSet(name, source, hr_dir=hr_dir, skipped=list(source.skipped_errors))
