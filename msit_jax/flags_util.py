"""The one flag-handling path of every command line: absl flags on a private FlagValues.

Every entry point (train.py / msit-train, evaluate.py / msit-evaluate,
`python -m msit_jax.inference`, `python -m msit_jax.convert`, `python -m
msit_jax.export`, `python -m msit_jax.demo`) defines its flags on a
`flags.FlagValues()` of its own, made per call: commands that share a flag
name (--checkpoint, --chunk, --fold) do not clash in one process, and
`main(argv)` starts from the defaults every time (tests call it repeatedly).
This module parses such a FlagValues and gives every command the same
behaviour:

* errors are one line, `error: ...` on stderr, exit 2 (`errors.EXIT_USAGE`;
  a command's own parser may raise another `errors.MsitError`, e.g. training's
  config errors, exit 3);
* argparse habits get the absl spelling: absl spells a false boolean `--nofold`
  and multi-word names with underscores, and would call `--no-fold` or
  `--max-memory-gb=3` just unknown:

      error: --no-fold is argparse style; this command takes absl flags: --nofold (or --fold)
      error: --max-memory-gb=3 is argparse style; this command takes absl flags: --max_memory_gb=3
      error: unknown flag --progres; did you mean --progress?

* `--help` (`-h`, `-?`, `--helpfull`, ...) prints the command's usage (its module
  docstring) and its flags on stdout and exits 0; run from the command line, the
  `usage:` line names the program as it was invoked (`msit-upscale`, `python -m
  msit_jax.inference`, `python evaluate.py`: `invoked_program`);
* a command's `main(argv=None)`: without argv it runs `absl.app.run` on sys.argv and
  exits with the status (a console-script entry point); with argv (the arguments
  after the program name) it returns the status.

A command module:

    def define_flags(fv: flags.FlagValues) -> None: ...   # flags.DEFINE_*(..., flag_values=fv)

    def _run(fv: flags.FlagValues, positionals: list[str]) -> int: ...   # exit status

    main = flags_util.entry_point(define_flags, _run, USAGE)

(`main(fv, command, usage, argv, parser=...)` is the body underneath, for a command
with its own parser, as training's config flags need.)
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from typing import Callable, NoReturn, Optional, Protocol, Sequence

from absl import flags

from msit_jax import console, errors

from msit_jax.inference import engine
from msit_jax.ops.runtime import DTYPES, PRECISIONS

# absl's help flags (and argparse's -h): answered with the command's own help, since
# absl's lists only the flags of the __main__ module's global FLAGS and exits 1.
HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort", "--helpfull",
              "-helpfull", "--helpxml", "-helpxml")

Command = Callable[[list[str]], int]


class Parser(Protocol):
    """`parse`'s signature: a command with its own error mapping passes one of these."""

    def __call__(self, fv: flags.FlagValues, argv: Sequence[str], *,
                 known_only: bool = False) -> list[str]: ...


def define_verbose(fv: flags.FlagValues) -> flags.FlagHolder:
    """The shared --verbose flag (tracebacks, third-party logs) on `fv`; the existing
    one when `fv` has it already (absl refuses a second definition)."""
    if "verbose" in fv:
        return flags.FlagHolder(fv, fv["verbose"])
    return flags.DEFINE_bool("verbose", False, "Print the traceback of an error and the "
                             "libraries' INFO/WARNING logs.", flag_values=fv)


def define_compile_cache(fv: flags.FlagValues) -> flags.FlagHolder:
    """The shared --compile_cache flag on `fv`: JAX's persistent compilation cache, turned
    on by `run_app` (the command-line path) for commands that define it."""
    return flags.DEFINE_bool(
        "compile_cache", True, "Keep compiled XLA programs between runs, in "
        "$XDG_CACHE_HOME/msit-jax/jax (default ~/.cache/msit-jax/jax; JAX_COMPILATION_CACHE_DIR "
        f"chooses another folder); --nocompile_cache or {console.NO_COMPILE_CACHE_ENV}=1 "
        "turns it off.", flag_values=fv)


def _flag(fv: flags.FlagValues, name: str, default: bool) -> bool:
    return bool(fv[name].value) if name in fv else default


def decoder_help() -> str:
    """--decoder's help, built from msit_jax.inference so it cannot drift from the
    thresholds 'auto' uses (explicit platforms keep --help from starting JAX)."""
    cpu, accel = engine.grid_min_queries("cpu"), engine.grid_min_queries("gpu")
    return ("Decoder formulation: grid (queries grouped by LR centre, fast at large "
            "scales), query (the reference's per-query form) or auto: grid when the output "
            "has at least msit_jax.inference.engine.grid_min_queries() pixels per input pixel, "
            f"{cpu:g} (x{math.sqrt(cpu):g}) on CPU and {accel:g} (x{math.sqrt(accel):g}) on "
            "GPU/TPU. All agree to float32 round-off.")


