"""`python -m msit_jax.inference` and LR tiling, on tiny models."""

from __future__ import annotations

import math
import os
import re
import resource
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from msit_jax.io import model_dir
from msit_jax import images, tiny_model_config
from msit_jax.inference import engine
from msit_jax.inference import budget, frontend, tiling
from msit_jax.inference import cli as upscale
from msit_jax.models import reparam
from msit_jax.io.workdir import MODEL_CONFIG_FILE
from msit_jax.training.checkpoints import Checkpointer
from tests.conftest import REPO, micro_model_config
from msit_jax.models.random_init import random_variables


def _img(h, w, seed):
    rs = np.random.RandomState(seed)
    small = (rs.rand(h // 3 + 2, w // 3 + 2, 3) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="module")
def model(make_model_folder):
    return make_model_folder(0)


def _expected(cfg, variables, rgb, hw, chunk=4096):
    """What the CLI must write: the folded model's prediction, quantised."""
    fcfg, fvars = reparam.fold(cfg, variables)
    return images.to_uint8(engine.upscale(fcfg, fvars, images.to_float(rgb), hw, chunk=chunk))


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
    # the sizes the CLI computes (frontend.output_size, the one rule of every surface)
    assert frontend.output_size((20, 30), (2.5, 3.0), None) == (50, 90)
    assert frontend.output_size((5, 7), (2.5, 2.5), None) == (12, 18)  # round half to even
    with pytest.raises(upscale.UsageError, match="--size 40 x 20 is smaller than the input"):
        frontend.output_size((20, 30), None, (40, 20), name="in.png", flag="--size")


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
                         "--noprogress"])
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
                       "--noprogress"])
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
                       "--output", str(tmp_path / "o"), "--noprogress"])
    assert rc == 2 and "smaller than the input" in capsys.readouterr().err
    rc = upscale.main([str(tmp_path / "a.png"), "--checkpoint", ckpt, "--scale", "2",
                       "--output", str(tmp_path / "o.txt")])  # .jpg is JPEG since issue 20
    assert rc == 2 and "PNG" in capsys.readouterr().err
    rc = upscale.main([str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "nope"),
                       "--scale", "2", "--output", str(tmp_path / "o")])
    assert rc == 4 and "no checkpoint" in capsys.readouterr().err  # errors.EXIT_INPUT


def test_tiled_equals_untiled_away_from_the_wrap_border(model):
    _, cfg, variables = model
    lr = images.to_float(_img(37, 45, 4))
    hw = (130, 101)
    ref = engine.upscale(cfg, variables, lr, hw, chunk=1024)
    got = engine.Engine(cfg, variables, chunk=1024, tile=12)(lr, hw)
    # Interior HR pixels (beyond the LEM wrap radius, in HR pixels, plus the decoder's
    # reach) are exact to float32 round-off.
    my = int(np.ceil((tiling.wrap_radius(cfg) + cfg.radius + 1) * hw[0] / 37))
    mx = int(np.ceil((tiling.wrap_radius(cfg) + cfg.radius + 1) * hw[1] / 45))
    np.testing.assert_allclose(got[my:-my, mx:-mx], ref[my:-my, mx:-mx], atol=1e-5)
    # Near the borders the circular LEM shift sees the tile's edge: close, not exact.
    assert np.abs(got - ref).max() < 0.02
    # A tile covering the image is the untiled computation.
    whole = engine.Engine(cfg, variables, chunk=1024, tile=64)(lr, hw)
    np.testing.assert_array_equal(whole, ref)


def test_tiling_geometry_helpers(model):
    _, cfg, _ = model
    # Tiny config: EDSR 1 block (radius 4) + LEM 1 + MSC 4 + Q/K 2 -> 11; halo + r + 1.
    assert tiling.receptive_radius(cfg) == 11 and tiling.halo(cfg) == 13
    from msit_jax import model_config
    assert tiling.receptive_radius(model_config()) == 55
    assert tiling.receptive_radius(model_config("rdn")) == 152
    # Full EDSR: 32 blocks -> 66 + 11; RCAN pools globally: no exact tiles, never auto-tiled.
    assert tiling.encoder_radius(model_config("edsr")) == 66
    rcan = model_config("rcan")
    assert not tiling.tileable(rcan) and tiling.encoder_radius(rcan) is None
    assert budget.auto_tile(rcan, (4000, 4000), 2 ** 20) == 0
    with pytest.raises(ValueError, match="pools over the whole image"):
        tiling.halo(rcan)
    # Every HR row belongs to exactly one LR core.
    spans = [tiling.hr_span(130, 37, c) for c in tiling.axis_tiles(37, 12)]
    assert spans[0][0] == 0 and spans[-1][1] == 130
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert tiling.window((24, 36), 13, 37, 12) == (0, 37)
    assert tiling.window((0, 12), 5, 37, 12) == (0, 22)
    assert tiling.window((36, 37), 5, 37, 12) == (15, 37)


