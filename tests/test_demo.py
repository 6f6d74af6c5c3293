"""The web demo (`python -m msit_jax.demo`): its core without a server, and the page
driven over HTTP with gradio_client. Needs `pip install "msit-jax[demo]"` (in a checkout: -r requirements-demo.txt)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

import msit_jax  # noqa: E402
from msit_jax import demo, images  # noqa: E402
from msit_jax.inference import budget, engine  # noqa: E402
from msit_jax.models import reparam  # noqa: E402
from tests.conftest import REPO, shared_data  # noqa: E402


@pytest.fixture(scope="module")
def model(make_model_folder):
    """A tiny msit-jax checkpoint folder -> (path, model_cfg, variables)."""
    return make_model_folder(3)


@pytest.fixture(scope="module")
def up(model):
    return msit_jax.Upscaler.from_pretrained(model[0])


@pytest.fixture(scope="module")
def woman_lr():
    """Set5 'woman' (344 x 228, H x W) reduced 4x with Pillow bicubic: (86, 57, 3) uint8."""
    hr = images.read_image(shared_data("Set5", "woman.png"))
    return images.resize_bicubic(hr, (hr.shape[0] // 4, hr.shape[1] // 4))


def reference(model, lr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """`engine.upscale` of the same (folded, as from_pretrained does) model, as uint8."""
    _, cfg, variables = model
    return images.to_uint8(engine.upscale(*reparam.fold(cfg, variables),
                                             images.to_float(lr), hw))


@pytest.mark.slow  # quick tier under 90 s
def test_upscale_pair_equals_inference_and_bicubic(model, up, woman_lr):
    assert woman_lr.shape == (86, 57, 3)
    sr, bic, info = demo.upscale_pair(up, woman_lr, 3.5)
    hw = (round(86 * 3.5), round(57 * 3.5))
    assert hw == (301, 200) and sr.shape == bic.shape == (301, 200, 3)
    assert sr.dtype == bic.dtype == np.uint8
    np.testing.assert_array_equal(sr, reference(model, woman_lr, hw))
    np.testing.assert_array_equal(bic, images.resize_bicubic(woman_lr, hw))
    assert info["in_hw"] == (86, 57) and info["out_hw"] == hw and info["tile"] == 0
    assert info["seconds"] > 0
    text = demo.format_info(info)
    assert "301 x 200** (H x W) from 86 x 57" in text and "s**" in text
    # an exact output size (H x W), anisotropic; a PIL image in
    sr, _, info = demo.upscale_pair(up, Image.fromarray(woman_lr), 9.0, 100, 70)
    assert sr.shape == (100, 70, 3) and info["out_hw"] == (100, 70)


def test_large_inputs_use_the_tiled_path(model, up, woman_lr):
    """Under a small memory budget the encoder is tiled exactly as Engine(tile=...) does."""
    budget_gb = 2.0 / 1024  # 2 MB: the 86 x 57 encoder (~10 MB estimated) does not fit
    tile = budget.auto_tile(up.model_cfg, (86, 57), budget_gb * 2 ** 30)
    assert 0 < tile < 57
    calls = []
    sr, _, info = demo.upscale_pair(up, woman_lr, 1.5, max_memory_gb=budget_gb,
                                    progress=lambda d, t: calls.append((d, t)))
    assert info["tile"] == tile and sr.shape == (129, 86, 3)  # round(85.5) = 86
    _, cfg, variables = model
    want = engine.Engine(*reparam.fold(cfg, variables), tile=tile)(
        images.to_float(woman_lr), (129, 86))
    np.testing.assert_array_equal(sr, images.to_uint8(want))
    assert calls and calls[-1][0] == calls[-1][1]
    with pytest.raises(demo.DemoError, match=r"output 860 x 570 \(H x W\) needs .* over"):
        demo.upscale_pair(up, woman_lr, 10.0, max_memory_gb=budget_gb)


def test_bad_requests_are_readable(tmp_path, woman_lr, monkeypatch):
    for scale in (0.5, 31, float("nan"), "x"):
        with pytest.raises(demo.DemoError, match="scale must be"):
            demo.output_hw((86, 57), scale, None, None)
    assert demo.output_hw((86, 57), 30, 0, 0) == (2580, 1710)
    with pytest.raises(demo.DemoError, match="both the output height and width"):
        demo.output_hw((86, 57), 2, 200, None)
    with pytest.raises(demo.DemoError, match=r"smaller than the input 86 x 57"):
        demo.output_hw((86, 57), 2, 200, 50)
    with pytest.raises(demo.DemoError, match="whole pixels"):
        demo.output_hw((86, 57), 2, 200.5, 100)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(demo.DemoError, match="not an image Pillow can read"):
        demo.read_upload(str(text))
    good = tmp_path / "woman.png"
    Image.fromarray(woman_lr).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(demo.DemoError, match="could not be decoded"):
        demo.read_upload(str(truncated))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 86 x 57 > 2 x 1000: a "bomb"
    with pytest.raises(demo.DemoError, match="too large"):
        demo.read_upload(str(good))
    monkeypatch.undo()
    rgb, note = demo.read_upload(str(good))
    np.testing.assert_array_equal(rgb, woman_lr)
    assert note == ""
    Image.fromarray(np.dstack([woman_lr, np.full((86, 57), 9, np.uint8)])).save(tmp_path / "a.png")
    assert demo.read_upload(str(tmp_path / "a.png"))[1] == "alpha channel dropped"


def test_running_jobs_stop_at_a_chunk_boundary(up, woman_lr):
    """x2 of 86 x 57 runs the grid decoder over the 4902 LR centres, 39 calls of at most
    128 on CPU (engine.grid_centres_per_call): a job whose client left (should_stop) or
    that ran past max_seconds stops at the next one."""
    n = -(-86 * 57 // engine.grid_centres_per_call(up.engine.chunk, 2 * 2))
    assert n == 39
    answers = iter([False, True])
    with pytest.raises(demo.Cancelled, match=f"after 2 of {n} chunks"):
        demo.upscale_pair(up, woman_lr, 2.0, should_stop=lambda: next(answers))
    with pytest.raises(demo.DemoError, match=rf"Stopped after 0 s \(1 of {n} chunks\): over "
                                             r"this demo's limit of 1e-09 s"):
        demo.upscale_pair(up, woman_lr, 2.0, max_seconds=1e-9)
    # refused before it runs when estimated over the limit; the estimate is in info
    cost = demo.CostModel(encode_s=1e-6, query_s=1e-6, centre_s=0.0, grid_s=1e-6,
                          chunk=4096)
    with pytest.raises(demo.DemoError, match=r"would take about 4 s here, over this demo's "
                                             r"limit of 3 s"):
        demo.upscale_pair(up, woman_lr, 30.0, max_seconds=3, cost=cost)
    _, _, info = demo.upscale_pair(up, woman_lr, 1.5, max_seconds=60, cost=cost)
    assert info["estimate"] == pytest.approx((86 * 57 + 129 * 86) * 1e-6)


def test_internal_errors_show_no_details(tmp_path, woman_lr, capsys):
    """An unexpected failure reaches the page as one fixed sentence; its traceback and
    the paths in it go to the server's log."""
    import gradio as gr

    class Broken:
        def plan(self, *args, **kwargs):
            raise RuntimeError(f"cannot read {tmp_path}/weights.bin")

    upload = tmp_path / "woman.png"
    Image.fromarray(woman_lr).save(upload)
    run = demo.make_handler(Broken(), str(tmp_path / "out"), 4.0)
    with pytest.raises(gr.Error) as e:
        run(str(upload), 2.0, 0, 0)
    assert e.value.message == demo.INTERNAL_ERROR and str(tmp_path) not in e.value.message
    log = capsys.readouterr().out
    assert "msit-jax demo: internal error" in log and "Traceback" in log
    assert f"{tmp_path}/weights.bin" in log
    with pytest.raises(gr.Error) as e:
        run(None, 2.0, 0, 0)
    assert e.value.message == "Upload an image first."


