"""evaluate under bad outputs and inputs: unwritable outputs refused before any work, a late
write failure keeps the printed table, paired LR checked per axis, dataset names kept inside
the output folder.

Parts that start processes or train are marked `slow`.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from msit_jax import errors
from msit_jax.eval import cli as evaluate_cli, protocol, reports, runner
from tests.conftest import assert_one_line_error, save_img


# ----------------------------------------------------------------------------

def _evaluate_main(args: list[str]) -> int:
    """evaluate.py's command in this process (its flags parsed into a FlagValues of
    its own)."""
    return evaluate_cli.main(args)


@pytest.fixture
def mini(tmp_path):
    d = tmp_path / "Mini"
    d.mkdir()
    save_img(d / "p.png", 30, 26, seed=1)
    save_img(d / "q.png", 30, 26, seed=2)
    return str(d)


def test_unwritable_outputs_fail_before_evaluating(tmp_path, mini, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for flag in ("--json", "--save_images", "--plot"):
        rc = _evaluate_main(["--model", "bicubic", "--data", mini, "--scales", "2",
                             "--noprogress", flag, str(blocker / "out")])
        cap = capsys.readouterr()
        assert rc == errors.EXIT_OUTPUT and "PSNR" not in cap.err
        assert_one_line_error(cap.err, flag, f"{blocker} is a file, not a directory")
    for bad in ("inf", "nan"):
        rc = _evaluate_main(["--model", "bicubic", "--data", mini, "--scales", bad])
        assert rc == errors.EXIT_USAGE
        assert_one_line_error(capsys.readouterr().err, "--scales")


def test_a_late_write_failure_keeps_the_table(tmp_path, mini, capsys, monkeypatch):
    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reports, "write_json", full_disk)
    rc = _evaluate_main(["--model", "bicubic", "--data", mini, "--scales", "2",
                         "--noprogress", "--json", str(tmp_path / "r.json")])
    cap = capsys.readouterr()
    assert rc == errors.EXIT_OUTPUT
    assert "| Bicubic | Mini |" in cap.out  # the finished work is printed
    assert "--json" in cap.err and "No space left on device" in cap.err


def test_paired_lr_is_checked_in_both_dimensions():
    hr = np.zeros((60, 48, 3), np.uint8)
    with pytest.raises(errors.InputError, match=r"scale 2 \(height\) and 4 \(width\)"):
        protocol.pair(hr, np.zeros((30, 10, 3), np.uint8), 2, "x.png")
    gt, hw = protocol.pair(hr, np.zeros((30, 24, 3), np.uint8), 2, "x.png")
    assert gt.shape == (60, 48, 3) and hw == (60, 48)


def test_dataset_names_cannot_escape_the_output_folder(tmp_path, mini):
    out = tmp_path / "deep" / "OUT"
    cfg = runner.default_config()
    cfg.model, cfg.data, cfg.scales, cfg.progress = "bicubic", [f"../../x={mini}"], [2.0], False
    cfg.save_images = str(out)
    runner.run(cfg)
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
               if f.endswith(".png") and "Mini" not in d]
    assert written and all(w.startswith(str(out) + os.sep) for w in written)
    assert reports.safe_component("../../x") == "x"
    assert reports.safe_component("div2k/bicubic_x4") == "div2k_bicubic_x4"
