"""What every command line shares: quiet third-party logs, timed stages, install
hints, and JAX's persistent compilation cache.

    from msit_jax import console

    console.quiet_logs(verbose=verbose)            # before importing jax / orbax / tfds
    with console.stage("load checkpoint"):         # "load checkpoint ... 1.3 s"
        cfg, variables = pretrained.load(path)

Libraries log a great deal at INFO and WARNING that a user cannot act on
(Orbax dumps its options and every file it touches; absl prints "Given
directory is read only"; TensorFlow prints CUDA probing). Our own progress
goes to stderr through `stage` and `note`, so stdout stays the result
(tables, paths) and can be piped.

The command lines (msit-upscale, msit-evaluate, msit-train, msit-demo, run from
a shell: `flags_util.run_app`) keep XLA's compiled programs between runs in
JAX's persistent compilation cache (`enable_compile_cache`):
$XDG_CACHE_HOME/msit-jax/jax, else ~/.cache/msit-jax/jax; off with
--nocompile_cache or MSIT_JAX_NO_COMPILE_CACHE=1. A second run of the same sizes
then loads its encoder and decoder programs instead of compiling them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import warnings
from typing import Iterator, Optional, TextIO

# Loggers whose INFO / WARNING records are noise to a user of the command lines.
NOISY_LOGGERS = ("absl", "orbax", "orbax.checkpoint", "tensorstore", "jax", "jax._src",
                 "tensorflow", "tensorflow_datasets", "grain", "asyncio", "etils", "h5py")


# Whether a command line asked for the libraries' logs (--verbose): the library's own
# silencers (`quiet_library_logs`, the ONNX runner's session options) then stand aside.
_VERBOSE = False


def quiet_logs(verbose: bool = False) -> None:
    """Silence third-party INFO/WARNING logs (errors still show) unless `verbose`.

    Call it before the libraries are imported where possible: TensorFlow reads
    TF_CPP_MIN_LOG_LEVEL once, at import. `verbose` also lets the warnings that the
    library silences on its own (`quiet_library_logs`, the ONNX runner) through, until
    the next call.
    """
    global _VERBOSE
    logging.getLogger("msit_jax").setLevel(logging.INFO)
    _VERBOSE = verbose
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


def verbose_logs() -> bool:
    """Whether a command line asked for the libraries' logs (`quiet_logs(verbose=True)`)."""
    return _VERBOSE


@contextlib.contextmanager
def quiet_library_logs(names: tuple[str, ...] = ("absl",)) -> Iterator[None]:
    """Raise the loggers `names` to ERROR inside the block, unless a command line asked
    for the libraries' logs (--verbose): for warnings a library prints on every call that
    a user cannot act on (Orbax: "Given directory is read only" when it opens a workdir's
    checkpoints to read them). The levels are restored on exit."""
    if _VERBOSE:
        yield
        return
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# ------------------------------------------------------------ the compilation cache

NO_COMPILE_CACHE_ENV = "MSIT_JAX_NO_COMPILE_CACHE"
# Programs that took at least this long to compile are cached. JAX's default (1 s) leaves
# out msit-lite's encoder and decoder on CPU (0.85 s and 1.07 s for a 40 x 48 input, x3,
# here; half that on a faster machine); below 0.2 s are the per-shape helpers (slices,
# reshapes), which compile in milliseconds and would only add files.
MIN_COMPILE_SECONDS = 0.2


@dataclasses.dataclass
class CompileCache:
    """The cache a command line turned on: its folder, the entries it held when turned on,
    and the compilations since: `requests` programs needed, `hits` of them loaded from
    the cache, `written` compiled and stored (those that took MIN_COMPILE_SECONDS or
    more); the others were compiled and not stored."""

    directory: str
    entries_before: int
    requests: int = 0
    hits: int = 0
    written: int = 0

    def entries(self) -> int:
        return _cache_entries(self.directory)

    def compiled(self) -> int:
        """Programs compiled (not loaded) since the cache was turned on."""
        return self.requests - self.hits

    def summary(self) -> str:
        """One line: 'compilation cache: 2 of 5 program(s) loaded, 3 compiled, 0 written
        (DIR: 2 -> 2 entries)'."""
        return (f"compilation cache: {self.hits} of {self.requests} program(s) loaded, "
                f"{self.compiled()} compiled, {self.written} written ({self.directory}: "
                f"{self.entries_before} -> {self.entries()} entries)")


_ACTIVE: Optional[CompileCache] = None
_LISTENING = False


def compile_cache_dir() -> str:
    """$XDG_CACHE_HOME/msit-jax/jax, else ~/.cache/msit-jax/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "msit-jax", "jax")


def compile_cache_disabled() -> bool:
    """Whether MSIT_JAX_NO_COMPILE_CACHE turns the cache off (any value but '', 0, false,
    no)."""
    return os.environ.get(NO_COMPILE_CACHE_ENV, "").strip().lower() not in ("", "0", "false",
                                                                            "no")


def _cache_entries(directory: str) -> int:
    """Cached programs in `directory` (JAX writes one file per program, and an -atime file
    beside each when it tracks use)."""
    try:
        return sum(1 for f in os.listdir(directory) if not f.endswith("-atime"))
    except OSError:
        return 0


def _on_event(event: str, **_: object) -> None:
    if _ACTIVE is None:
        return
    if event == "/jax/compilation_cache/compile_requests_use_cache":
        _ACTIVE.requests += 1
    elif event == "/jax/compilation_cache/cache_hits":
        _ACTIVE.hits += 1
    elif event == "/jax/compilation_cache/cache_misses":  # JAX's name for a write
        _ACTIVE.written += 1


def enable_compile_cache(enabled: bool = True, *, directory: Optional[str] = None
                         ) -> Optional[CompileCache]:
    """Turn on JAX's persistent compilation cache for this process, before the first
    compilation; the active `CompileCache`, or None when it stays off.

    Off when `enabled` is False (--nocompile_cache) or MSIT_JAX_NO_COMPILE_CACHE is set.
    `directory` defaults to JAX's own setting (JAX_COMPILATION_CACHE_DIR) when the user
    made one, else `compile_cache_dir()`; JAX creates it at the first program it writes
    (a run that compiles nothing leaves no folder; one that cannot be written is a JAX
    warning, and the run goes on). Silent: the command lines end their work with
    `note_compile_cache` (what was loaded and written). The setting is process-wide
    (JAX's config), which is why only the command lines call this, never the library.
    """
    global _ACTIVE, _LISTENING
    if not enabled or compile_cache_disabled():
        return None
    import jax
    from jax import monitoring

    directory = directory or jax.config.jax_compilation_cache_dir or compile_cache_dir()
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's, if set
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if not _LISTENING:
        monitoring.register_event_listener(_on_event)
        _LISTENING = True
    _ACTIVE = CompileCache(directory, _cache_entries(directory))
    return _ACTIVE


def active_compile_cache() -> Optional[CompileCache]:
    """The cache `enable_compile_cache` turned on in this process, or None."""
    return _ACTIVE


def note_compile_cache(*, quiet: bool = False) -> None:
    """The active cache's `summary` as a progress line (nothing when it is off): how many
    of this run's programs were loaded instead of compiled, and the folder's entries."""
    if _ACTIVE is not None:
        note(_ACTIVE.summary(), quiet=quiet)


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
