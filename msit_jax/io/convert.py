"""Convert an official MSIT `.pth` into this project's checkpoint directory.

    python -m msit_jax.convert epoch-best.pth converted/msit_edsr
    python -m msit_jax.convert bare_state_dict.pth out/ --encoder rdn --conv rim
    python -m msit_jax.convert epoch-best.pth out_folded/ --fold

The result loads with `msit_jax.io.pretrained.load(DST_DIR)`. Progress (timed
stages: load checkpoint, fold, write) goes to stderr, the written path to
stdout; --quiet leaves only errors. Errors are one line naming the file, with
the exit codes of `msit_jax.errors`; --verbose adds tracebacks and third-party
logs. Flags are absl flags: booleans are --fold / --nofold.

DST is written whole or not at all: the checkpoint is written into a partial
folder beside it (`.DST.partial-HOST-PID-XXXX`) and renamed to DST when complete,
so a run that is killed (SIGKILL, power loss) leaves no DST, and never one that
looks complete. The next run with the same DST removes the partial folders of
dead runs on this host and writes DST afresh. When DST is an existing folder
with other files, the checkpoint's files are moved into it with the config
(`model_config.json`, the file every loader requires) last; a DST holding
`variables/` without the config (an older interrupted write) is refused with
that explanation.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import Sequence

from absl import flags

from msit_jax import console, errors, flags_util
from msit_jax.inference import api
from msit_jax.io import model_dir, pretrained
from msit_jax.io.torch_io import detect_conv_kind
from msit_jax.models import reparam
from msit_jax.models.config import model_config
from msit_jax.models.encoders import ENCODERS

PROG = "python -m msit_jax.convert"
USAGE = f"usage: {PROG} [flags] SRC DST\n\n{__doc__}"


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, on `fv` (a private FlagValues, see `msit_jax.flags_util`)."""
    flags.DEFINE_enum("encoder", None, list(ENCODERS), "Architecture of a bare "
                      "state_dict (training checkpoints carry it).", flag_values=fv)
    flags.DEFINE_enum("conv", None, ["rim", "plain"], "Layout of a bare state_dict "
                      "(default: detected from its keys).", flag_values=fv)
    flags.DEFINE_bool("fold", False, "Store the re-parameterised (RIM + BatchNorm folded) "
                      "model.", flag_values=fv)
    flags.DEFINE_bool("quiet", False, "Print only errors and the written path (no stages).",
                      flag_values=fv)
    flags_util.define_verbose(fv)


def _convert(f: flags.FlagValues, positionals: Sequence[str]) -> int:
    """The command on parsed flags: SRC DST -> the exit status."""
    console.quiet_logs(f.verbose)
    try:
        if len(positionals) != 2:
            raise errors.UsageError(
                f"give SRC (.pth) and DST (a new directory), got {len(positionals)} "
                f"argument(s){': ' + ' '.join(positionals) if positionals else ''} "
                "(see --help)")
        return _write(f, *positionals)
    except Exception as e:  # noqa: BLE001 - one line per error, see msit_jax.errors
        return errors.report(e, f.verbose)


PARTIAL = "partial"


def _partial_prefix(target: str) -> str:
    return f".{os.path.basename(target)}.{PARTIAL}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process (or we cannot tell): leave its folder
    return True


def remove_stale_partials(target: str) -> list[str]:
    """Remove the partial folders beside `target` left by dead runs on this host
    (`.NAME.partial-HOST-PID-XXXX`, see `partial_dir`); returns their paths. A
    partial folder of a live process, or of another host, is left alone."""
    target = os.path.abspath(target)
    parent, prefix = os.path.dirname(target), _partial_prefix(target)
    host, removed = socket.gethostname(), []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])):
            path = os.path.join(parent, name)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def partial_dir(target: str) -> str:
    """A new empty folder beside `target` to write it in, named
    `.NAME.partial-HOST-PID-XXXX` (after removing the dead runs' ones): rename it
    to `target` when complete (`commit_partial`), remove it on failure."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(target)
    return tempfile.mkdtemp(prefix=f"{_partial_prefix(target)}{socket.gethostname()}-"
                                   f"{os.getpid()}-", dir=parent)


def commit_partial(tmp: str, target: str, last: str | None = None) -> None:
    """Make the complete folder `tmp` (from `partial_dir`) `target`: a rename when
    `target` does not exist or is an empty folder; otherwise (a folder with other
    files) its entries are moved in, `last` (the completion marker) last."""
    if os.path.isdir(target) and not os.listdir(target):
        os.rmdir(target)
    if not os.path.exists(target):
        os.rename(tmp, target)
        return
    names = sorted(os.listdir(tmp), key=lambda n: n == last)
    for name in names:
        os.rename(os.path.join(tmp, name), os.path.join(target, name))
    os.rmdir(tmp)


def check_dst(dst: str) -> str:
    """DST can take a new checkpoint: not a file, not one holding a checkpoint or a
    partial one. OutputError (exit code 7) names the problem."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise errors.OutputError(f"{dst} exists and is not a directory")
    if model_dir.is_model_dir(dst):
        raise errors.OutputError(f"{dst} already holds a model checkpoint")
    var_dir = os.path.join(dst, model_dir.VARIABLES_DIR)
    if os.path.exists(var_dir):
        raise errors.OutputError(
            f"{var_dir} exists without {model_dir.CONFIG_FILE}: a partial checkpoint (an "
            "interrupted write); remove it and run again")
    return dst


def _write(f: flags.FlagValues, src: str, dst: str) -> int:

    quiet = f.quiet
    dst = check_dst(dst)
    cfg = None
    if f.encoder:
        conv = f.conv
        if conv is None:
            sd = pretrained.official_state_dict(pretrained.read_pth(src), src)
            conv = detect_conv_kind(sd)
        cfg = model_config(f.encoder, conv)
    cfg, variables = api.load(src, cfg, fold=f.fold, quiet=quiet, label="checkpoint")
    with console.stage("write", quiet=quiet):
        dst = check_dst(dst)  # again: another run may have written it meanwhile
        tmp = partial_dir(dst)
        try:
            model_dir.save_model(tmp, cfg, variables)
            commit_partial(tmp, dst, last=model_dir.CONFIG_FILE)
        except (errors.OutputError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            # Name the destination the user gave, not the hidden partial folder.
            reason = errors.describe(e).replace(tmp, dst)
            raise errors.OutputError(f"{dst}: cannot be written: {reason}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        path = dst
    print(f"wrote {path} (encoder={cfg.encoder}, conv={cfg.conv}, batch_norm={cfg.batch_norm}, "
          f"{reparam.count_params(variables):,} values)")
    return 0


main = flags_util.entry_point(define_flags, _convert, USAGE)


if __name__ == "__main__":
    sys.exit(main())