def test_page_components(up, tmp_path):
    """The page's inputs and outputs, the upscale endpoint (four inputs, five outputs);
    building it writes nothing beside the module (gradio does for component subclasses)."""
    config = demo.build_app(up, str(tmp_path)).get_config_file()
    labels = {c["props"].get("label") for c in config["components"]}
    assert {"Input image", "Scale", "Output height H (px)", "Output width W (px)",
            "Bicubic (Pillow)", "MSIT", "Swipe: bicubic | MSIT", "Download PNG (MSIT)"} <= labels
    (dep,) = [d for d in config["dependencies"] if d.get("api_name") == "upscale"]
    assert (len(dep["inputs"]), len(dep["outputs"])) == (4, 5)
    assert not os.path.exists(os.path.splitext(demo.__file__)[0] + ".pyi")


def test_without_gradio_one_line_error():
    code = ("import sys; sys.modules['gradio'] = None\n"
            "from msit_jax import demo\n"
            "sys.exit(demo.main(['--checkpoint', 'unused']))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        'error: the demo needs gradio: pip install "msit-jax[demo]" (in a checkout: pip install '
        "-r requirements-demo.txt)"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen, log: str, timeout: float = 120.0) -> str:
    """The URL the demo prints once it listens; fails with its log if it exits or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log) as f:
            for line in f:
                if "listening on " in line:
                    return line.split("listening on ")[1].split()[0]
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    with open(log) as f:
        pytest.fail(f"the demo did not start (rc {proc.poll()}):\n{f.read()}")


@pytest.mark.slow
def test_server_upscales_a_set5_image(tmp_path, model, woman_lr):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    upload = tmp_path / "woman_lr.png"
    Image.fromarray(woman_lr).save(upload)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    log = str(tmp_path / "demo.log")
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))  # the compilation cache: not the user's
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "msit_jax.demo", "--checkpoint",
                                 model[0], "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = _wait_listening(proc, log)
        assert url.startswith(f"http://127.0.0.1:{port}")
        client = Client(url, verbose=False, download_files=str(tmp_path / "client"))
        sr_path, bic_path, pair, download, info = client.predict(
            handle_file(str(upload)), 3.5, 0, 0, api_name="/upscale")
        hw = (round(86 * 3.5), round(57 * 3.5))
        sr = images.read_image(sr_path)
        assert sr.shape == (*hw, 3)
        diff = np.abs(sr.astype(int) - reference(model, woman_lr, hw).astype(int))
        assert diff.max() <= 1, diff.max()  # uint8 of the same float32 computation
        np.testing.assert_array_equal(images.read_image(bic_path),
                                      images.resize_bicubic(woman_lr, hw))
        assert [images.read_image(p).shape for p in pair] == [(*hw, 3)] * 2
        np.testing.assert_array_equal(images.read_image(download), sr)
        assert download.endswith(".png") and "301 x 200** (H x W)" in info

        with pytest.raises(AppError, match="not an image Pillow can read"):
            client.predict(handle_file(str(bad)), 2.0, 0, 0, api_name="/upscale")
        with pytest.raises(AppError, match="scale must be between 1 and 30, got 31"):
            client.predict(handle_file(str(upload)), 31, 0, 0, api_name="/upscale")
        with pytest.raises(AppError, match="smaller than the input"):
            client.predict(handle_file(str(upload)), 2.0, 10, 10, api_name="/upscale")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with open(log) as f:
        text = f.read()
    assert proc.returncode == 0 and "Traceback" not in text, text
    assert text.rstrip().endswith("msit-jax demo: stopped"), text
    assert not list((tmp_path / "gradio").glob("msit-demo-*"))  # results removed at exit
