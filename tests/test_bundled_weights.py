"""The weights bundled with the package (msit_jax/weights): names, loading, the model card.

Nothing here depends on the particular weights: the release file replaces the
placeholder and every test still holds. Figures are checked against the card's
own JSON (written by benchmarks/bundle_weights.py from the same file), never
against fixed numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

from msit_jax import Upscaler, demo, weights

from msit_jax.inference import cli as upscale
from msit_jax.eval import cli as eval_cli
from msit_jax.eval import runner
from msit_jax.io import model_dir, pretrained
from tests.conftest import REPO, import_benchmark, shared_data

NAME = weights.DEFAULT
POISONED = ("torch", "grain", "tensorflow_datasets", "tensorflow", "safetensors")


@pytest.fixture(scope="module")
def bundled():
    return Upscaler.from_pretrained(NAME, chunk=512)


@pytest.fixture(scope="module")
def figures():
    with open(os.path.join(weights.HERE, NAME + ".json")) as f:
        return json.load(f)


def tiny_rgb(h: int = 9, w: int = 11, seed: int = 0) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def test_registry_lists_the_bundled_files():
    assert NAME in weights.available()
    for name in weights.available():
        assert os.path.isfile(weights.weights_path(name)), name
        assert os.path.isfile(weights.card_path(name)), name
    assert pretrained.resolve(NAME) == weights.weights_path(NAME)


def test_unknown_name_is_one_line_naming_the_bundled_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing called msit-nope here
    with pytest.raises(weights.UnknownModelError) as e:
        pretrained.load("msit-nope")
    msg = str(e.value)
    assert "\n" not in msg and "msit-nope" in msg
    assert all(n in msg for n in weights.available())
    with pytest.raises(weights.UnknownModelError, match=re.escape(NAME)):
        weights.weights_path("msit-nope")
    # a path-like name stays a missing path
    with pytest.raises(FileNotFoundError, match="no checkpoint at ckpt/msit-nope.pth$"):
        pretrained.load("ckpt/msit-nope.pth")
    # the command line: one error line, the missing-input exit code, nothing written
    Image.fromarray(tiny_rgb()).save(tmp_path / "a.png")
    rc = upscale.main([str(tmp_path / "a.png"), "--checkpoint", "msit-nope", "--scale", "2",
                       "-o", str(tmp_path / "out.png")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 4 and len(err) == 1 and "msit-nope" in err[0] and NAME in err[0], err
    assert not (tmp_path / "out.png").exists()


def test_real_path_shadows_the_bundled_name(tmp_path, monkeypatch, tiny_cfg, tiny_vars):
    monkeypatch.chdir(tmp_path)
    bundled_cfg, _ = pretrained.load(NAME)
    model_dir.save_model(str(tmp_path / NAME), tiny_cfg, tiny_vars)
    assert pretrained.resolve(NAME) == NAME  # the folder in the working directory
    cfg, _ = pretrained.load(NAME)
    assert (cfg.dim, cfg.edsr.n_feats) == (tiny_cfg.dim, tiny_cfg.edsr.n_feats)
    assert (cfg.dim, cfg.edsr.n_feats) != (bundled_cfg.dim, bundled_cfg.edsr.n_feats)


def test_from_pretrained_by_name_equals_the_file_by_path(bundled):
    assert (bundled.model_cfg.conv, bundled.model_cfg.batch_norm) == ("plain", False)  # folded
    by_path = Upscaler.from_pretrained(weights.weights_path(NAME), chunk=512)
    rgb = tiny_rgb()
    out = bundled(rgb, scale=2.5)
    assert out.dtype == np.uint8 and out.shape == (22, 28, 3)  # round(9 * 2.5), round(27.5)
    np.testing.assert_array_equal(out, by_path(rgb, scale=2.5))
    img = bundled(Image.fromarray(rgb), scale=2.5)
    assert isinstance(img, Image.Image) and img.size == (28, 22) and img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), out)
    flt = bundled(rgb.astype(np.float32) / 255, scale=2.5)
    assert flt.dtype == np.float32 and np.isfinite(flt).all() and 0 <= flt.min() <= flt.max() <= 1


def test_numpy_reader_matches_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    path = weights.weights_path(NAME)
    ours, meta = pretrained.read_safetensors(path)
    ref = st.load_file(path)
    assert sorted(ours) == sorted(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    assert pretrained.META_CONFIG in meta
    # every dtype the format has that numpy holds, 0-d and empty tensors, metadata
    import ml_dtypes

    tensors = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3),
               "f16": np.array([1.5, -2], np.float16), "f64": np.array(3.25),
               "bf16": np.array([1.0, 0.5], ml_dtypes.bfloat16),
               "i64": np.array(7, np.int64), "i32": np.array([-1], np.int32),
               "u8": np.array([255], np.uint8), "b": np.array([True, False]),
               "empty": np.zeros((0, 4), np.float32)}
    st.save_file(tensors, str(tmp_path / "all.safetensors"), metadata={"k": "v"})
    got, meta = pretrained.read_safetensors(str(tmp_path / "all.safetensors"))
    assert meta == {"k": "v"}
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert got["f32"].flags.writeable  # a copy, not a view of the file's bytes


def _write_raw(path, header: dict, data: bytes, declared: int | None = None) -> str:
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(h) if declared is None else declared).to_bytes(8, "little") + h + data)
    return str(path)


@pytest.mark.parametrize("case, reason", [
    ("short", "shorter than the 8-byte header size"),
    ("huge_header", "exceeds the file"),
    ("not_json", "not JSON"),
    ("bad_dtype", "unsupported dtype 'C64'"),
    ("wrong_size", "do not hold F32 [2]"),
    ("overlap", "overlapping"),
    ("trailing", "trailing bytes"),
    ("bad_meta", "__metadata__"),
])
def test_numpy_reader_refuses_malformed_files_in_one_line(tmp_path, case, reason):
    p = tmp_path / f"{case}.safetensors"
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "huge_header":
        _write_raw(p, {"a": f32}, bytes(8), declared=10 ** 9)
    elif case == "not_json":
        p.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    elif case == "bad_dtype":
        _write_raw(p, {"a": {**f32, "dtype": "C64"}}, bytes(8))
    elif case == "wrong_size":
        _write_raw(p, {"a": {**f32, "data_offsets": [0, 4]}}, bytes(4))
    elif case == "overlap":
        _write_raw(p, {"a": f32, "b": {**f32, "data_offsets": [4, 12]}}, bytes(12))
    elif case == "trailing":
        _write_raw(p, {"a": f32}, bytes(12))
    else:
        _write_raw(p, {"__metadata__": {"k": 1}, "a": f32}, bytes(8))
    with pytest.raises(ValueError) as e:
        pretrained.read_safetensors(str(p))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"could not read {p} as safetensors") \
        and reason in msg, msg


@pytest.mark.slow  # quick tier under 90 s
def test_upscale_cli_default_model_writes_the_right_size(tmp_path, capsys):
    fv = flags.FlagValues()
    upscale.define_flags(fv)
    assert fv["checkpoint"].default == NAME and NAME in fv["checkpoint"].help
    Image.fromarray(tiny_rgb(8, 10, seed=1)).save(tmp_path / "in.png")
    rc = upscale.main([str(tmp_path / "in.png"), "--scale", "2.5", "-o",
                       str(tmp_path / "out.png"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (25, 20) and out.mode == "RGB"  # W x H: round(10 * 2.5), 8 * 2.5


def test_demo_and_evaluate_default_to_the_bundled_model():
    fv = flags.FlagValues()
    demo.define_flags(fv)
    assert fv["checkpoint"].default == NAME and NAME in fv["checkpoint"].help
    fv = flags.FlagValues()
    eval_cli.define_flags(fv)
    fv(["evaluate.py", "--model", NAME, "--data", "set5"])
    cfg = eval_cli.config_from_flags(fv)
    assert (cfg.model, cfg.checkpoint) == ("msit", NAME)
    fv = flags.FlagValues()
    eval_cli.define_flags(fv)
    fv(["evaluate.py", "--model", NAME, "--checkpoint", "x.pth", "--data", "set5"])
    with pytest.raises(ValueError, match="not both"):
        eval_cli.config_from_flags(fv)


def test_card_names_its_figures_and_describes_this_file(figures):
    path = weights.weights_path(NAME)
    # the card and the figures were made from exactly this file (not a stale copy)
    assert figures["bytes"] == os.path.getsize(path) <= 5_000_000
    import hashlib

    with open(path, "rb") as f:
        assert figures["sha256"] == hashlib.sha256(f.read()).hexdigest()
    with open(weights.card_path(NAME)) as f:
        card = f.read()
    assert figures["sha256"][:16] in card
    table = figures["table"]
    assert set(table) == {"Set5", "Set14", "B100"}
    for ds, by_scale in table.items():
        assert set(by_scale) == {"x2", "x3", "x4", "x6", "x8"}, ds
        for method, label in (("msit", NAME), ("bicubic", "bicubic")):
            cells = " | ".join(f"{by_scale[k][method]['psnr']:.2f} / "
                               f"{by_scale[k][method]['ssim']:.4f}" for k in by_scale)
            assert f"| {ds} | {label} | {cells} |" in card, (ds, method)
    for section in ("## Training", "## Results", "## Limitations", "## License",
                    "291", "out of distribution", "astronaut"):
        assert section in card, section
    # README carries the same table between its markers
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    block = readme.split(f"<!-- {NAME} table -->")[1].split(f"<!-- /{NAME} table -->")[0]
    assert f"| Set5 | {NAME} | " in block and block.strip() in card


def test_card_figure_holds_on_a_fresh_evaluation(tmp_path, figures):
    """The card's Set5 x2 figure for one image, re-measured through the evaluation runner
    from the bundled name: the same number to 0.01 dB, whatever the weights are."""
    image = "butterfly.png"  # the smallest Set5 image (256 x 256)
    claimed = figures["per_image"]["Set5"]["x2"][image]
    folder = tmp_path / "Set5"
    folder.mkdir()
    shutil.copy(os.path.join(shared_data("Set5"), image), folder)
    cfg = runner.default_config()
    cfg.checkpoint, cfg.data, cfg.scales = NAME, [str(folder)], [2.0]
    cfg.protocol, cfg.with_bicubic, cfg.progress = ["benchmark"], True, False
    results, baseline, failures = runner.run(cfg)
    assert not failures
    ours, bic = results["Set5"][2.0].per_image[image], baseline["Set5"][2.0].per_image[image]
    assert abs(ours["psnr"] - claimed["msit"][0]) < 0.01
    assert abs(ours["ssim"] - claimed["msit"][1]) < 1e-4
    assert abs(bic["psnr"] - claimed["bicubic"][0]) < 0.01


@pytest.mark.slow
def test_bundled_name_loads_without_optional_packages(tmp_path):
    """As `pip install msit-jax` (no extras): no torch, grain, TFDS, TensorFlow or the
    safetensors package; run from outside the checkout."""
    code = f"""
