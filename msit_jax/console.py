"""What every command line prints: quiet third-party logs, timed stages.

    from msit_jax import console

    console.quiet_logs(verbose=verbose)            # before importing jax / orbax / tfds
    with console.stage("load checkpoint"):         # "load checkpoint ... 1.3 s"
        cfg, variables = pretrained.load(path)

Libraries log a great deal at INFO and WARNING that a user cannot act on
(Orbax dumps its options and every file it touches; absl prints "Given
directory is read only"; TensorFlow prints CUDA probing). Our own progress
goes to stderr through `stage` and `note`, so stdout stays the result
(tables, paths) and can be piped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Iterator, Optional, TextIO

# Loggers whose INFO / WARNING records are noise to a user of the command lines.
NOISY_LOGGERS = ("absl", "orbax", "orbax.checkpoint", "tensorstore", "jax", "jax._src",
                 "tensorflow", "tensorflow_datasets", "grain", "asyncio", "etils", "h5py")


def quiet_logs(verbose: bool = False) -> None:
    """Silence third-party INFO/WARNING logs (errors still show) unless `verbose`.

    Call it before the libraries are imported where possible: TensorFlow reads
    TF_CPP_MIN_LOG_LEVEL once, at import.
    """
    logging.getLogger("msit_jax").setLevel(logging.INFO)
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # absl is a dependency of jax; this is for odd installs only
        pass
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


# The requirements file that pins each extra in a checkout (the train extra and the core
# dependencies: requirements.txt).
REQUIREMENT_FILES = {"train": "requirements.txt"}


def install_hint(extra: str) -> str:
    """What to run for a missing optional dependency of the `extra` (pyproject's
    optional-dependencies), as one line: `pip install "msit-jax[plot]" (in a checkout:
    pip install -r requirements-plot.txt)`."""
    requirements = REQUIREMENT_FILES.get(extra, f"requirements-{extra}.txt")
    return f'pip install "msit-jax[{extra}]" (in a checkout: pip install -r {requirements})'


def note(message: str, *, quiet: bool = False, stream: Optional[TextIO] = None) -> None:
    """One progress line on stderr (nothing when `quiet`)."""
    if not quiet:
        print(message, file=stream or sys.stderr, flush=True)


@contextlib.contextmanager
def stage(label: str, *, quiet: bool = False, stream: Optional[TextIO] = None
          ) -> Iterator[None]:
    """Time a stage of long work: prints `label ...` now and the seconds when done.

    On an exception nothing more is printed: the command reports the error.
    """
    out = stream or sys.stderr
    t0 = time.perf_counter()
    if not quiet:
        print(f"{label} ...", end="", file=out, flush=True)
    try:
        yield
    except BaseException:
        if not quiet:
            print(" failed", file=out, flush=True)
        raise
    if not quiet:
        print(f" {time.perf_counter() - t0:.1f} s", file=out, flush=True)


def format_hw(hw: tuple[int, int]) -> str:
    """A size as `H x W` (height first, as every command line reads and prints sizes)."""
    return f"{int(hw[0])} x {int(hw[1])}"
