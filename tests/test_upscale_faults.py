"""The upscale command under bad inputs: never over an input or an existing file, non-finite
weights and outputs refused, model folders validated in one line, and each input failing on
its own with the memory bounds checked before any decoding.

Parts that start processes or train are marked `slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib

import jax
import numpy as np
import pytest

from msit_jax.io import model_dir as mdir, pretrained
from msit_jax import errors, images, tiny_model_config
from msit_jax.inference import cli as upscale
from msit_jax.models.random_init import random_variables
from tests.conftest import assert_one_line_error, run_python, save_img


# ----------------------------------------------------------------------------

def test_output_never_overwrites_input_and_existing_needs_overwrite(tmp_path, tiny_model_dir,
                                                                    capsys):
    ckpt, _ = tiny_model_dir
    src = save_img(tmp_path / "selfin.png", 12, 14)
    before = open(src, "rb").read()
    rc = upscale.main([src, "--checkpoint", ckpt, "--scale", "2", "-o", src, "--noprogress"])
    assert rc == errors.EXIT_OUTPUT
    assert_one_line_error(capsys.readouterr().err, "is the input")
    assert open(src, "rb").read() == before
    # a directory output whose file name collides with an input is caught too
    rc = upscale.main([src, "--checkpoint", ckpt, "--scale", "2", "-o", str(tmp_path),
                       "--noprogress"])
    assert rc == errors.EXIT_OUTPUT and open(src, "rb").read() == before
    capsys.readouterr()
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    rc = upscale.main([src, "--checkpoint", ckpt, "--scale", "2", "-o", str(out),
                       "--noprogress"])
    assert rc == errors.EXIT_OUTPUT and out.read_bytes() == b"precious"
    assert_one_line_error(capsys.readouterr().err, "--overwrite")
    rc = upscale.main([src, "--checkpoint", ckpt, "--scale", "2", "-o", str(out),
                       "--overwrite", "--noprogress"])
    assert rc == 0 and images.read_image(str(out)).shape == (24, 28, 3)


# ----------------------------------------------------------------------------

def _scaled_model(path: str, factor) -> str:
    cfg = tiny_model_config()
    v = jax.tree_util.tree_map(lambda x: np.asarray(x) * np.float32(factor),
                               random_variables(cfg, 0))
    mdir.save_model(path, cfg, v)
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_non_finite_output_is_an_error_in_upscale_and_evaluate(tmp_path, capsys):
    # NaN weights (a corrupted model dir): refused when loading, naming the file
    nan_dir = _scaled_model(str(tmp_path / "nan"), np.nan)
    src = save_img(tmp_path / "in.png", 14, 12)
    rc = upscale.main([src, "--checkpoint", nan_dir, "--scale", "2", "-o",
                       str(tmp_path / "a.png"), "--noprogress"])
    assert rc == errors.EXIT_CHECKPOINT
    assert_one_line_error(capsys.readouterr().err, "non-finite", "variables")
    # finite weights whose output overflows: the image fails, nothing is written
    big = _scaled_model(str(tmp_path / "big"), 1e20)
    rc = upscale.main([src, "--checkpoint", big, "--scale", "2", "-o", str(tmp_path / "b.png"),
                       "--noprogress"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_NONFINITE and "non-finite value" in err
    assert not (tmp_path / "b.png").exists() and "Traceback" not in err
    data = tmp_path / "Mini"
    data.mkdir()
    save_img(data / "p.png", 24, 20)
    p = run_python(["evaluate.py", "--checkpoint", big, "--data", str(data), "--scales", "2",
             "--noprogress"])
    assert p.returncode == errors.EXIT_NONFINITE
    assert "non-finite" in p.stderr and "Traceback" not in p.stderr
    assert "| Method | Dataset | x2 |" in p.stdout  # the table is printed (no finite row)


# ----------------------------------------------------------------------------

def test_model_dir_is_validated_with_one_line_errors(tmp_path, tiny_model_dir, capsys):
    src, cfg = tiny_model_dir
    cases = {}
    d = str(tmp_path / "mismatch")
    shutil.copytree(src, d)
    c = cfg.copy_and_resolve_references()
    c.dim = 64
    open(os.path.join(d, "model_config.json"), "w").write(mdir.config_to_json(c))
    cases[d] = "do not match its model_config.json"
    d = str(tmp_path / "heads0")
    shutil.copytree(src, d)
    data = json.load(open(os.path.join(d, "model_config.json")))
    data["heads"] = 0
    json.dump(data, open(os.path.join(d, "model_config.json"), "w"))
    cases[d] = "heads=0 must be a positive integer"
    d = str(tmp_path / "badjson")
    shutil.copytree(src, d)
    open(os.path.join(d, "model_config.json"), "w").write('{"dim": 32,')
    cases[d] = "model_config.json: invalid JSON"
    img = save_img(tmp_path / "in.png", 10, 10)
    for k, (d, needle) in enumerate(cases.items()):
        with pytest.raises(errors.CheckpointError, match=needle):
            pretrained.load(d)
        rc = upscale.main([img, "--checkpoint", d, "--scale", "2", "-o",
                           str(tmp_path / f"o{k}.png"), "--noprogress"])
        assert rc == errors.EXIT_CHECKPOINT
        assert_one_line_error(capsys.readouterr().err, needle, d)


# ----------------------------------------------------------------------------

def _bomb_png(path: str, side: int = 20000) -> str:
    """A 1-bit PNG of side x side pixels (400 M > 2 x Pillow's limit) in ~50 kB."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    row = b"\x00" + bytes((side + 7) // 8)
    raw = zlib.compress(row * side, 9)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    open(path, "wb").write(png)
    return path


def test_each_input_fails_independently_and_bounds_are_checked_first(tmp_path, tiny_model_dir,
                                                                     capsys):
    ckpt, _ = tiny_model_dir
    good1 = save_img(tmp_path / "good1.png", 20, 24)
    bomb = _bomb_png(str(tmp_path / "bomb.png"))
    folder = tmp_path / "adir.png"
    folder.mkdir()
    good2 = save_img(tmp_path / "good2.png", 12, 10, seed=3)
    out = tmp_path / "out"
    rc = upscale.main([good1, bomb, str(folder), good2, "--checkpoint", ckpt, "--scale", "2",
                       "-o", str(out), "--noprogress"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_FAILURE  # two causes: a resource limit and a non-image
    assert "bomb.png: Image size (400000000 pixels) exceeds limit" in err
    assert "adir.png: is a directory, not an image file" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == ["good1.png", "good2.png"]  # the others went on
    base = [good1, "--checkpoint", ckpt, "--noprogress"]
    for extra, code, needle in [
            (["--scale", "1e6", "-o", str(tmp_path / "s.png")], errors.EXIT_RESOURCE,
             "over --max_memory_gb 4"),
            (["--size", "100000x100000", "-o", str(tmp_path / "s.png")], errors.EXIT_RESOURCE,
             "--size 100000x100000"),
            (["--scale", "2", "--chunk", "100000000", "-o", str(tmp_path / "s.png")],
             errors.EXIT_RESOURCE, "--chunk 100000000"),
            (["--scale=", "-o", str(tmp_path / "s.png")], errors.EXIT_USAGE, "--scale"),
            (["--scale", "2", "--max_memory_gb", "-1", "-o", str(tmp_path / "s.png")],
             errors.EXIT_USAGE, "--max_memory_gb"),
            (["--scale", "2", "--max_memory_gb", "nan", "-o", str(tmp_path / "s.png")],
             errors.EXIT_USAGE, "--max_memory_gb"),
            (["--scale", "2", "-o", f"{good1}/x.png"], errors.EXIT_USAGE,
             f"{good1} is a file, not a directory")]:
        t0 = time.perf_counter()
        rc = upscale.main(base + extra)
        assert rc == code, (extra, capsys.readouterr().err)
        assert_one_line_error(capsys.readouterr().err, needle)
        assert time.perf_counter() - t0 < 30  # rejected before any decoding
    assert not (tmp_path / "s.png").exists()