import json, sys
for name in {POISONED!r}:
    sys.modules[name] = None  # `import name` now fails, as without the package
import numpy as np
from msit_jax import Upscaler
up = Upscaler.from_pretrained({NAME!r})
sr = up(np.random.RandomState(0).randint(0, 256, (10, 12, 3)).astype(np.uint8), scale=2.5)
loaded = sorted(m for m in sys.modules if sys.modules[m] is not None
                and m.split(".")[0] in {POISONED!r})
print(json.dumps(dict(shape=list(sr.shape), dtype=str(sr.dtype), loaded=loaded)))
"""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"shape": [25, 30, 3], "dtype": "uint8", "loaded": []}


# --- benchmarks/bundle_weights.py: its pure parts (the whole script runs at release) -------

@pytest.fixture(scope="module")
def bundle():
    return import_benchmark("bundle_weights")


def _fake_workdir(root) -> str:
    """The files read_run reads (no real checkpoint: it only lists the steps)."""
    wd = root / "run"
    for step in (60, 120):
        (wd / "checkpoints" / str(step)).mkdir(parents=True)
    (wd / "model_config.json").write_text("{}")
    (wd / "config.json").write_text(json.dumps({"total_steps": 120, "data": {"train": {
        "kind": "folder", "path": str(root)}}}))
    (wd / "config_history.jsonl").write_text(json.dumps(
        {"time": "2026-12-02T00:00:00+00:00", "step": 0, "changes": []}) + "\n")
    (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 50, "split": "train", "steps_per_sec": 1.0},
        {"step": 100, "split": "train", "steps_per_sec": 2.0},
        {"step": 120, "split": "train", "steps_per_sec": 4.0},
        {"step": 120, "split": "val", "psnr_x2": 30.0}]) + "\n")
    return str(wd)


def test_bundle_reads_the_final_step_and_its_time(bundle, tmp_path):
    run = bundle.read_run(_fake_workdir(tmp_path), "latest")
    assert (run["step"], run["steps"], run["starts"]) == (120, [60, 120], 1)
    assert run["step_s"] == pytest.approx(50 / 1 + 50 / 2 + 20 / 4)
    assert run["last_val"]["psnr_x2"] == 30.0 and run["wall_s"] > 0
    assert bundle.read_run(str(tmp_path / "run"), "60")["step_s"] == pytest.approx(50.0)
    for bad in ("7", "best"):
        with pytest.raises(SystemExit):
            bundle.read_run(str(tmp_path / "run"), bad)


def test_bundle_table_and_readme_markers(bundle, tmp_path):
    cell = {"msit": {"psnr": 31.234, "ssim": 0.91234}, "bicubic": {"psnr": 30.0, "ssim": 0.9},
            "lr_source": "downsample (reference: paired, not found)"}
    table = {"Set5": {"x2": {**cell, "lr_source": "downsample"}}, "B100": {"x2": cell}}
    md = bundle.markdown_table("lite", table, [2.0])
    assert md.splitlines() == ["| Dataset | Method | x2 |", "|---|---|---|",
                               "| Set5 | lite | 31.23 / 0.9123 |",
                               "| Set5 | bicubic | 30.00 / 0.9000 |",
                               "| B100 | lite | 31.23 / 0.9123 |",
                               "| B100 | bicubic | 30.00 / 0.9000 |"]
    assert bundle.lr_note(table).startswith("B100 x2: the reference reads")
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- lite table -->\nold\n<!-- /lite table -->\nb\n")
    assert bundle.replace_readme_table(str(readme), "lite", md)
    assert readme.read_text() == f"a\n<!-- lite table -->\n{md}\n<!-- /lite table -->\nb\n"
    assert not bundle.replace_readme_table(str(readme), "other", md)
