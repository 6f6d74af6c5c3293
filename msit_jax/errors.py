"""Errors with exit codes, and the one-line error reporting every CLI shares.

Every command-line entry point (msit-train / train.py, msit-evaluate /
evaluate.py, msit-upscale, msit-convert, msit-export) reports a failure as one
line on stderr, `error: <what> (<file, flag or field>)`, and exits with the
code of its class below. The traceback is printed only with `--verbose`.

  0    success
  1    failure: an unexpected error, or some inputs failed (the others were done)
  2    usage: a flag value is invalid
  3    config: a training config field is unknown or invalid, or a change on
       resume is refused
  4    input: a file, folder or dataset is missing or unreadable
  5    checkpoint: a checkpoint or model directory is unreadable, corrupt or
       does not match its config
  6    non-finite: training diverged (NaN/inf loss, gradient or weights) or a
       model output is not finite
  7    output: an output exists (pass --overwrite), is an input, or cannot be written
  8    resource: a size, scale or chunk exceeds the memory budget, or an image
       exceeds the decompression-bomb limit
  9    busy: the training workdir is locked by another run (its PID and host are
       named); nothing was written (`WorkdirBusy`)
  10   peer lost: another process of a multi-process run died or stopped answering
       (jax.distributed); this one stopped without waiting for it (`PeerLost`)
  130, 143   interrupted by SIGINT / SIGTERM (training: after saving a checkpoint)
"""

from __future__ import annotations

import errno
import signal
import sys
import traceback
from typing import Optional

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_INPUT = 4
EXIT_CHECKPOINT = 5
EXIT_NONFINITE = 6
EXIT_OUTPUT = 7
EXIT_RESOURCE = 8
EXIT_BUSY = 9
EXIT_PEER = 10


class MsitError(Exception):
    """Base class: an error whose message names the file, flag or field at fault."""

    exit_code = EXIT_FAILURE


class UsageError(MsitError, ValueError):
    """A command-line flag has an invalid value."""

    exit_code = EXIT_USAGE


class ConfigError(MsitError, ValueError):
    """A training config field is unknown or invalid, or a change on resume is refused."""

    exit_code = EXIT_CONFIG


class InputError(MsitError, ValueError):
    """An input file, folder or dataset is missing or unreadable."""

    exit_code = EXIT_INPUT


class CheckpointError(MsitError, ValueError):
    """A checkpoint (training step, model directory, .pth) is unreadable or corrupt.

    step: the training step concerned, when there is one; path: the file or
    directory at fault.
    """

    exit_code = EXIT_CHECKPOINT

    def __init__(self, message: str, *, step: Optional[int] = None,
                 path: Optional[str] = None):
        super().__init__(message)
        self.step, self.path = step, path


class NonFiniteError(MsitError, FloatingPointError):
    """A loss, gradient, weight or model output is NaN or infinite."""

    exit_code = EXIT_NONFINITE


class OutputError(MsitError, OSError):
    """An output exists, would overwrite an input, or cannot be written."""

    exit_code = EXIT_OUTPUT


class ResourceError(MsitError, ValueError):
    """A requested size exceeds the memory budget or the decompression-bomb limit."""

    exit_code = EXIT_RESOURCE


class WorkdirBusy(MsitError, OSError):
    """Another training run holds the workdir's lock (`msit_jax.training.lock`).

    holder: what its lock file records ({'pid', 'host', 'since'}; empty if unreadable).
    """

    exit_code = EXIT_BUSY

    def __init__(self, message: str, *, path: Optional[str] = None,
                 holder: Optional[dict] = None):
        super().__init__(message)
        self.path, self.holder = path, dict(holder or {})


class PeerLost(MsitError, RuntimeError):
    """Another process of a jax.distributed run died or stopped answering.

    The CLI exits at once after reporting it (`os._exit`): waiting for the dead
    peer at interpreter exit (jax.distributed's shutdown barrier) could only time
    out or abort.
    """

    exit_code = EXIT_PEER


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint (a KeyboardInterrupt,
    so interactive callers treat it like Ctrl-C). exit_code: 128 + the signal number."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)


def one_line(text: str, limit: int = 2000) -> str:
    """A message on one line: its lines joined with '; ', and at most `limit` characters
    (the middle elided: the start names the operation, the end usually the reason)."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    line = "; ".join(parts)
    if len(line) <= limit:
        return line
    head = (limit - 5) * 2 // 5
    return line[:head] + " ... " + line[len(line) - (limit - 5 - head):]


def exit_code_for(exc: BaseException) -> int:
    """The exit status for an exception (see the module docstring)."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(exc, MemoryError):
        return EXIT_RESOURCE
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_INPUT
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT,
                                                  errno.EROFS, errno.EACCES):
        return EXIT_OUTPUT
    return EXIT_FAILURE


def describe(exc: BaseException) -> str:
    """One line for an exception: its message, prefixed by the type when that helps."""
    msg = one_line(str(exc))
    if isinstance(exc, (MsitError, TrainingInterrupted)):
        return msg
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename or ""
        return one_line(f"{where}: {exc.strerror}" if where else exc.strerror)
    if isinstance(exc, (ValueError, FileNotFoundError)) and msg:
        return msg
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


def report(exc: BaseException, verbose: bool = False, prog: str = "") -> int:
    """Print `error: <one line>` (and the traceback when verbose) to stderr; the exit code."""
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    prefix = f"{prog}: " if prog else ""
    hint = "" if verbose or isinstance(exc, (MsitError, TrainingInterrupted)) else \
        " (--verbose for the traceback)"
    print(f"{prefix}error: {describe(exc)}{hint}", file=sys.stderr, flush=True)
    return exit_code_for(exc)
