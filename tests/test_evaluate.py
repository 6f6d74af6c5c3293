"""Evaluation protocol: LR making, paired folders, presets, predictors, evaluate.py outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msit_jax import errors, images
from msit_jax.eval import datasets, metrics, predictors, protocol, reports, runner
from msit_jax.eval.matlab_resize import imresize
from msit_jax.inference import engine
from tests.conftest import REPO, load_config, shared_data

# Per-image PSNR (dB) of Pillow-bicubic upsampling on Set5 under the reference protocol,
# produced by the official code outside this repository: its `image-folder` dataset and
# `sr-implicit-downsampled-cascaded` wrapper (phase 'valid') made the LR/GT pairs, its own
# `resize_fn` upsampled the LR to the coordinate grid and `utils.calc_psnr(dataset='benchmark',
# scale=s)` scored it (float32). Rounded to 4 decimals.
REFERENCE_SET5_BICUBIC = {
    2: {"baby": 37.0778, "bird": 36.8216, "butterfly": 27.4370, "head": 34.8814, "woman": 32.1487},
    3: {"baby": 33.9250, "bird": 32.5833, "butterfly": 24.0388, "head": 32.9024, "woman": 28.5666},
    4: {"baby": 31.7826, "bird": 30.1835, "butterfly": 22.1007, "head": 31.6144, "woman": 26.4650},
    6: {"baby": 28.9066, "bird": 27.1342, "butterfly": 19.5090, "head": 30.0421, "woman": 24.0583},
    8: {"baby": 27.2507, "bird": 25.2873, "butterfly": 17.7316, "head": 29.0613, "woman": 22.6624},
}


def _rand_img(h, w, seed):
    # Smooth-ish content so SSIM/PSNR are not degenerate.
    rs = np.random.RandomState(seed)
    base = rs.rand(h // 4 + 2, w // 4 + 2, 3) * 255
    img = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BICUBIC))
    return np.clip(img.astype(np.int32) + rs.randint(-8, 9, img.shape), 0, 255).astype(np.uint8)


def _write_folder(path, imgs):
    os.makedirs(path, exist_ok=True)
    for name, img in imgs.items():
        Image.fromarray(img).save(os.path.join(path, name))
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(make_model_folder):
    return make_model_folder(0)[0]


def test_lr_size_hand_computed():
    assert protocol.lr_size((100, 75), 3.5) == (28, 21)
    assert protocol.hr_size((28, 21), 3.5) == (98, 74)  # round(73.5) -> 74 (half to even)
    assert protocol.hr_size((5, 7), 2.5) == (12, 18)  # round(12.5) -> 12, round(17.5) -> 18
    # 33 / 1.1 = 29.999999999999996 in float64: the reference's + 1e-9 makes it 30.
    assert protocol.lr_size((33, 33), 1.1) == (30, 30)
    assert protocol.hr_size((30, 30), 1.1) == (33, 33)


def test_degrade_is_top_left_crop_then_pillow_bicubic():
    hr = _rand_img(100, 75, 0)
    lr, gt = protocol.degrade(hr, 3.5)
    np.testing.assert_array_equal(gt, hr[:98, :74])
    np.testing.assert_array_equal(lr, images.resize_bicubic(hr[:98, :74], (28, 21)))
    with pytest.raises(ValueError, match="too small"):
        protocol.degrade(hr[:5], 6)


def test_shave_and_presets():
    bench, div2k = protocol.PRESETS["benchmark"], protocol.PRESETS["div2k"]
    assert protocol.shave_for(4, bench) == 4
    assert protocol.shave_for(2.5, bench) == 3
    assert protocol.shave_for(4, div2k) == 10
    assert protocol.default_preset("Set14") == "benchmark"
    assert protocol.default_preset("DIV2K_valid_HR") == "div2k"
    assert protocol.canonical_name("BSD100") == "b100"


def test_bicubic_set5_matches_reference_code():
    ds = datasets.open_eval_set(shared_data("Set5"))
    for scale, want in REFERENCE_SET5_BICUBIC.items():
        r = runner.evaluate_scale(predictors.BicubicPredictor(), ds, scale,
                                  protocol.PRESETS["benchmark"])
        assert r.lr_source == "downsample" and r.shave == scale
        got = {os.path.splitext(k)[0]: v["psnr"] for k, v in r.per_image.items()}
        assert got == pytest.approx(want, abs=1e-4)
        assert r.psnr == pytest.approx(np.mean(list(want.values())), abs=1e-4)


def _benchmark_tree(tmp_path, name, hrs, scale, lr_name="{stem}x{s}.png"):
    root = tmp_path / name
    _write_folder(root / "HR", hrs)
    lr_dir = root / "LR_bicubic" / f"X{scale}"
    os.makedirs(lr_dir)
    for fname, hr in hrs.items():
        stem = os.path.splitext(fname)[0]
        hr_c = hr[:hr.shape[0] - hr.shape[0] % scale, :hr.shape[1] - hr.shape[1] % scale]
        Image.fromarray(imresize(hr_c, 1 / scale)).save(lr_dir / lr_name.format(stem=stem, s=scale))
    return str(root)


def test_paired_lr_folder_is_used_for_set14_and_matches_on_the_fly(tmp_path):
    hrs = {"a.png": _rand_img(41, 30, 1), "b.png": _rand_img(36, 44, 2)}
    root = _benchmark_tree(tmp_path, "Set14", hrs, 2)
    ds = datasets.open_eval_set(root)
    assert ds.name == "Set14" and ds.hr_dir == os.path.join(root, "HR")
    assert [ds.source.key(i) for i in range(len(ds))] == ["a.png", "b.png"]
    bench = protocol.PRESETS["benchmark"]
    paired = runner.evaluate_scale(predictors.BicubicPredictor(), ds, 2, bench)
    assert paired.lr_source == "paired" and paired.degradation == "file"
    # The files hold MATLAB imresize of the modcropped HR: the same LR as making it on the fly.
    fly = runner.evaluate_scale(predictors.BicubicPredictor(), ds, 2, bench,
                                lr_source="downsample", degradation="matlab")
    assert fly.lr_source == "downsample"
    for k in hrs:
        assert paired.per_image[k]["psnr"] == pytest.approx(fly.per_image[k]["psnr"], abs=1e-12)
        assert paired.per_image[k]["ssim"] == pytest.approx(fly.per_image[k]["ssim"], abs=1e-12)
    assert paired.per_image["a.png"]["hr_hw"] == [40, 30]  # HR cropped to round(h * s)
    # Scale 3 is not paired here: the auto choice falls back and says so.
    r3 = runner.evaluate_scale(predictors.BicubicPredictor(), ds, 3, bench)
    assert "not found" in r3.lr_source
    table = reports.markdown_table([("Bicubic", {"Set14": {2.0: paired, 3.0: r3}})], [2, 3])
    assert "†" in table.splitlines()[2] and "not found" in table


def test_paired_scale_mismatch_names_the_file(tmp_path):
    hrs = {"a.png": _rand_img(40, 40, 3)}
    root = _benchmark_tree(tmp_path, "B100", hrs, 2)
    # An x4 LR file placed in X2: the reference's H // h gives 4, not 2.
    Image.fromarray(imresize(hrs["a.png"], 0.25)).save(
        os.path.join(root, "LR_bicubic", "X2", "ax2.png"))
    failures = []
    r = runner.evaluate_scale(predictors.BicubicPredictor(), datasets.open_eval_set(root), 2,
                              protocol.PRESETS["benchmark"], failures=failures)
    assert r is None and len(failures) == 1 and "a.png" in failures[0] and "scale 4" in failures[0]


def test_div2k_preset_is_rgb_with_extra_shave(tmp_path):
    hr = _rand_img(60, 52, 4)
    root = _write_folder(tmp_path / "DIV2K_valid_HR", {"0801.png": hr})
    ds = datasets.open_eval_set(root)
    proto = protocol.get_preset(protocol.default_preset(ds.name))
    r = runner.evaluate_scale(predictors.BicubicPredictor(), ds, 2, proto)
    assert r.protocol == "div2k" and r.shave == 8
    lr, gt = protocol.degrade(hr, 2)
    pred = images.to_float(images.resize_bicubic(lr, gt.shape[:2]))
    g = images.to_float(gt)
    assert r.per_image["0801.png"]["psnr"] == pytest.approx(
        metrics.psnr(pred, g, shave=8, y_channel=False), abs=1e-12)
    assert r.per_image["0801.png"]["ssim"] == pytest.approx(
        metrics.ssim(pred, g, shave=8, y_channel=False), abs=1e-12)


@pytest.mark.slow  # quick tier under 90 s
def test_msit_predictor_follows_the_protocol(tmp_path, tiny_ckpt):
    from msit_jax.io import pretrained

    hrs = {"x.png": _rand_img(30, 27, 5), "y.png": _rand_img(26, 33, 6)}
    ds = datasets.open_eval_set(_write_folder(tmp_path / "mini", hrs))
    cfg, variables = pretrained.load(tiny_ckpt)
    pred = predictors.MSITPredictor(cfg, variables, chunk=300)
    r = runner.evaluate_scale(pred, ds, 3.5, protocol.PRESETS["benchmark"])
    for name, hr in hrs.items():
        lr, gt = protocol.degrade(hr, 3.5)
        sr = engine.upscale(cfg, variables, images.to_float(lr), gt.shape[:2], chunk=300)
        want = metrics.psnr(sr, images.to_float(gt), shave=4, y_channel=True)
        assert r.per_image[name]["psnr"] == pytest.approx(want, abs=1e-9)
        assert r.per_image[name]["lr_hw"] == list(lr.shape[:2])
        assert r.per_image[name]["time_s"] > 0


def _run_evaluate(args, timeout=300, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--noprogress",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


def test_evaluate_cli_bicubic_reference_figures():
    p = _run_evaluate(["--model", "bicubic", "--data", "../shared/data/Set5",
                       "--scales", "2,3,4,6,8"])
    assert p.returncode == 0, p.stderr
    row = [ln for ln in p.stdout.splitlines() if ln.startswith("| Bicubic | Set5")][0]
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    psnrs = [float(c.split("/")[0]) for c in cells]
    want = [round(float(np.mean(list(v.values()))), 2) for v in REFERENCE_SET5_BICUBIC.values()]
    assert psnrs == pytest.approx(want, abs=0.006)


def test_evaluate_cli_published_matlab_figures():
    p = _run_evaluate(["--model", "bicubic_y", "--degradation", "matlab", "--protocol", "matlab",
                       "--data", "../shared/data/Set5", "--scales", "2,3,4"])
    assert p.returncode == 0, p.stderr
    assert "| 33.66 / 0.9299 | 30.39 / 0.8682 | 28.42 / 0.8104 |" in p.stdout


def test_evaluate_cli_msit_outputs_and_failures(tmp_path, tiny_ckpt):
    hrs = {"p.png": _rand_img(36, 30, 7), "q.png": _rand_img(36, 30, 8)}  # one size: fewer compiles
    data = _write_folder(tmp_path / "Mini", hrs)
    with open(os.path.join(data, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    out_json, out_img, out_plot = tmp_path / "r.json", tmp_path / "imgs", tmp_path / "plot.png"
    p = _run_evaluate(["--checkpoint", tiny_ckpt, "--data", data, "--scales", "2,3.5",
                       "--chunk", "512", "--json", str(out_json), "--save_images", str(out_img),
                       "--plot", str(out_plot)])
    # The broken file fails (named, exit 4: an unreadable input); the others are still scored.
    assert p.returncode == 4
    assert "broken.png" in p.stderr
    res = json.loads(out_json.read_text())
    assert set(res) == {"Mini"} and set(res["Mini"]) == {"2", "3.5"}
    for key, scale in (("2", 2.0), ("3.5", 3.5)):
        e = res["Mini"][key]
        assert set(e["per_image"]) == {"p.png", "q.png"}
        assert e["psnr"] == pytest.approx(np.mean([v["psnr"] for v in e["per_image"].values()]))
        assert e["ssim"] == pytest.approx(np.mean([v["ssim"] for v in e["per_image"].values()]))
        assert all(v["time_s"] > 0 for v in e["per_image"].values())
        assert "bicubic" in e and set(e["bicubic"]["per_image"]) == {"p.png", "q.png"}
        for name, hr in hrs.items():
            _, gt = protocol.degrade(hr, scale)
            saved = images.read_image(str(out_img / "Mini" / f"x{key}" / name))
            assert saved.shape == gt.shape
    assert "| MSIT | Mini |" in p.stdout and "| Bicubic | Mini |" in p.stdout
    with Image.open(out_plot) as im:
        assert im.format == "PNG" and im.size[0] > 100
    # The paths written are printed; the failure is listed once at the end, too.
    assert f"wrote {out_plot}" in p.stderr and f"wrote {out_json}" in p.stderr
    assert "MSIT Mini x2: PSNR" in p.stderr and "s/image" in p.stderr  # per (dataset, scale)


def test_evaluate_cli_usage_errors():
    p = _run_evaluate(["--data", "../shared/data/Set5"])
    assert p.returncode != 0 and "--checkpoint" in p.stderr
    p = _run_evaluate(["--model", "bicubic", "--data", "../shared/data/Set5", "--scales", "0.5"])
    assert p.returncode == 2 and "--scales must be finite numbers >= 1" in p.stderr


# Prepared in a subprocess: TFDS derives a builder's code path from its module, which
# fails for a class defined inside the tests package (it then needs importlib_resources).
_TFDS_BUILDER = """
import os, sys
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

