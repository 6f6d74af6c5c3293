"""`python -m msit_jax.upscale` and LR tiling, on tiny models."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msit_jax.io import checkpoint
from msit_jax import images, inference, tiling, tiny_model_config, upscale
from msit_jax.models import reparam
from tests.conftest import REPO, init_variables


def _img(h, w, seed):
    rs = np.random.RandomState(seed)
    small = (rs.rand(h // 3 + 2, w // 3 + 2, 3) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = tiny_model_config()
    variables = init_variables(cfg)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    checkpoint.save_model(path, cfg, variables)
    return path, cfg, variables


def _expected(cfg, variables, rgb, hw, chunk=4096):
    """What the CLI must write: the folded model's prediction, quantised."""
    fcfg, fvars = reparam.fold(cfg, variables)
    return images.to_uint8(inference.upscale(fcfg, fvars, images.to_float(rgb), hw, chunk=chunk))


def test_parse_scale_and_size():
    assert upscale.parse_scale("3.5") == (3.5, 3.5)
    assert upscale.parse_scale("2,3") == (2.0, 3.0)
    assert upscale.parse_scale("1.5x40") == (1.5, 40.0)
    for bad in ("0.5", "2,0.9", "abc", "1,2,3", "nan"):
        with pytest.raises(upscale.UsageError):
            upscale.parse_scale(bad)
    assert upscale.parse_size("4100x4200") == (4100, 4200)
    with pytest.raises(upscale.UsageError):
        upscale.parse_size("4100")
    assert upscale.output_size((20, 30), (2.5, 3.0), None) == (50, 90)
    assert upscale.output_size((5, 7), (2.5, 2.5), None) == (12, 18)  # round half to even
    with pytest.raises(upscale.UsageError, match="smaller than the input"):
        upscale.output_size((20, 30), None, (40, 20))