def define_execution_flags(fv: flags.FlagValues) -> None:
    """How the model runs, for every command that runs it: --decoder and the
    `RuntimeOptions` fields --precision, --dtype, --fft_min_kernel."""
    flags.DEFINE_enum("decoder", "auto", ["auto", "grid", "query"], decoder_help(),
                      flag_values=fv)
    flags.DEFINE_enum("precision", "highest", list(PRECISIONS), "Matmul/conv precision: "
                      "highest (float32, the reference numerics), high or default (TF32 / "
                      "bf16 passes on GPU and TPU).", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype (bfloat16: float32 "
                      "weights and accumulation).", flag_values=fv)
    flags.DEFINE_integer("fft_min_kernel", -1, "Multi-scale convs with kernels at least this "
                         "large run as FFT products; 0 never; -1 per platform (17 on CPU, "
                         "never on GPU/TPU).", flag_values=fv)


def _is_bool(fv: flags.FlagValues, name: str) -> bool:
    return name in fv and isinstance(fv[name], flags.BooleanFlag)


def argparse_spelling(fv: flags.FlagValues, arg: str) -> Optional[str]:
    """The absl spelling of an argparse-style argument `arg` ('--no-fold',
    '--no_fold', '--max-memory-gb=3'), as '--nofold (or --fold)' /
    '--max_memory_gb=3'; None when `arg` is not one for a flag of `fv`."""
    if not arg.startswith("--"):
        return None
    name, eq, value = arg[2:].partition("=")
    under = name.replace("-", "_")
    if under.startswith("no_") and _is_bool(fv, under[3:]):
        return f"--no{under[3:]} (or --{under[3:]})"
    if "-" in name and under in fv:
        return f"--{under}{eq}{value}"
    return None


def suggest(fv: flags.FlagValues, name: str) -> Optional[str]:
    """The flag absl would accept for a mistyped `name` (without dashes), or None.

    'no-progress' / 'no_progress' -> '--noprogress' (absl's false boolean);
    'save-images' -> '--save_images'; else the closest defined name, if close.
    """
    norm = name.replace("-", "_")
    for prefix in ("no_", "no"):
        rest = norm[len(prefix):]
        if norm.startswith(prefix) and _is_bool(fv, rest):
            return f"--no{rest}"
    if norm in fv:
        return f"--{norm}"
    names = [n for n in fv if len(n) > 1]
    names += [f"no{n}" for n in names if _is_bool(fv, n)]
    close = difflib.get_close_matches(norm, names, n=1, cutoff=0.75)
    return f"--{close[0]}" if close else None


def describe_flag_error(fv: flags.FlagValues, e: flags.Error) -> str:
    """One line for an absl flag error: the absl spelling of an argparse-style flag,
    the closest flag of `fv` for an unknown one, else absl's message on one line."""
    name = getattr(e, "flagname", None)
    if isinstance(e, flags.UnrecognizedFlagError) and name:
        arg = getattr(e, "flagvalue", None) or f"--{name}"
        spelling = argparse_spelling(fv, arg)
        if spelling is not None:
            return f"{arg} is argparse style; this command takes absl flags: {spelling}"
        hint = suggest(fv, name)
        return f"unknown flag --{name}" + (f"; did you mean {hint}?" if hint else
                                           " (see --help)")
    return f"{errors.one_line(str(e))} (see --help)"


def parse(fv: flags.FlagValues, argv: Sequence[str], *, known_only: bool = False
          ) -> list[str]:
    """Parse `argv` (argv[0]: the program) into `fv`: argv[0] and the arguments left over
    (with `known_only`, the flags `fv` does not define are left over too).

    Raises errors.UsageError with one line (see `describe_flag_error`).
    """
    try:
        return fv(list(argv), known_only=known_only)
    except flags.Error as e:
        raise errors.UsageError(describe_flag_error(fv, e)) from None


def wants_help(args: Sequence[str]) -> bool:
    """Whether a help flag is among the flags in `args` (those before a '--')."""
    args = list(args)
    flag_args = args[:args.index("--")] if "--" in args else args
    return any(a in HELP_FLAGS for a in flag_args)


# The program in a command's `usage: PROG ...` line: `python -m MODULE`, `python FILE`
# or one word (msit-train, evaluate.py).
_USAGE_PROG = re.compile(r"^usage: (python3? -m \S+|python3? \S+|\S+)")
# The package's folder: a module run as `python -m msit_jax.x` has argv[0] inside it.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(errors.__file__))


def invoked_program(argv0: Optional[str] = None) -> Optional[str]:
    """The program as the user ran it, from `argv0` (default sys.argv[0]): a console
    script's name (`msit-upscale`), `python -m msit_jax.inference` for a module of this
    package run with -m, `python evaluate.py` for another script; None when argv[0]
    says nothing (`python -c`, an embedded interpreter)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if not argv0 or argv0 in ("-c", "-"):
        return None
    path = os.path.abspath(argv0)
    if path.endswith(".py") and path.startswith(_PACKAGE_DIR + os.sep):
        rel = os.path.relpath(path, os.path.dirname(_PACKAGE_DIR))[:-len(".py")]
        parts = rel.split(os.sep)
        if parts[-1] == "__main__":
            parts = parts[:-1]
        return "python -m " + ".".join(parts)
    name = os.path.basename(argv0)
    return f"python {argv0}" if name.endswith(".py") else name


def help_text(fv: flags.FlagValues, usage: str, prog: Optional[str] = None) -> str:
    """`usage` and the help of `fv`'s flags (without absl's per-module headings); with
    `prog`, the `usage:` line names that program instead of the one `usage` was written
    with."""
    usage = usage.strip()
    if prog:
        usage = _USAGE_PROG.sub(lambda m: f"usage: {prog}", usage, count=1)
    lines = fv.get_help(include_special_flags=False).splitlines()
    return f"{usage}\n\nflags:\n" + "\n".join(ln for ln in lines if ln.startswith(" "))


def run_command(fv: flags.FlagValues, command: Command, args: Sequence[str], usage: str, *,
                parser: Parser = parse, prog: str = "prog") -> int:
    """In this process: parse `args` (the arguments after the program name) into `fv` and
    return command(positionals)'s exit status; 0 after printing the help, or the code of
    the one-line parse error printed (`parser` raises it as an errors.MsitError)."""
    args = list(args)
    if wants_help(args):
        print(help_text(fv, usage), flush=True)
        return errors.EXIT_OK
    try:
        rest = parser(fv, [prog] + args)
    except errors.MsitError as e:
        return errors.report(e)
    return command(rest[1:])


def run_app(fv: flags.FlagValues, command: Command, usage: str, *,
            parser: Parser = parse) -> NoReturn:
    """`absl.app.run` on sys.argv with `fv`'s flags: exits with command(positionals)'s
    status (0 after the help, the parse error's code after its line).

    The flags `fv` does not define go on to absl's global FLAGS, which hold absl's own
    flags (--verbosity, --only_check_args) and libraries'; an unknown flag is an error
    there (reported with `fv`'s spelling hints). app.run insists that FLAGS are parsed,
    and sets up absl logging as programs run by absl expect (training's absl warning
    lines keep their format).

    A command that defines --compile_cache (`define_compile_cache`) gets JAX's persistent
    compilation cache here, before it runs (`console.enable_compile_cache`): a
    process-wide setting, made for programs run from a shell and never by `run_command`
    (a caller's own process).
    """
    from absl import app

    def flags_parser(argv: list[str]) -> list[str]:
        if wants_help(argv[1:]):
            try:
                print(help_text(fv, usage, invoked_program(argv[0] if argv else None)),
                      flush=True)
            except BrokenPipeError:  # `--help | head`: the reader stopped, which is fine
                # Python's recipe: point stdout at devnull so its flush at exit is silent.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(errors.EXIT_OK)
        try:
            rest = parser(fv, argv, known_only=True)
            try:
                return flags.FLAGS(rest)
            except flags.Error as e:
                raise errors.UsageError(describe_flag_error(fv, e)) from None
        except errors.MsitError as e:
            sys.exit(errors.report(e))

    def run(rest: list[str]) -> int:
        if _flag(fv, "compile_cache", False):
            console.quiet_logs(_flag(fv, "verbose", False))  # before jax is configured
            console.enable_compile_cache()
        return command(list(rest[1:]))

    app.run(run, flags_parser=flags_parser)
    raise AssertionError("absl.app.run returned")  # it always exits


def main(fv: flags.FlagValues, command: Command, usage: str,
         argv: Optional[Sequence[str]] = None, *, parser: Parser = parse,
         prog: str = "prog") -> int:
    """The body of a command's `main(argv=None)`.

    Without argv: `run_app` on sys.argv (exits with the status: a console-script entry
    point). With argv (the arguments after the program name, for tests and scripts):
    `run_command`, returning the status.
    """
    if argv is None:
        run_app(fv, command, usage, parser=parser)
    return run_command(fv, command, argv, usage, parser=parser, prog=prog)


def entry_point(define_flags: Callable[[flags.FlagValues], None],
                run: Callable[[flags.FlagValues, Sequence[str]], int], usage: str, *,
                prog: str = "prog") -> Callable[..., int]:
    """A command's `main(argv=None)`: fresh FlagValues per call, `define_flags` on them,
    then `run(fv, positionals)`.

    Without argv: absl.app.run on sys.argv, exiting with the status (a console-script
    entry point). With argv (the arguments after the program name, for tests and
    scripts): the exit status is returned.
    """
    def command_main(argv: Optional[Sequence[str]] = None) -> int:
        fv = flags.FlagValues()
        define_flags(fv)
        return main(fv, lambda positionals: run(fv, positionals), usage, argv, prog=prog)

    command_main.__doc__ = ("The command line. Without argv: runs on sys.argv and exits with "
                            "the status; with argv (after the program name): returns it.")
    return command_main
