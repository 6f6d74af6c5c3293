"""absl flag parsing with one-line errors and the absl spelling of argparse habits."""

from __future__ import annotations

import pytest
from absl import flags

from msit_jax import errors, flags_util


@pytest.fixture
def fv():
    v = flags.FlagValues()
    flags.DEFINE_bool("progress", True, "bar", flag_values=v)
    flags.DEFINE_bool("fold", True, "fold", flag_values=v)
    flags.DEFINE_string("save_images", None, "dir", flag_values=v)
    flags.DEFINE_integer("chunk", 0, "queries", flag_values=v)
    return v


def test_absl_spellings_are_suggested(fv):
    assert flags_util.suggest(fv, "no-progress") == "--noprogress"
    assert flags_util.suggest(fv, "no_fold") == "--nofold"
    assert flags_util.suggest(fv, "save-images") == "--save_images"
    assert flags_util.suggest(fv, "progres") == "--progress"  # a typo: the closest name
    assert flags_util.suggest(fv, "no-chunk") != "--nochunk"  # not a boolean
    assert flags_util.suggest(fv, "frobnicate") is None


def test_argparse_spellings_get_the_absl_one(fv):
    assert flags_util.argparse_spelling(fv, "--no-progress") == "--noprogress (or --progress)"
    assert flags_util.argparse_spelling(fv, "--no_fold") == "--nofold (or --fold)"
    assert flags_util.argparse_spelling(fv, "--save-images=out/x") == "--save_images=out/x"
    assert flags_util.argparse_spelling(fv, "--save-images") == "--save_images"
    for arg in ("--no-chunk", "--nofold", "--fold", "--frobnicate", "-no-fold", "x"):
        assert flags_util.argparse_spelling(fv, arg) is None, arg


def test_parse_errors_are_one_line_usage_errors(fv):
    assert flags_util.parse(fv, ["prog", "--nofold", "--chunk", "3", "rest"]) == ["prog", "rest"]
    assert fv.fold is False and fv.chunk == 3
    fv.unparse_flags()
    for args, want in [
            (["--no-progress"], "--no-progress is argparse style; this command takes absl "
                                "flags: --noprogress (or --progress)"),
            (["a", "--save-images=d"], "--save-images=d is argparse style; this command takes "
                                       "absl flags: --save_images=d"),
            (["--progres"], "unknown flag --progres; did you mean --progress?"),
            (["--frobnicate"], "unknown flag --frobnicate (see --help)")]:
        with pytest.raises(errors.UsageError) as e:
            flags_util.parse(fv, ["prog"] + args)
        assert str(e.value) == want
        assert e.value.exit_code == errors.EXIT_USAGE
        fv.unparse_flags()
    with pytest.raises(errors.UsageError) as e:
        flags_util.parse(fv, ["prog", "--chunk", "many"])
    assert "\n" not in str(e.value) and "--chunk" in str(e.value)
    # known_only: what fv does not define is left over (for absl's own flags)
    fv.unparse_flags()
    assert flags_util.parse(fv, ["prog", "--verbosity=1", "--nofold", "x"], known_only=True) \
        == ["prog", "--verbosity=1", "x"]


def _command(fv, seen):
    def command(positionals):
        seen.append((list(positionals), fv.fold, fv.chunk))
        return 5 if positionals == ["fail"] else 0
    return command


def test_main_with_argv_returns_the_status(fv, capsys):
    """main(fv, command, usage, argv): help (0, stdout), a one-line error (2, stderr), or
    command(positionals)'s status; '--' ends the flags."""
    seen = []
    usage = "usage: prog [flags] FILE\n\nDoes things."
    assert flags_util.main(fv, _command(fv, seen), usage, ["a", "--nofold", "--chunk=4",
                                                          "--", "--progress"]) == 0
    assert seen == [(["a", "--progress"], False, 4)]
    assert flags_util.main(fv, _command(fv, seen), usage, ["fail"]) == 5
    assert capsys.readouterr() == ("", "")
    assert flags_util.main(fv, _command(fv, seen), usage, ["--no-fold", "a"]) == 2
    assert capsys.readouterr().err == ("error: --no-fold is argparse style; this command takes "
                                       "absl flags: --nofold (or --fold)\n")
    for help_flag in ("--help", "-h", "--helpfull"):
        assert flags_util.main(fv, _command(fv, seen), usage, ["x", help_flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith(usage + "\n\nflags:\n")
        assert "--[no]fold: fold" in out and "--chunk: queries" in out
        assert "--helpfull" not in out and ":\n" not in out.split("flags:", 1)[1]
    assert len(seen) == 2  # neither errors nor help ran the command


_APP = """
import sys
from absl import flags
from msit_jax import flags_util

fv = flags.FlagValues()
flags.DEFINE_bool("fold", True, "fold", flag_values=fv)
flags_util.define_verbose(fv)

def command(positionals):
    print("ran", positionals, fv.fold, flags.FLAGS.verbosity)
    return 3

flags_util.main(fv, command, "usage: app [flags]")
print("not reached")
"""


def test_main_without_argv_runs_absl_app_and_exits(tmp_path):
    """The console-script path: absl.app.run on sys.argv, exiting with the command's
    status; absl's own flags (--verbosity) still work; errors are one line."""
    import subprocess
    import sys

    def app(*args):
        return subprocess.run([sys.executable, "-c", _APP, *args], capture_output=True,
                              text=True, timeout=120)

    p = app("in.png", "--nofold", "--verbosity=-1")
    assert (p.returncode, p.stdout, p.stderr) == (3, "ran ['in.png'] False -1\n", "")
    p = app("--no_fold")
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == ("error: --no_fold is argparse style; this command takes absl flags: "
                        "--nofold (or --fold)\n")
    p = app("--verbosty=1")
    assert (p.returncode, p.stderr) == (2, "error: unknown flag --verbosty; did you mean "
                                           "--verbose?\n")
    p = app("--help")
    assert p.returncode == 0 and p.stdout.startswith("usage: app [flags]\n\nflags:\n")
    assert "--[no]verbose" in p.stdout and "verbosity" not in p.stdout and p.stderr == ""


def test_define_verbose_once_per_flag_values():
    v = flags.FlagValues()
    a = flags_util.define_verbose(v)
    b = flags_util.define_verbose(v)  # a second definition on the same FlagValues
    assert a.name == b.name == "verbose"
    flags_util.parse(v, ["prog", "--verbose"])
    assert a.value is True and b.value is True