@pytest.mark.slow  # quick tier under 90 s
def test_cli_tiled_matches_tiled_api(tmp_path, model):
    ckpt, cfg, variables = model
    rgb = _img(30, 34, 5)
    Image.fromarray(rgb).save(tmp_path / "t.png")
    rc = upscale.main([str(tmp_path / "t.png"), "--checkpoint", ckpt, "--scale", "2.2",
                       "--tile", "16", "--output", str(tmp_path / "t_out.png"), "--noprogress"])
    assert rc == 0
    fcfg, fvars = reparam.fold(cfg, variables)
    want = engine.Engine(fcfg, fvars, tile=16)(images.to_float(rgb), (66, 75))
    np.testing.assert_array_equal(images.read_image(str(tmp_path / "t_out.png")),
                                  images.to_uint8(want))


def test_output_larger_than_4096_squared_in_bounded_memory(tmp_path):
    ckpt = str(tmp_path / "micro")
    cfg = micro_model_config()
    model_dir.save_model(ckpt, cfg, random_variables(cfg))
    Image.fromarray(_img(256, 256, 6)).save(tmp_path / "in.png")
    out = tmp_path / "big.png"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, "-m", "msit_jax.inference", str(tmp_path / "in.png"),
                        "--checkpoint", ckpt, "--size", "4100x4100", "--chunk", "262144",
                        "--output", str(out), "--noprogress"],
                       capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert p.returncode == 0, p.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far; this one must dominate if large.
    assert max(peak_kib, before) < 6 * 2 ** 20, f"peak RSS {peak_kib / 2 ** 20:.2f} GiB"
    with Image.open(out) as im:
        assert im.size == (4100, 4100) and im.mode == "RGB"
        px = np.asarray(im.crop((0, 0, 64, 64)))
    assert px.std() > 0  # a real prediction, not a blank canvas


def _stage_line(err: str, label: str) -> bool:
    """Whether stderr holds a finished `console.stage` line: 'LABEL ... 1.2 s'."""
    return re.search(rf"^{re.escape(label)} \.\.\. \d+\.\d s$", err, re.M) is not None


def test_official_demo_flags(tmp_path, model, capsys):
    """The official demo's command line works as is: --input, --model, --resolution H,W
    (height first) and --output."""
    ckpt, cfg, variables = model
    rgb = _img(20, 26, 7)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    rc = upscale.main(["--input", str(tmp_path / "a.png"), "--model", ckpt,
                       "--resolution", "300,400", "--output", str(tmp_path / "b.png")])
    assert rc == 0, capsys.readouterr().err
    got = images.read_image(str(tmp_path / "b.png"))
    assert got.shape == (300, 400, 3)
    np.testing.assert_array_equal(got, _expected(cfg, variables, rgb, (300, 400)))


