"""absl flag parsing for the command lines: one-line errors, absl spellings suggested.

Every entry point (train.py, evaluate.py, `python -m msit_jax.upscale`,
`python -m msit_jax.convert`) parses absl flags. absl spells a false boolean
`--nofold`, not argparse's `--no-fold`, and calls the latter an unknown flag;
this module turns that (and any other flag error) into one line that names the
spelling absl wants:

    error: unknown flag --no-progress; did you mean --noprogress?

Use it as the flags parser of `absl.app.run`, from a zero-argument `main()`:

    from absl import app
    from msit_jax import flags_util

    VERBOSE = flags_util.define_verbose()

    def main() -> None:
        app.run(_main, flags_parser=flags_util.parse_or_exit)

`parse` raises `errors.UsageError` instead (for in-process callers and tests).
"""

from __future__ import annotations

import difflib
import sys
from typing import Optional, Sequence

from absl import flags

from msit_jax import errors


def define_verbose(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """The shared --verbose flag (tracebacks, third-party logs), defined once per process
    however many command-line modules are imported (absl refuses the same name from two
    modules)."""
    if "verbose" in flag_values:
        return flags.FlagHolder(flag_values, flag_values["verbose"])
    return flags.DEFINE_bool("verbose", False, "Print the traceback of an error and the "
                             "libraries' INFO/WARNING logs.", flag_values=flag_values)


def _is_bool(flag_values: flags.FlagValues, name: str) -> bool:
    return name in flag_values and bool(getattr(flag_values[name], "boolean", False))


def suggest(name: str, flag_values: flags.FlagValues = flags.FLAGS) -> Optional[str]:
    """The flag absl would accept for a mistyped `name` (without dashes), or None.

    'no-progress' / 'no_progress' -> '--noprogress' (absl's false boolean);
    'save-images' -> '--save_images'; else the closest defined name, if close.
    """
    norm = name.replace("-", "_")
    for prefix in ("no_", "no"):
        rest = norm[len(prefix):]
        if norm.startswith(prefix) and _is_bool(flag_values, rest):
            return f"--no{rest}"
    if norm in flag_values:
        return f"--{norm}"
    names = [n for n in flag_values if len(n) > 1]
    names += [f"no{n}" for n in names if _is_bool(flag_values, n)]
    close = difflib.get_close_matches(norm, names, n=1, cutoff=0.75)
    return f"--{close[0]}" if close else None


def describe_flag_error(e: flags.Error, flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """One line for an absl flag error, with the absl spelling for an unknown flag."""
    if isinstance(e, flags.UnrecognizedFlagError) and getattr(e, "flagname", None):
        line = f"unknown flag --{e.flagname}"
        hint = suggest(e.flagname, flag_values)
        return f"{line}; did you mean {hint}?" if hint else line
    return errors.one_line(str(e))


def parse(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parse `argv` (argv[0]: the program) into `flag_values`; the arguments left over.

    Raises errors.UsageError with one line (see `describe_flag_error`).
    """
    try:
        return flag_values(list(argv))
    except flags.Error as e:
        raise errors.UsageError(describe_flag_error(e, flag_values)) from None


def parse_or_exit(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
                  ) -> list[str]:
    """`parse`, printing `error: <one line>` to stderr and exiting 2 on a flag error: the
    `flags_parser` of `absl.app.run`."""
    try:
        return parse(argv, flag_values)
    except errors.UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_USAGE)
