r"""Train MSIT (`msit-train`, or `python train.py` in a checkout).

    msit-train --config default --workdir runs/default
    msit-train --config configs/default.py --workdir runs/default      # the same, by path
    msit-train --config msit_edsr_stage1 --workdir runs/edsr_s1 \
        --config.data.train.path=/data/DIV2K/DIV2K_train_HR
    msit-train --config configs/msit_edsr_stage2_rim.py --workdir runs/edsr_s2 \
        --config.init_from=runs/edsr_s1

--config is a config file or the name of one that ships in the package
(msit_jax/configs: default, tiny, msit_lite, msit_edsr_stage1, ...); an existing
path always wins, and a configs/NAME.py that does not exist (outside a checkout)
is the packaged NAME. Any field of the config can be overridden with
--config.<field>=value after --config (see msit_jax/training/config.py for the
fields). Flags are absl flags: booleans are --verbose / --noverbose.

Re-running a command on an existing workdir resumes from its latest good
checkpoint; a changed config is compared with the stored one first (see
docs/training.md). A run shorter than its warm-up (`--config.total_steps=50`)
warms up for total_steps // 10 steps instead, with one warning line. Image
sizes, where printed, are H x W (height first).

Errors are one line (`error: ...`) naming the file, flag or field, with the
exit codes of `msit_jax.errors` (2 usage, 3 config, 4 data, 5 checkpoint,
6 non-finite, 7 output, 9 the workdir is in use by another run, 10 another
process of a multi-process run died, 143 / 130 after SIGTERM / SIGINT once a
checkpoint is saved); --verbose adds the traceback.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Optional, Sequence

from absl import flags
from ml_collections import config_flags

from msit_jax import configs, console, errors, flags_util

PROG = "msit-train"
USAGE = (f"usage: {PROG} --config NAME|FILE --workdir DIR [--config.<field>=value ...]\n\n"
         f"{__doc__}")

# Modules of the `train` extra (pip install "msit-jax[train]"), by distribution name: a
# missing one is an incomplete install, said as such instead of as a traceback.
TRAIN_MODULES = {"grain": "grain", "tensorflow_datasets": "tensorflow-datasets",
                 "array_record": "array-record"}


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
    """This command's flags, in a FlagValues of their own.

    Not absl's global FLAGS: every call starts from the defaults (tests call `main`
    repeatedly), and the other CLIs can define --config or --verbose in the same
    process. `argv` tells ml_collections which --config.<field> overrides to define.
    """
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Training config: a file (configs/*.py) or a packaged config's name "
        f"({', '.join(configs.names())}); override a field with "
        "--config.<field>=value after it (see msit_jax/training/config.py for the "
        "fields).", flag_values=fv, lock_config=True,
        sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the demo output "
                        "(created with its parents; an existing one is resumed).",
                        flag_values=fv)
    flags_util.define_verbose(fv)
    flags_util.define_compile_cache(fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    return fv


def _verbose_requested(argv: Sequence[str]) -> bool:
    return any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """`argv` with the value of --config (`--config X`, `--config=X`) replaced by the file
    it names (`msit_jax.configs.resolve`: a path, or a packaged config's name).

    Raises errors.ConfigError (3) for a value that is neither an existing file nor a
    packaged config: one line with the names, instead of ml_collections' loader error.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name not in ("--config", "-config"):
            continue
        j = i if eq else i + 1
        if j >= len(out):
            break  # absl reports the missing value
        value = value if eq else out[j]
        resolved = configs.resolve(value)
        if not os.path.exists(resolved) and ":" not in value:
            raise errors.ConfigError(
                f"--config {value}: no such file, and no packaged config of that name "
                f"({', '.join(configs.names())})")
        out[j] = f"{name}={resolved}" if eq else resolved
    return out


def parse_flags(fv: flags.FlagValues, argv: Sequence[str], *, known_only: bool = False
                ) -> list[str]:
    """`flags_util.parse` with training's exit codes: errors.UsageError (2), or
    errors.ConfigError (3) for a --config.<field> flag, an unknown config field or a
    config file that fails to load. --config takes a packaged config's name too
    (`resolve_config_args`)."""
    argv = resolve_config_args(argv)
    try:
        return flags_util.parse(fv, argv, known_only=known_only)
    except errors.UsageError as e:
        if "--config." in str(e):
            raise errors.ConfigError(str(e)) from None
        raise
    except Exception as e:  # noqa: BLE001 - the config file or an override failed
        if _verbose_requested(argv):
            raise
        # ml_collections raises AttributeError / KeyError "'name'" for an unknown field.
        name = str(e).strip("\"'")
        override = next((a for a in argv[1:] if re.match(rf"--config\.(\S+\.)?{re.escape(name)}"
                                                         r"(=|$)", a)), None)
        if override is not None and isinstance(e, (AttributeError, KeyError)):
            field = override.split("=", 1)[0][len("--config."):]
            raise errors.ConfigError(f"unknown config field {field!r} in {override}; see "
                                     "msit_jax/training/config.py for the fields") from None
        raise errors.ConfigError(f"--config: {errors.describe(e)}") from None


def _missing_train_module(exc: BaseException) -> Optional[str]:
    """The distribution to install when `exc` is a missing module of the train extra."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return TRAIN_MODULES.get(exc.name.split(".")[0])
    return None


def run(fv: flags.FlagValues, positionals: Sequence[str]) -> int:
    """Train per the parsed flags; the exit status."""
    console.quiet_logs(fv.verbose)  # before jax, orbax and grain are imported
    if positionals:
        return errors.report(errors.UsageError(
            f"unexpected arguments: {' '.join(positionals)} (see --help)"))
    t0 = time.perf_counter()
    try:
        # Imported here: flag and config errors come back without importing jax.
        from msit_jax.training import train_and_evaluate

        result = train_and_evaluate(fv.config, fv.workdir)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one line, see msit_jax.errors
        package = _missing_train_module(e)
        if package is not None and not fv.verbose:
            print(f"error: training needs the {package} package: "
                  f"{console.install_hint('train')}",
                  file=sys.stderr, flush=True)
            return errors.EXIT_FAILURE
        code = errors.report(e, fv.verbose)
        if isinstance(e, errors.PeerLost):
            # Not a normal exit: jax.distributed's shutdown would wait for the dead peer
            # at a barrier, then abort.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    console.note(f"trained to step {result.step} in {time.perf_counter() - t0:.0f} s; "
                 f"checkpoints and logs in {fv.workdir}")
    console.note_compile_cache()
    return errors.EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `msit-train` console script and `python train.py`.

    Without argv: absl.app.run on sys.argv, exiting with the status. With argv
    (the arguments after the program name, for tests and scripts): the exit
    status is returned.
    """
    full = list(sys.argv) if argv is None else [PROG] + list(argv)
    fv = define_flags(full)
    return flags_util.main(fv, lambda positionals: run(fv, positionals), USAGE, argv,
                           parser=parse_flags, prog=PROG)


if __name__ == "__main__":
    main()
