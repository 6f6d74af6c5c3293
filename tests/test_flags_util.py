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
    assert flags_util.suggest("no-progress", fv) == "--noprogress"
    assert flags_util.suggest("no_fold", fv) == "--nofold"
    assert flags_util.suggest("save-images", fv) == "--save_images"
    assert flags_util.suggest("progres", fv) == "--progress"  # a typo: the closest name
    assert flags_util.suggest("no-chunk", fv) != "--nochunk"  # not a boolean
    assert flags_util.suggest("frobnicate", fv) is None


def test_parse_errors_are_one_line_usage_errors(fv):
    assert flags_util.parse(["prog", "--nofold", "--chunk", "3", "rest"], fv) == ["prog", "rest"]
    assert fv.fold is False and fv.chunk == 3
    fv.unparse_flags()
    with pytest.raises(errors.UsageError) as e:
        flags_util.parse(["prog", "--no-progress"], fv)
    assert str(e.value) == "unknown flag --no-progress; did you mean --noprogress?"
    assert e.value.exit_code == errors.EXIT_USAGE
    with pytest.raises(errors.UsageError, match="^unknown flag --frobnicate$"):
        flags_util.parse(["prog", "--frobnicate"], fv)
    with pytest.raises(errors.UsageError) as e:
        flags_util.parse(["prog", "--chunk", "many"], fv)
    assert "\n" not in str(e.value) and "chunk" in str(e.value)


def test_parse_or_exit_prints_one_line_and_exits_2(fv, capsys):
    with pytest.raises(SystemExit) as e:
        flags_util.parse_or_exit(["prog", "--no-fold"], fv)
    assert e.value.code == errors.EXIT_USAGE
    assert capsys.readouterr().err == "error: unknown flag --no-fold; did you mean --nofold?\n"


def test_define_verbose_once_per_process():
    v = flags.FlagValues()
    a = flags_util.define_verbose(v)
    b = flags_util.define_verbose(v)  # a second CLI module imported in the same process
    assert a.name == b.name == "verbose"
    flags_util.parse(["prog", "--verbose"], v)
    assert a.value is True and b.value is True