@pytest.mark.slow  # quick tier under 90 s
def test_sizes_are_read_and_logged_height_first(tmp_path, model, capsys):
    """96 wide, 80 high -> --size 100x300: 100 high, 300 wide, logged as H x W; --nofold
    (absl spelling) runs the unfolded model; the stages are timed lines on stderr."""
    ckpt, cfg, variables = model
    rgb = _img(80, 96, 8)
    src, out = str(tmp_path / "wide.png"), str(tmp_path / "o.png")
    Image.fromarray(rgb).save(src)
    rc = upscale.main([src, "--checkpoint", ckpt, "--size", "100x300", "-o", out,
                       "--nofold", "--noprogress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"{src}: 80 x 96 -> 100 x 300 (H x W), wrote {out}" in err
    with Image.open(out) as im:
        assert im.size == (300, 100)  # PIL: (width, height)
    want = engine.upscale(cfg, variables, images.to_float(rgb), (100, 300))
    np.testing.assert_array_equal(images.read_image(out), images.to_uint8(want))
    assert _stage_line(err, "load checkpoint")
    assert _stage_line(err, f"{src}: compile+encode") and _stage_line(err, f"{src}: decode")
    assert not re.search(r"^fold \.\.\.", err, re.M)  # --nofold
    # A size smaller than the input is named height first too.
    rc = upscale.main([src, "--checkpoint", ckpt, "--size", "90x60", "-o", out, "--overwrite"])
    assert rc == 2
    assert "--size 90 x 60 is smaller than the input 80 x 96 (H x W" in capsys.readouterr().err


def test_quiet_prints_nothing_on_success(tmp_path, model, capsys):
    ckpt, _, _ = model
    Image.fromarray(_img(12, 14, 10)).save(tmp_path / "q.png")
    rc = upscale.main([str(tmp_path / "q.png"), "--checkpoint", ckpt, "--scale", "2",
                       "-o", str(tmp_path / "q_out.png"), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0 and (cap.out, cap.err) == ("", "")
    assert images.read_image(str(tmp_path / "q_out.png")).shape == (24, 28, 3)


def test_several_inputs_need_a_directory(tmp_path, model, capsys):
    """The error names the number of inputs, not the extension, whatever the file name."""
    ckpt, _, _ = model
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    Image.fromarray(_img(12, 14, 11)).save(a)
    Image.fromarray(_img(12, 14, 12)).save(b)
    (tmp_path / "existing").write_bytes(b"x")
    for name in ("one.png", "one.jpg", "existing"):
        out = str(tmp_path / name)
        rc = upscale.main([a, b, "--checkpoint", ckpt, "--scale", "2", "--output", out])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.strip() == (f"error: 2 inputs but --output {out} is a single file; give a "
                               "directory")
    assert not (tmp_path / "one.png").exists() and not (tmp_path / "one.jpg").exists()


@pytest.mark.parametrize("arg, spelling", [("--no-progress", "--noprogress (or --progress)"),
                                           ("--no-fold", "--nofold (or --fold)"),
                                           ("--no_overwrite", "--nooverwrite"),
                                           ("--max-memory-gb=3", "--max_memory_gb=3")])
def test_argparse_spellings_name_the_absl_one(tmp_path, model, capsys, arg, spelling):
    ckpt, _, _ = model
    rc = upscale.main([str(tmp_path / "a.png"), "--checkpoint", ckpt, "--scale", "2",
                       "-o", str(tmp_path / "o.png"), arg])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"error: {arg} is argparse style") and spelling in err
    assert "\n" not in err


def test_help_says_height_first_and_the_decoder_threshold_per_platform(capsys):
    assert upscale.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # absl wraps the help
    for flag in ("--[no]progress", "--[no]fold", "--[no]quiet", "--input", "--model",
                 "--resolution", "-o,--output"):
        assert flag in text
    assert "Output size H x W in pixels, height first" in text
    cpu, gpu = engine.grid_min_queries("cpu"), engine.grid_min_queries("gpu")
    assert (f"grid_min_queries() pixels per input pixel, {cpu:g} (x{math.sqrt(cpu):g}) on "
            f"CPU and {gpu:g} (x{math.sqrt(gpu):g}) on GPU/TPU") in text
    assert "9 (x3)" not in text  # the threshold before the head-major grid decoder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A one-checkpoint training workdir: loading it makes Orbax log absl warnings."""
    cfg = tiny_model_config()
    wd = str(tmp_path_factory.mktemp("run") / "wd")
    os.makedirs(wd)
    with open(os.path.join(wd, MODEL_CONFIG_FILE), "w") as f:
        f.write(model_dir.config_to_json(cfg))
    ck = Checkpointer(wd, async_save=False)
    ck.save(1, jax.tree_util.tree_map(jax.numpy.asarray, dict(random_variables(cfg))), None)
    ck.wait()
    ck.close()
    return wd


def test_console_script_shows_stages_and_no_library_noise(tmp_path, workdir):
    """`python -m msit_jax.inference` (absl.app.run, as the msit-upscale script): timed stages
    and a decode bar on stderr; Orbax's absl warnings only with --verbose."""
    Image.fromarray(_img(80, 96, 13)).save(tmp_path / "in.png")
    cmd = [sys.executable, "-m", "msit_jax.inference", str(tmp_path / "in.png"), "--checkpoint",
           workdir, "--scale", "2", "-o", str(tmp_path / "o.png")]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))  # not the user's cache
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    err = p.stderr
    assert p.returncode == 0, err
    assert "WARNING:absl" not in err and "read only" not in err, err
    assert not re.search(r"^[IWE]\d{4} ", err, re.M), err  # nor absl-formatted records
    assert _stage_line(err, "load checkpoint") and _stage_line(err, "fold"), err
    tag = f"{tmp_path / 'in.png'}: "
    assert _stage_line(err, tag + "compile+encode"), err
    assert re.search(rf"{re.escape(tag)}decode: 100%.* (\d+)/\1 ", err), err  # the bar, done
    assert f"{tag}80 x 96 -> 160 x 192 (H x W), wrote" in err
    p = subprocess.run(cmd + ["--overwrite", "--verbose"], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=env)
    assert p.returncode == 0 and "Given directory is read only" in p.stderr  # what was hidden


# --- directory and glob inputs, --suffix, the format by extension (issue 20) -------------

def test_inputs_expand_directories_and_globs(tmp_path):
    for name in ("b.png", "a.jpg", "c.webp"):
        Image.fromarray(_img(6, 6, 0)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()  # not recursive
    Image.fromarray(_img(6, 6, 0)).save(tmp_path / "sub" / "d.png")
    (tmp_path / "empty").mkdir()
    d = str(tmp_path)
    images_in_d = [os.path.join(d, n) for n in ("a.jpg", "b.png", "c.webp")]
    assert upscale.expand_inputs([d]) == images_in_d
    assert upscale.expand_inputs([os.path.join(d, "*.png"), os.path.join(d, "*")]) == [
        os.path.join(d, "b.png"), os.path.join(d, "a.jpg"), os.path.join(d, "c.webp")]
    # a file named twice runs once; a missing file and an image-less directory stay inputs
    # (each fails on its own when its turn comes, as before)
    missing, empty = os.path.join(d, "missing.png"), os.path.join(d, "empty")
    assert upscale.expand_inputs([images_in_d[1], d, missing, empty]) == [
        images_in_d[1], images_in_d[0], images_in_d[2], missing, empty]
    with pytest.raises(upscale.UsageError, match=r"\*\.gif: no image file matches"):
        upscale.expand_inputs([os.path.join(d, "*.gif")])


def test_output_paths_take_the_suffix_and_the_format_by_extension(tmp_path):
    ins = ["x/a.png", "y/b.jpg"]
    out = str(tmp_path / "out")
    assert upscale.output_paths(ins, out) == [f"{out}/a.png", f"{out}/b.png"]
    assert upscale.output_paths(ins, out, "_x2") == [f"{out}/a_x2.png", f"{out}/b_x2.png"]
    assert upscale.output_paths(ins, out, "_x2.JPG") == [f"{out}/a_x2.JPG", f"{out}/b_x2.JPG"]
    for name in ("o.png", "o.jpg", "o.jpeg", "o.webp", "o.bmp", "o.tif", "o.TIFF"):
        assert upscale.output_paths(["a.png"], str(tmp_path / name), "_x2") == [
            str(tmp_path / name)]  # one file: its own name, no suffix
    with pytest.raises(upscale.UsageError, match="outputs are PNG or another image format"):
        upscale.output_paths(["a.png"], str(tmp_path / "o.txt"))
    with pytest.raises(upscale.UsageError, match="--suffix a/b: a file name ending"):
        upscale.output_paths(ins, out, "a/b")
    with pytest.raises(upscale.UsageError, match="would both be written"):
        upscale.output_paths(["x/a.png", "y/a.jpg"], out)


@pytest.mark.slow  # three runs of the command, ~4 s
def test_directory_and_glob_inputs_with_suffix_and_formats(tmp_path, model, capsys):
    ckpt, cfg, variables = model
    src = tmp_path / "in"
    src.mkdir()
    rgb = _img(12, 14, 20)
    Image.fromarray(rgb).save(src / "p.png")
    rgba = np.dstack([rgb, np.full((12, 14), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(src / "q.png")
    want = _expected(cfg, variables, rgb, (24, 28))
    out = tmp_path / "out"
    rc = upscale.main([str(src), "--checkpoint", ckpt, "--scale", "2", "-o", str(out),
                       "--suffix", "_x2", "--noprogress"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["p_x2.png", "q_x2.png"]
    np.testing.assert_array_equal(images.read_image(str(out / "p_x2.png")), want)
    # a glob, JPEG by the suffix's extension: the alpha is dropped, with a note
    rc = upscale.main([os.path.join(str(src), "*.png"), "--checkpoint", ckpt, "--scale", "2",
                       "-o", str(out), "--suffix", "_x2.jpg", "--noprogress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"JPEG has no alpha channel: alpha dropped in {out / 'q_x2.jpg'}" in err
    for name in ("p_x2.jpg", "q_x2.jpg"):
        with Image.open(out / name) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (28, 24))
    # one input, WebP by the file's extension: lossless, the same pixels as the PNG
    rc = upscale.main([str(src / "p.png"), "--checkpoint", ckpt, "--scale", "2",
                       "-o", str(tmp_path / "one.webp"), "--noprogress"])
    assert rc == 0
    with Image.open(tmp_path / "one.webp") as im:
        assert im.format == "WEBP"
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), want)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic writes, cleaned up


def test_several_images_show_one_bar_over_them(tmp_path, model, capsys):
    ckpt, _, _ = model
    for i in range(3):
        Image.fromarray(_img(10, 12, 30 + i)).save(tmp_path / f"m{i}.png")
    rc = upscale.main([str(tmp_path / "m*.png"), "--checkpoint", ckpt, "--scale", "2",
                       "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert re.search(r"images: 100%.* 3/3 ", err), err
    assert "compile+encode ..." not in err and "chunk" not in err  # no per-image bars/stages
    for i in range(3):
        assert f"[{i + 1}/3] {tmp_path / f'm{i}.png'}: 10 x 12 -> 20 x 24 (H x W), wrote" in err