src, data_dir = sys.argv[1:]

class MsitEvalTestSr(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "hr": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
            "id": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for name in sorted(os.listdir(src)):
            yield name, {"hr": np.asarray(Image.open(os.path.join(src, name))), "id": name}

MsitEvalTestSr(data_dir=data_dir, file_format="array_record").download_and_prepare()
"""


def _make_tfds(src_folder, data_dir):
    p = subprocess.run([sys.executable, "-c", _TFDS_BUILDER, src_folder, data_dir],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_tfds_source_matches_folder(tmp_path):
    hrs = {"m.png": _rand_img(30, 34, 9), "n.png": _rand_img(28, 28, 10)}
    folder = datasets.open_eval_set(_write_folder(tmp_path / "same", hrs))
    _make_tfds(folder.hr_dir, str(tmp_path / "tfds"))
    ds = datasets.open_eval_set("tfds:msit_eval_test_sr:validation",
                                tfds_data_dir=str(tmp_path / "tfds"))
    assert sorted(ds.source.key(i) for i in range(len(ds))) == ["m.png", "n.png"]
    bench = protocol.PRESETS["benchmark"]
    a = runner.evaluate_scale(predictors.BicubicPredictor(), ds, 2, bench)
    b = runner.evaluate_scale(predictors.BicubicPredictor(), folder, 2, bench)
    for k in hrs:
        assert a.per_image[k]["psnr"] == b.per_image[k]["psnr"]


def test_run_rejects_bad_configs(tmp_path):
    cfg = runner.default_config()
    cfg.model, cfg.data = "bicubic_y", [shared_data("Set5")]
    cfg.scales, cfg.progress = [2.0], False
    with pytest.raises(ValueError, match="protocol 'matlab'"):
        runner.run(cfg)
    cfg.model, cfg.protocol = "bicubic", ["benchmark", "div2k"]
    with pytest.raises(ValueError, match="one per dataset"):
        runner.run(cfg)
    cfg.protocol, cfg.model = ["auto"], "msit"
    with pytest.raises(ValueError, match="needs a checkpoint"):
        runner.run(cfg)


def test_dtype_override_runs_the_model_in_bfloat16(tiny_ckpt):
    cfg = runner.default_config()
    cfg.model, cfg.checkpoint, cfg.chunk = "msit", tiny_ckpt, 300
    lr = _rand_img(9, 8, 7)
    full = predictors.make_predictor(cfg)
    cfg.dtype = "bfloat16"
    low = predictors.make_predictor(cfg)
    assert full.up.runtime.dtype == "float32" and low.up.runtime.dtype == "bfloat16"
    a, b = full(lr, (20, 17)), low(lr, (20, 17))
    assert b.dtype == np.float32 and b.shape == a.shape
    diff = np.abs(a - b)
    assert 0 < diff.max() < 0.05  # bf16 rounding, not a different model
    cfg.dtype = "float16"
    with pytest.raises(ValueError, match="dtype"):
        predictors.make_predictor(cfg)


# ---------------------------------------------------------------------------- benchmark names

def _bench_root(tmp_path):
    root = tmp_path / "sr-data"
    _write_folder(root / "Set5", {"baby.png": _rand_img(30, 28, 11)})
    _write_folder(root / "BSD100" / "HR", {"3096.png": _rand_img(28, 30, 12)})
    _write_folder(root / "DIV2K" / "DIV2K_valid_HR", {"0801.png": _rand_img(40, 36, 13)})
    return root


def test_benchmark_names_resolve_under_data_root_and_msit_data(tmp_path):
    root = _bench_root(tmp_path)
    assert datasets.resolve("set5", str(root), environ={}) == (None, str(root / "Set5"))
    assert datasets.resolve("Set5", None, environ={"MSIT_DATA": str(root)}) == (
        None, str(root / "Set5"))
    # --data_root wins over MSIT_DATA; aliases and other spellings of a name.
    assert datasets.resolve("bsd100", str(root), environ={"MSIT_DATA": "/nowhere"})[1] == str(
        root / "BSD100")
    assert datasets.resolve("b100", str(root), environ={})[1] == str(root / "BSD100")
    assert datasets.resolve("div2k-valid", str(root), environ={})[1] == str(
        root / "DIV2K" / "DIV2K_valid_HR")
    ds = datasets.open_eval_set("b100", root_flag=str(root), environ={})
    assert ds.name == "BSD100" and ds.hr_dir == str(root / "BSD100" / "HR")
    assert protocol.canonical_name(ds.name) == "b100"  # the reference's Set14/B100 defaults
    div2k = datasets.open_eval_set("div2k-valid", root_flag=str(root), environ={})
    assert protocol.default_preset(div2k.name) == "div2k"
    # A path still works as given, and NAME=PATH names it.
    assert datasets.resolve(str(root / "Set5"), None, environ={}) == (None, str(root / "Set5"))
    assert datasets.resolve(f"Mine={root / 'Set5'}", None, environ={}) == (
        "Mine", str(root / "Set5"))


def test_missing_benchmark_is_one_line_saying_what_to_put_where(tmp_path):
    root = _bench_root(tmp_path)
    with pytest.raises(errors.InputError) as e:
        datasets.resolve("set14", None, environ={"MSIT_DATA": str(root)})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"--data set14: no folder Set14 under MSIT_DATA={root}; download "
                          "Set14 (see docs/evaluation.md#benchmark-data)")
    assert msg.endswith(f"put its HR images in {root / 'Set14'}")
    with pytest.raises(errors.InputError, match="not a benchmark name"):
        datasets.resolve("set6", str(root), environ={})
    # The docs section the message points at exists.
    with open(os.path.join(REPO, "docs", "evaluation.md")) as f:
        assert "\n## Benchmark data\n" in f.read()


def test_evaluate_cli_data_by_name(tmp_path):
    root = _bench_root(tmp_path)
    env = {**os.environ, "MSIT_DATA": str(root)}
    p = _run_evaluate(["--model", "bicubic", "--data", "set5", "--scales", "2"], env=env)
    assert p.returncode == 0, p.stderr
    assert "| Bicubic | Set5 |" in p.stdout
    p = _run_evaluate(["--model", "bicubic", "--data", "set5", "--data_root", str(root),
                       "--scales", "2"], env={**os.environ, "MSIT_DATA": "/nowhere"})
    assert p.returncode == 0, p.stderr
    p = _run_evaluate(["--model", "bicubic", "--data", "urban100", "--scales", "2"], env=env)
    assert p.returncode == errors.EXIT_INPUT and p.stdout == ""
    assert p.stderr.splitlines() == [
        f"error: --data urban100: no folder Urban100 under MSIT_DATA={root}; download Urban100 "
        f"(see docs/evaluation.md#benchmark-data) and put its HR images in "
        f"{root / 'Urban100'}"]


# ---------------------------------------------------------------------------- CLI behaviour

def test_plot_without_matplotlib_fails_before_any_work(tmp_path):
    data = _write_folder(tmp_path / "Mini", {"p.png": _rand_img(30, 26, 14)})
    out = tmp_path / "plot.png"
    no_mpl = ("import sys; sys.modules['matplotlib'] = None; "  # `import matplotlib` fails
              "sys.argv = ['evaluate.py'] + sys.argv[1:]; "
              "from msit_jax.eval.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", no_mpl, "--model", "bicubic", "--data", data,
                        "--scales", "2", "--noprogress", "--plot", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == errors.EXIT_USAGE
    assert p.stderr.splitlines() == ["error: --plot needs matplotlib, an optional dependency: "
                                     'pip install "msit-jax[plot]" (in a checkout: pip install '
                                     "-r requirements-plot.txt)"]
    assert p.stdout == "" and not out.exists()  # nothing opened, scored or written


def test_argparse_style_boolean_gets_the_absl_spelling():
    p = _run_evaluate(["--no-fold", "--model", "bicubic", "--data", "data/Set5"])
    assert p.returncode == errors.EXIT_USAGE
    assert p.stderr.splitlines() == ["error: --no-fold is argparse style; this command takes "
                                     "absl flags: --nofold (or --fold)"]


def test_decoder_help_states_the_per_platform_threshold():
    import math

    from absl import flags

    from msit_jax.eval import cli

    fv = flags.FlagValues()
    cli.define_flags(fv)
    text = " ".join(fv["decoder"].help.split())
    assert engine.grid_min_queries("gpu") == engine.grid_min_queries("tpu")
    cpu, accel = engine.grid_min_queries("cpu"), engine.grid_min_queries("gpu")
    assert (f"{cpu:g} (x{math.sqrt(cpu):g}) on CPU and {accel:g} (x{math.sqrt(accel):g}) "
            "on GPU/TPU") in text
    assert "grid_min_queries()" in text and "9 (x3)" not in text


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """A 3-step tiny training workdir (an Orbax CheckpointManager directory)."""

    from msit_jax.training import train_and_evaluate

    cfg = load_config()
    cfg.total_steps = 3  # > lr.warmup_steps (2)
    wd = str(tmp_path_factory.mktemp("runs") / "tiny")
    train_and_evaluate(cfg, wd)
    return cfg, wd


def test_one_evaluation_path_quiet_cli(tmp_path, tiny_workdir):
    """evaluate.py on a training workdir prints no library logs, and training validation
    and the end-of-run demo give the PSNRs evaluate.py gives (same model, images, scales)."""
    from msit_jax.data.sources import FolderSource
    from msit_jax.io import pretrained
    from msit_jax.training import loop

    cfg, wd = tiny_workdir
    hrs = {"p.png": _rand_img(36, 30, 15), "q.png": _rand_img(36, 30, 16)}
    data = _write_folder(tmp_path / "Mini", hrs)
    out_json = tmp_path / "r.json"
    p = _run_evaluate(["--checkpoint", wd, "--data", data, "--scales", "2,3", "--nofold",
                       "--with_bicubic", "--json", str(out_json)])
    assert p.returncode == 0, p.stderr
    for noise in ("orbax", "CheckpointManager", "WARNING:absl", "read only", "W1", "I1"):
        assert noise not in p.stderr, (noise, p.stderr)
    assert f"load {wd} ... " in p.stderr  # the timed stage instead
    res = json.loads(out_json.read_text())["Mini"]

    model_cfg, variables = pretrained.load(wd)
    ecfg = cfg.eval.copy_and_resolve_references()
    ecfg.update(scales=(2.0, 3.0), max_images=0, max_side=0, y_channel=True, shave_extra=0)
    source = FolderSource(data)
    val = loop.validation_metrics(model_cfg, variables, source, ecfg)
    assert val["psnr_x2"] == res["2"]["psnr"] and val["psnr_x3"] == res["3"]["psnr"]
    run_cfg = cfg.copy_and_resolve_references()
    run_cfg.eval = ecfg
    run_cfg.demo.update(enabled=True, scales=(2.0, 3.0), png_scale=2.0, window=16)
    demo, png = loop.run_demo(run_cfg, model_cfg, variables, source, str(tmp_path), None)
    for key, scale in (("2", 2.0), ("3", 3.0)):
        assert demo[scale] == {"msit": res[key]["psnr"], "bicubic": res[key]["bicubic"]["psnr"]}
    with Image.open(png) as im:
        assert im.size == (4 * 16 + 3 * 4, 16 + 16)  # four 16 x 16 panels, gaps, labels
