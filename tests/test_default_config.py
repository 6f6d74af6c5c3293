"""The README's headline command, `python train.py --config configs/default.py`, run as a
user runs it (a subprocess), shortened through --config overrides: a few steps, small
evaluation crops, the end-of-run demo on. Checks the printed PSNR table and the PNG."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msit_jax.data.sources import EmbeddedSource
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # a subprocess that trains and evaluates

STEPS = 4
MAX_SIDE = 64  # evaluation on central 64 x 64 crops of the held-out images
WINDOW = 32  # side-by-side panels: 32 x 32
# `x2 |     14.07 |        26.99 |    -12.92`: scale | MSIT (dB) | bicubic (dB) | gain (dB)
ROW = re.compile(r"^\s*x(\S+)\s*\|\s*(\S+)\s*\|\s*(\S+)\s*\|\s*(\S+)\s*$")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("default") / "run"
    cmd = [sys.executable, "train.py", "--config", "configs/default.py", "--workdir",
           str(workdir),
           f"--config.total_steps={STEPS}", "--config.lr.warmup_steps=1",
           "--config.eval.every_steps=0",  # no validation pass; the demo evaluates
           f"--config.eval.max_side={MAX_SIDE}", f"--config.demo.window={WINDOW}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, workdir


def test_default_config_prints_the_demo_table(default_run):
    p, workdir = default_run
    head = next(i for i, line in enumerate(p.stdout.splitlines()) if "MSIT (dB)" in line)
    lines = p.stdout.splitlines()[head:]
    assert "bicubic (dB)" in lines[0] and "PSNR" in p.stdout.splitlines()[head - 1]
    rows = [m.groups() for m in map(ROW.match, lines[2:6]) if m]
    assert [r[0] for r in rows] == ["2", "3", "4", "6"], lines[:7]
    msit, bicubic, gain = (np.array([float(r[k]) for r in rows]) for k in (1, 2, 3))
    assert all(math.isfinite(v) for v in np.concatenate([msit, bicubic, gain]))
    np.testing.assert_allclose(gain, msit - bicubic, atol=0.011)
    # bicubic on natural photographs: plausible PSNRs, worse at every larger scale
    assert np.all((bicubic > 15) & (bicubic < 45)) and np.all(np.diff(bicubic) < 0), bicubic
    assert np.all(msit > 15), msit  # a few steps from a random init, yet an image, not noise
    # the table shows what demo.json records
    saved = json.loads((workdir / "demo.json").read_text())
    assert sorted(saved) == ["x2", "x3", "x4", "x6"]
    np.testing.assert_allclose([saved[f"x{s}"]["msit"] for s in (2, 3, 4, 6)], msit, atol=0.006)
    np.testing.assert_allclose([saved[f"x{s}"]["bicubic"] for s in (2, 3, 4, 6)], bicubic,
                               atol=0.006)


def test_default_config_writes_the_side_by_side_png(default_run):
    p, workdir = default_run
    png = workdir / "demo_x4.png"
    assert str(png) in p.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        # side_by_side: LR nearest | bicubic | MSIT | HR, WINDOW wide each, 4-px gaps,
        # under a 16-px caption row
        assert im.size == (4 * WINDOW + 3 * 4, WINDOW + 16)  # PIL size is (W, H)
        pixels = np.asarray(im)
    # the HR panel (bottom right) is the central crop of the first held-out image
    hr = EmbeddedSource("val")[0]
    for side in (MAX_SIDE, WINDOW):
        h, w = hr.shape[:2]
        y, x = (h - min(h, side)) // 2, (w - min(w, side)) // 2
        hr = hr[y:y + side, x:x + side]
    np.testing.assert_array_equal(pixels[-WINDOW:, -WINDOW:], hr)
    # the MSIT panel is an image, not a constant fill
    msit_panel = pixels[-WINDOW:, 2 * (WINDOW + 4):2 * (WINDOW + 4) + WINDOW]
    assert msit_panel.std() > 1.0