def test_non_integer_anisotropic_scale_and_formats(tmp_path, model, capsys):
    ckpt, cfg, variables = model
    rgb = _img(20, 26, 0)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    gray = rgb[..., 1].copy()
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = np.dstack([rgb, np.linspace(0, 255, 20 * 26).reshape(20, 26).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    g16 = (gray.astype(np.uint16) * 257)  # 16-bit grayscale with the same 8-bit content
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = tmp_path / "out"
    rc = upscale.main([str(tmp_path / n) for n in ("rgb.png", "photo.jpg", "gray.png",
                                                    "alpha.png", "g16.png")]
                      + ["--checkpoint", ckpt, "--scale", "2.5,3.3", "--output", str(out),
                         "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    hw = (50, 86)  # round(20 * 2.5), round(26 * 3.3) = round(85.8)
    want = _expected(cfg, variables, rgb, hw)
    got = images.read_image(str(out / "rgb.png"))
    np.testing.assert_array_equal(got, want)
    with Image.open(out / "photo.png") as im:
        assert im.size == (86, 50) and im.mode == "RGB"
    # Grayscale and 16-bit grayscale: replicated to RGB (16-bit reduced to 8 bits).
    want_gray = _expected(cfg, variables, np.repeat(gray[..., None], 3, -1), hw)
    np.testing.assert_array_equal(images.read_image(str(out / "gray.png")), want_gray)
    np.testing.assert_array_equal(images.read_image(str(out / "g16.png")), want_gray)
    # RGBA: the model sees RGB; alpha is upscaled bicubically and kept.
    with Image.open(out / "alpha.png") as im:
        assert im.mode == "RGBA" and im.size == (86, 50)
        a = np.asarray(im)
    np.testing.assert_array_equal(a[..., :3], want)
    want_alpha = np.asarray(Image.fromarray(rgba[..., 3]).resize((86, 50), Image.BICUBIC))
    np.testing.assert_array_equal(a[..., 3], want_alpha)


def test_corrupt_input_is_reported_and_others_processed(tmp_path, model, capsys):
    ckpt, _, _ = model
    Image.fromarray(_img(12, 14, 1)).save(tmp_path / "good1.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(_img(12, 14, 2)).save(tmp_path / "good2.png")
    out = tmp_path / "o"
    rc = upscale.main([str(tmp_path / "good1.png"), str(tmp_path / "bad.png"),
                       str(tmp_path / "good2.png"), str(tmp_path / "missing.png"),
                       "--checkpoint", ckpt, "--scale", "2", "--output", str(out),
                       "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 4  # both failures are unreadable inputs (errors.EXIT_INPUT)
    assert "bad.png: not a readable image" in err and "missing.png: no such file" in err
    assert "2 of 4 input(s) failed" in err
    assert sorted(os.listdir(out)) == ["good1.png", "good2.png"]


def test_usage_errors(tmp_path, model, capsys):
    ckpt, _, _ = model
    Image.fromarray(_img(12, 14, 3)).save(tmp_path / "a.png")
    rc = upscale.main([str(tmp_path / "a.png"), "--checkpoint", ckpt, "--scale", "0.5",
                       "--output", str(tmp_path / "o")])
    assert rc == 2 and "must be >= 1" in capsys.readouterr().err
    rc = upscale.main([str(tmp_path / "a.png"), "--checkpoint", ckpt, "--size", "8x100",
                       "--output", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "smaller than the input" in capsys.readouterr().err
    rc = upscale.main([str(tmp_path / "a.png"), "--checkpoint", ckpt, "--scale", "2",
                       "--output", str(tmp_path / "o.jpg")])
    assert rc == 2 and "PNG" in capsys.readouterr().err
    rc = upscale.main([str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "nope"),
                       "--scale", "2", "--output", str(tmp_path / "o")])
    assert rc == 4 and "no checkpoint" in capsys.readouterr().err  # errors.EXIT_INPUT


def test_tiled_equals_untiled_away_from_the_wrap_border(model):
    _, cfg, variables = model
    lr = images.to_float(_img(37, 45, 4))
    hw = (130, 101)
    ref = inference.upscale(cfg, variables, lr, hw, chunk=1024)
    got = tiling.TiledUpscaler(cfg, variables, chunk=1024, tile=12)(lr, hw)
    # Interior HR pixels (beyond the LEM wrap radius, in HR pixels, plus the decoder's
    # reach) are exact to float32 round-off.
    my = int(np.ceil((tiling.wrap_radius(cfg) + cfg.radius + 1) * hw[0] / 37))
    mx = int(np.ceil((tiling.wrap_radius(cfg) + cfg.radius + 1) * hw[1] / 45))
    np.testing.assert_allclose(got[my:-my, mx:-mx], ref[my:-my, mx:-mx], atol=1e-5)
    # Near the borders the circular LEM shift sees the tile's edge: close, not exact.
    assert np.abs(got - ref).max() < 0.02
    # A tile covering the image is the untiled computation.
    whole = tiling.TiledUpscaler(cfg, variables, chunk=1024, tile=64)(lr, hw)
    np.testing.assert_array_equal(whole, ref)


def test_tiling_geometry_helpers(model):
    _, cfg, _ = model
    # Tiny config: EDSR 1 block (radius 4) + LEM 1 + MSC 4 + Q/K 2 -> 11; halo + r + 1.
    assert tiling.receptive_radius(cfg) == 11 and tiling.halo(cfg) == 13
    from msit_jax import model_config
    assert tiling.receptive_radius(model_config()) == 55
    assert tiling.receptive_radius(model_config("rdn")) == 152
    # Every HR row belongs to exactly one LR core.
    spans = [tiling.hr_span(130, 37, c) for c in tiling.axis_tiles(37, 12)]
    assert spans[0][0] == 0 and spans[-1][1] == 130
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert tiling.window((24, 36), 13, 37, 12) == (0, 37)
    assert tiling.window((0, 12), 5, 37, 12) == (0, 22)
    assert tiling.window((36, 37), 5, 37, 12) == (15, 37)


def test_cli_tiled_matches_tiled_api(tmp_path, model):
    ckpt, cfg, variables = model
    rgb = _img(30, 34, 5)
    Image.fromarray(rgb).save(tmp_path / "t.png")
    rc = upscale.main([str(tmp_path / "t.png"), "--checkpoint", ckpt, "--scale", "2.2",
                       "--tile", "16", "--output", str(tmp_path / "t_out.png"), "--no-progress"])
    assert rc == 0
    fcfg, fvars = reparam.fold(cfg, variables)
    want = tiling.TiledUpscaler(fcfg, fvars, tile=16)(images.to_float(rgb), (66, 75))
    np.testing.assert_array_equal(images.read_image(str(tmp_path / "t_out.png")),
                                  images.to_uint8(want))


def _micro_model(path):
    """The smallest config with every component: fast enough to decode 16.8 M pixels in CI."""
    cfg = tiny_model_config()
    cfg.dim, cfg.heads, cfg.radius = 8, 1, 0
    cfg.msno_heads, cfg.qk_heads, cfg.mlp_hidden, cfg.posenc_dims = 1, 1, (8,), 8
    cfg.edsr.n_feats = 4
    checkpoint.save_model(path, cfg, init_variables(cfg))


def test_output_larger_than_4096_squared_in_bounded_memory(tmp_path):
    ckpt = str(tmp_path / "micro")
    _micro_model(ckpt)
    Image.fromarray(_img(256, 256, 6)).save(tmp_path / "in.png")
    out = tmp_path / "big.png"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, "-m", "msit_jax.upscale", str(tmp_path / "in.png"),
                        "--checkpoint", ckpt, "--size", "4100x4100", "--chunk", "262144",
                        "--output", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far; this one must dominate if large.
    assert max(peak_kib, before) < 6 * 2 ** 20, f"peak RSS {peak_kib / 2 ** 20:.2f} GiB"
    with Image.open(out) as im:
        assert im.size == (4100, 4100) and im.mode == "RGB"
        px = np.asarray(im.crop((0, 0, 64, 64)))
    assert px.std() > 0  # a real prediction, not a blank canvas
