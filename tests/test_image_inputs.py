"""Scientific image inputs: 32-bit float TIFF (mode 'F'), 16-bit integer TIFF/PNG.

Float data in [0, 1] is used as is; values outside are clipped with one warning
line; NaN/inf is refused with an ImageError naming the file; 16-bit integers are
scaled by 65535. Pillow cannot read float RGB TIFFs: they are refused with the
reason. The slow test runs `python -m msit_jax.inference` on float TIFFs with the
bundled msit-lite weights.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msit_jax import errors, images
from msit_jax.images import ImageError
from msit_jax.inference.frontend import ImageRunner
from tests.conftest import REPO


def write_tiff(path, a: np.ndarray, sample_format: int) -> None:
    """A minimal little-endian baseline TIFF (one strip, uncompressed) of any dtype and
    1 or 3 channels: what Pillow cannot write (float RGB, 16-bit RGB). sample_format:
    1 unsigned integer, 3 IEEE float."""
    a = np.ascontiguousarray(a)
    h, w = a.shape[:2]
    c = 1 if a.ndim == 2 else a.shape[2]
    bits = a.dtype.itemsize * 8
    data = a.astype(a.dtype.newbyteorder("<")).tobytes()
    n_entries, ifd_off = 10, 8
    extra_off = ifd_off + 2 + n_entries * 12 + 4
    extra = b""
    if c > 1:  # per-channel BitsPerSample / SampleFormat arrays
        bps_off = extra_off
        extra += struct.pack(f"<{c}H", *[bits] * c)
        sf_off = extra_off + len(extra)
        extra += struct.pack(f"<{c}H", *[sample_format] * c)
    data_off = extra_off + len(extra)
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, bits if c == 1 else bps_off),
               (259, 3, 1, 1), (262, 3, 1, 1 if c == 1 else 2), (273, 4, 1, data_off),
               (277, 3, 1, c), (278, 4, 1, h), (279, 4, 1, len(data)),
               (339, 3, c, sample_format if c == 1 else sf_off)]
    ifd = struct.pack("<H", n_entries)
    for tag, typ, count, value in entries:
        if typ == 3 and count == 1:
            ifd += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, typ, count, value)
    ifd += struct.pack("<I", 0)
    with open(path, "wb") as f:
        f.write(b"II*\x00" + struct.pack("<I", ifd_off) + ifd + extra + data)


def rand(*shape, seed=0):
    return np.random.RandomState(seed).rand(*shape)


def test_float_tiff_in_range_is_used_as_is(tmp_path, capsys):
    a = rand(7, 5).astype(np.float32)
    a[0, 0], a[0, 1] = 0.0, 1.0  # the closed interval: no warning at the ends
    path = str(tmp_path / "f.tif")
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode == "F"
    got = images.read_image_float(path)
    assert got.dtype == np.float32 and got.shape == (7, 5, 3)
    np.testing.assert_array_equal(got, np.repeat(a[..., None], 3, -1))
    # the 8-bit readers (training data, the upscale CLI) round it
    np.testing.assert_array_equal(images.read_image(path), images.to_uint8(got))
    assert capsys.readouterr().err == ""


def test_float_outside_unit_range_is_clipped_with_one_warning_line(tmp_path, capsys):
    a = (rand(6, 4) * 3 - 1).astype(np.float32)  # values in [-1, 2)
    path = str(tmp_path / "wide.tif")
    Image.fromarray(a).save(path)
    got = images.read_image_float(path)
    np.testing.assert_array_equal(got[..., 0], np.clip(a, 0, 1))
    err = capsys.readouterr().err
    n = int(((a < 0) | (a > 1)).sum())
    assert err.count("\n") == 1 and err.startswith(f"warning: {path}: float values span "), err
    assert f"{n} of {a.size} outside [0, 1] are clipped" in err, err
    np.testing.assert_array_equal(images.read_image(path), images.to_uint8(np.clip(
        np.repeat(a[..., None], 3, -1), 0, 1)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_is_refused_naming_the_file(tmp_path, bad):
    a = rand(6, 4).astype(np.float32)
    a[3, 2] = bad
    path = str(tmp_path / "bad.tif")
    Image.fromarray(a).save(path)
    for read in (images.read_image_float, images.read_image):
        with pytest.raises(ImageError) as info:
            read(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: 1 of 24 values are NaN or infinite (first at row 3, "
                              "column 2)"), msg
        assert errors.exit_code_for(info.value) == errors.EXIT_INPUT


@pytest.mark.parametrize("ext", ["tif", "png"])
def test_16bit_gray_is_scaled_by_65535(tmp_path, ext):
    a = (rand(5, 6, seed=1) * 65535).astype(np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    path = str(tmp_path / f"g16.{ext}")
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16") or im.mode == "I"
    got = images.read_image_float(path)
    np.testing.assert_array_equal(got[..., 1], (a / 65535.0).astype(np.float32))
    np.testing.assert_array_equal(images.read_image(path)[..., 0],
                                  np.round(a * (255 / 65535)).astype(np.uint8))


def test_16bit_rgb_tiff_reads_as_8bit_rgb(tmp_path):
    a = (rand(4, 5, 3, seed=2) * 65535).astype(np.uint16)
    path = str(tmp_path / "rgb16.tif")
    write_tiff(path, a, sample_format=1)
    got = images.read_image(path)  # Pillow keeps the high byte of each sample
    np.testing.assert_array_equal(got, (a >> 8).astype(np.uint8))
    np.testing.assert_array_equal(images.read_image_float(path), got / np.float32(255))


@pytest.mark.parametrize("dtype, c", [(np.float32, 3), (np.float64, 1), (np.float16, 1)])
def test_float_tiffs_pillow_cannot_read_are_refused_with_the_reason(tmp_path, dtype, c):
    a = rand(4, 5, c).astype(dtype).squeeze()
    path = str(tmp_path / "rgbf.tif")
    write_tiff(path, a, sample_format=3)
    with pytest.raises(ImageError) as info:
        images.read_image_float(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not a readable image") and "\n" not in msg
    assert "32-bit float TIFFs with one channel only" in msg, msg


class NearestX2(ImageRunner):
    """Repeats every pixel (a stand-in model for the image front end)."""

    def upscale_array(self, lr, out_hw, *, clamp=True, progress=False):
        assert lr.dtype == np.float32 and out_hw == (lr.shape[0] * 2, lr.shape[1] * 2)
        self.seen = lr
        return lr.repeat(2, 0).repeat(2, 1)


def test_upscaler_takes_a_float_pil_image_at_full_precision(capsys):
    a = rand(4, 3).astype(np.float32)
    up = NearestX2()
    out = up(Image.fromarray(a), scale=2)
    assert isinstance(out, Image.Image) and out.mode == "F" and out.size == (6, 8)
    np.testing.assert_array_equal(up.seen[..., 0], a)  # no 8-bit rounding on the way in
    np.testing.assert_allclose(np.asarray(out), a.repeat(2, 0).repeat(2, 1), atol=1e-6)
    a[1, 1] = np.nan
    with pytest.raises(ImageError, match="1 of 12 values are NaN or infinite"):
        up(Image.fromarray(a), scale=2)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_upscale_cli_on_float_tiffs(tmp_path):
    """`python -m msit_jax.inference` with the bundled msit-lite weights: a float TIFF in
    [0, 1] gives the same 8-bit PNG as the same image rounded to 8 bits (the CLI reads
    inputs at 8 bits); out-of-range values are clipped with one warning line; a NaN
    TIFF fails alone with exit code 4, naming the file."""
    a = rand(9, 7, seed=3).astype(np.float32)
    Image.fromarray(a).save(tmp_path / "f.tif")
    Image.fromarray(images.to_uint8(a)).save(tmp_path / "q.png")
    Image.fromarray(a * 1.5 - 0.25).save(tmp_path / "wide.tif")
    nan = a.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    names = ["f.tif", "q.png", "wide.tif", "nan.tif"]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "msit_jax.inference",
                        *[str(tmp_path / n) for n in names], "--scale", "2", "--output",
                        str(out), "--noprogress", "--quiet"],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == errors.EXIT_INPUT, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["f.png", "q.png", "wide.png"]
    f, q = (np.asarray(Image.open(out / n)) for n in ("f.png", "q.png"))
    assert f.shape == (18, 14, 3) and f.dtype == np.uint8
    np.testing.assert_array_equal(f, q)
    lines = r.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("warning: ")] == [
        ln for ln in lines if "wide.tif: float values span" in ln] and len(
        [ln for ln in lines if ln.startswith("warning: ")]) == 1, r.stderr
    assert any(ln.startswith(f"error: {tmp_path / 'nan.tif'}: 1 of 63 values are NaN")
               for ln in lines), r.stderr
    assert "Traceback" not in r.stderr
