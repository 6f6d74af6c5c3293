"""The web demo under load and at its limits (`python -m msit_jax.demo`): a burst of 20
concurrent gradio_client requests, the time limit, closed pages, and the messages of
every refusal. The server is one subprocess serving a tiny model; the quick tests
need neither gradio nor a server."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
import uuid

import numpy as np
import pytest
from PIL import Image

from msit_jax import demo, tiny_model_config
from msit_jax.io import model_dir
from msit_jax.models.random_init import random_variables
from tests.conftest import REPO

# Anything a message must not show: a traceback, a server path, a Python file.
LEAK = re.compile(r"Traceback|File \"|/tmp|/work|/home|/usr|\.py\b|site-packages|"
                  r"[A-Za-z]:\\")
BURST = 20
MAX_QUEUE = 8  # the server's --max_queue: a burst of 20 can overflow it
MAX_SECONDS = 30  # the server's --max_seconds
MAX_FILE_MB = 1  # the server's --max_file_mb
RSS_GROWTH_MB = 600  # the server's peak RSS during the burst, over its RSS before


# ---------------------------------------------------------------- quick: no server


def test_listens_on_localhost_only_by_default():
    from absl import flags

    fv = flags.FlagValues()
    demo.define_flags(fv)
    fv(["demo"])
    assert fv.host == "127.0.0.1"
    assert (fv.max_seconds, fv.max_queue) == (demo.MAX_SECONDS, demo.MAX_QUEUE)


def test_public_message_drops_paths_and_tracebacks():
    assert demo.public_message("cannot identify image file '/tmp/gradio/ab/x.png'") == \
        "cannot identify image file '<file>'"
    assert demo.public_message("Traceback (most recent call last):\n  File \"/a/b.py\"") == \
        "Traceback (most recent call last):"  # the first line only
    assert demo.public_message(r"no C:\Users\me\a.png here") == "no <file> here"
    for text in ("The output 10 x 10 (H x W) is smaller", "x1.5 / 2", "ratio 1/2",
                 "over this demo's limit of 4 GB (--max_memory_gb)"):
        assert demo.public_message(text) == text


def test_read_upload_names_no_path(tmp_path):
    missing = str(tmp_path / "gone" / "upload.png")
    with pytest.raises(demo.DemoError) as e:
        demo.read_upload(missing)
    assert str(tmp_path) not in str(e.value) and not LEAK.search(str(e.value))


def _engine(tile: int = 0, grid: bool = True):
    """What CostModel.seconds reads of an Upscaler.plan."""
    return types.SimpleNamespace(tile=tile, model_cfg=tiny_model_config(), grid=grid)


def test_time_estimate_and_refusal():
    cost = demo.CostModel(encode_s=2e-6, query_s=1e-6, centre_s=3e-6, grid_s=0.5e-6,
                          chunk=4096)
    # untiled: encoder pixels x encode_s + the decoder's: per LR centre and output pixel
    # (grid), per output pixel (query)
    assert cost.seconds(_engine(grid=True), (100, 200), (1000, 2000)) == \
        pytest.approx(100 * 200 * (2e-6 + 3e-6) + 2e6 * 0.5e-6)
    assert cost.seconds(_engine(grid=False), (100, 200), (1000, 2000)) == \
        pytest.approx(100 * 200 * 2e-6 + 2e6 * 1e-6)
    # a small output still costs a whole chunk
    assert cost.seconds(_engine(grid=False), (10, 10), (20, 20)) == \
        pytest.approx(100 * 2e-6 + 4096 * 1e-6)
    # tiled: the windows' halos count, and tiles decode per query
    halo = demo.tiling.halo(tiny_model_config())
    tiled = cost.seconds(_engine(tile=64, grid=True), (100, 200), (1000, 2000))
    sides = [sum(hi - lo for lo, hi in (demo.tiling.window(c, halo, n, 64)
                                        for c in demo.tiling.axis_tiles(n, 64)))
             for n in (100, 200)]
    assert sides[0] > 100 and sides[1] > 200
    assert tiled == pytest.approx(sides[0] * sides[1] * 2e-6 + 2e6 * 1e-6)

    assert demo.check_time(None, 10, _engine(), (10, 10), (20, 20)) is None
    assert demo.check_time(cost, None, _engine(), (100, 200), (1000, 2000)) == \
        pytest.approx(1.1)
    assert demo.check_time(cost, 2, _engine(), (100, 200), (1000, 2000)) == \
        pytest.approx(1.1)
    with pytest.raises(demo.DemoError, match=r"The output 1000 x 2000 \(H x W\) would take "
                                             r"about 1 s here, over this demo's limit of "
                                             r"0.5 s \(--max_seconds\)"):
        demo.check_time(cost, 0.5, _engine(), (100, 200), (1000, 2000))


def test_grid_rates_fit_two_runs():
    """seconds = centres x centre_s + pixels x grid_s through two runs; where noise
    would make a rate negative, the other carries all the time."""
    centre, grid = demo.fit_grid(1024, [(16384, 1024 * 5e-5 + 16384 * 1e-6),
                                        (65536, 1024 * 5e-5 + 65536 * 1e-6)])
    assert (centre, grid) == (pytest.approx(5e-5), pytest.approx(1e-6))
    assert demo.fit_grid(1024, [(16384, 0.02), (65536, 0.01)]) == \
        (pytest.approx(0.02 / 1024), 0.0)
    assert demo.fit_grid(1024, [(16384, 0.001), (65536, 0.1)]) == \
        (0.0, pytest.approx(0.1 / 65536))


# ---------------------------------------------------------------- the server


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The demo in a subprocess: its URL, log, process, and an RSS sampler."""

    def __init__(self, root, checkpoint: str):
        self.log = str(root / "demo.log")
        self.port = _free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_TEMP_DIR=str(root / "gradio"))
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "msit_jax.demo", "--checkpoint", checkpoint,
                 "--port", str(self.port), "--max_seconds", str(MAX_SECONDS),
                 "--max_queue", str(MAX_QUEUE), "--max_file_mb", str(MAX_FILE_MB)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = self.wait_for_log(r"listening on (\S+)", timeout=120).group(1)
        self.api = self.url.rstrip("/") + "/gradio_api"
        self.peak_mb = 0.0
        self._sampling = False

    def text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} in the server log:\n{self.text()}")

    def sample_rss(self):
        """Start sampling the server's RSS every 50 ms into peak_mb; returns stop()."""
        self._sampling = True

        def loop():
            while self._sampling:
                self.peak_mb = max(self.peak_mb, _rss_mb(self.proc.pid))
                time.sleep(0.05)

        t = threading.Thread(target=loop, daemon=True)
        t.start()

        def stop():
            self._sampling = False
            t.join()

        return stop

    def stop(self) -> int:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Uploads: 'small' (86 x 57), 'huge' (a PNG over --max_file_mb), 'bad' (not an
    image), 'big' (1500 x 1500, a smooth gradient: a small file)."""
    root = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    out = {}
    for name, hw in (("small", (86, 57)), ("huge", (700, 700))):
        out[name] = str(root / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(out[name])
    assert os.path.getsize(out["huge"]) > MAX_FILE_MB * 2 ** 20
    out["big"] = str(root / "big.png")
    ramp = np.linspace(0, 255, 1500).astype(np.uint8)
    Image.fromarray(np.dstack([np.add.outer(ramp // 2, ramp // 2)] * 3)).save(out["big"])
    assert os.path.getsize(out["big"]) < MAX_FILE_MB * 2 ** 20
    out["bad"] = str(root / "bad.png")
    with open(out["bad"], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n but not really")
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio_client")
    root = tmp_path_factory.mktemp("demo_load")
    cfg = tiny_model_config()
    checkpoint = model_dir.save_model(str(root / "ckpt"), cfg, random_variables(cfg, seed=3))
    s = Server(root, checkpoint)
    yield s
    rc = s.stop()
    text = s.text()
    assert rc == 0 and text.rstrip().endswith("msit-jax demo: stopped"), text


def _client(server, root):
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=str(root))


def _call(client, upload: str, scale, out_h=0, out_w=0) -> tuple[str, object]:
    """('ok', outputs) or ('error', the message the client got)."""
    from gradio_client import handle_file

    try:
        return "ok", client.predict(handle_file(upload), scale, out_h, out_w,
                                    api_name="/upscale")
    except Exception as e:  # noqa: BLE001 - AppError, QueueError, ...: the message counts
        return "error", f"{type(e).__name__}: {e}"


@pytest.mark.slow
def test_burst_of_20_is_answered_or_refused_and_the_server_stays_up(server, files, tmp_path):
    clients = [_client(server, tmp_path / f"c{i}") for i in range(BURST)]
    results, latency = [None] * BURST, [0.0] * BURST
    before_mb = _rss_mb(server.proc.pid)
    stop = server.sample_rss()
    barrier = threading.Barrier(BURST)

    def one(i):
        barrier.wait()
        t0 = time.perf_counter()
        results[i] = _call(clients[i], files["small"], 2.0 + i / 10)
        latency[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.perf_counter() - t0
    stop()
    answered = [i for i, r in enumerate(results) if r and r[0] == "ok"]
    refused = [i for i, r in enumerate(results) if r and r[0] == "error"]
    print(f"\nburst of {BURST}: {len(answered)} answered, {len(refused)} refused in "
          f"{wall:.1f} s; latency answered {min(latency[i] for i in answered):.2f}-"
          f"{max(latency[i] for i in answered):.2f} s; server RSS {before_mb:.0f} MB "
          f"before, peak {server.peak_mb:.0f} MB\n"
          f"{server.wait_for_log(r'warm-up .*').group(0)}")
    assert len(answered) + len(refused) == BURST, results
    assert len(answered) >= MAX_QUEUE  # at least a queue's worth ran
    for i in answered:
        outputs = results[i][1]
        scale = 2.0 + i / 10
        hw = (round(86 * scale), round(57 * scale))
        assert Image.open(outputs[0]).size == (hw[1], hw[0])
        assert f"{hw[0]} x {hw[1]}** (H x W)" in outputs[4]
    for i in refused:
        message = results[i][1]
        assert "Queue is full" in message and not LEAK.search(message), message
    assert server.peak_mb - before_mb < RSS_GROWTH_MB, (before_mb, server.peak_mb)
    # the server is still up and answers
    assert server.proc.poll() is None
    status, outputs = _call(clients[0], files["small"], 3.0)
    assert status == "ok" and "258 x 171** (H x W)" in outputs[4], outputs
    text = server.text()
    assert "Traceback" not in text and text.count("(H x W) in ") >= len(answered) + 1, text


@pytest.mark.slow
def test_over_the_time_limit_is_refused_up_front(server, files, tmp_path):
    client = _client(server, tmp_path)
    """1500 x 1500 -> 4400 x 4400 (H x W): the per-query decoder, ~19 output megapixels
    (about 100 s for the tiny model here, where the limit is 30 s), in the memory
    budget."""
    t0 = time.perf_counter()
    status, message = _call(client, files["big"], 2.0, 4400, 4400)
    assert status == "error", message
    assert re.search(r"The output 4400 x 4400 \(H x W\) would take about \d+ s here, over "
                     rf"this demo's limit of {MAX_SECONDS} s \(--max_seconds\)", message)
    assert time.perf_counter() - t0 < 15  # refused, not run
    assert not LEAK.search(message)
    server.wait_for_log(r"refused: The output 4400 x 4400")


def _join(client, server, upload_path: str, scale: float, session: str) -> str:
    """Queue one /upscale event for `session` (as the page does) -> its event id."""
    config = client.get(server.url.rstrip("/") + "/config").json()
    (fn_index,) = [i for i, d in enumerate(config["dependencies"])
                   if d.get("api_name") == "upscale"]
    body = {"data": [{"path": upload_path, "meta": {"_type": "gradio.FileData"}}, scale, 0, 0],
            "fn_index": fn_index, "session_hash": session, "event_data": None,
            "trigger_id": None}
    r = client.post(server.api + "/queue/join", json=body)
    r.raise_for_status()
    return r.json()["event_id"], fn_index


def _read_until(client, server, session: str, msg: str) -> None:
    """Open the page's event stream for `session`, read until a `msg` message, close it."""
    with client.stream("GET", server.api + "/queue/data",
                       params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == msg:
                return
    pytest.fail(f"the stream of {session} ended before a {msg!r} message")


@pytest.mark.slow
def test_closing_the_page_cancels_its_running_and_queued_jobs(server, files, tmp_path):
    import httpx

    n_before = server.text().count("cancelled after")
    with httpx.Client(timeout=60) as h:
        with open(files["small"], "rb") as f:
            r = h.post(server.api + "/upload", files={"files": ("small.png", f, "image/png")})
        (path,) = r.json()
        running, queued, cancelled = (uuid.uuid4().hex[:11] for _ in range(3))
        # x15 (1290 x 855): seconds of decoding; x13 (1118 x 741) queued behind it
        _join(h, server, path, 15.0, running)
        _join(h, server, path, 13.0, queued)
        _read_until(h, server, running, "progress")  # running; then the page closes
        _read_until(h, server, queued, "estimation")  # waiting; then the page closes
        server.wait_for_log(r"cancelled after \d+ of \d+ chunks")
        # /cancel (a client's Job.cancel) of a running job stops it too
        event_id, fn_index = _join(h, server, path, 15.0, cancelled)
        with h.stream("GET", server.api + "/queue/data",
                      params={"session_hash": cancelled}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and json.loads(line[5:]).get("msg") == "progress":
                    h.post(server.api + "/cancel", json={"session_hash": cancelled,
                                                         "fn_index": fn_index,
                                                         "event_id": event_id})
                    break
        deadline = time.monotonic() + 30
        while server.text().count("cancelled after") < n_before + 2:
            assert time.monotonic() < deadline, server.text()
            time.sleep(0.1)
    # neither ran to the end, and the one queued never started
    client = _client(server, tmp_path)
    status, outputs = _call(client, files["small"], 2.0)
    assert status == "ok", outputs
    text = server.text()
    assert "1290 x 855 (H x W) in" not in text and "1118 x 741" not in text, text


@pytest.mark.slow
def test_refusals_show_a_message_and_no_path(server, files, tmp_path):
    import httpx

    client = _client(server, tmp_path)
    cases = [
        (files["bad"], 2.0, 0, 0, "not an image Pillow can read"),
        (files["small"], 31, 0, 0, "scale must be between 1 and 30, got 31"),
        (files["small"], 0.5, 0, 0, "scale must be between 1 and 30"),
        (files["small"], 2.0, 10, 10, r"10 x 10 \(H x W\) is smaller than the input 86 x 57"),
        (files["small"], 2.0, 100, 0, "both the output height and width"),
        (files["small"], 2.0, -5, 100, "whole pixels >= 0"),
    ]
    for upload, scale, out_h, out_w, want in cases:
        status, message = _call(client, upload, scale, out_h, out_w)
        assert status == "error" and re.search(want, message), (want, message)
        assert not LEAK.search(message), message
    # an upload over --max_file_mb (gradio_client refuses it before sending, naming the
    # client's own file; the server's answer to the page)
    with open(files["huge"], "rb") as f:
        r = httpx.post(server.api + "/upload", files={"files": ("huge.png", f, "image/png")},
                       timeout=30)
    assert r.status_code == 413 and not LEAK.search(r.text), r.text
    print(f"\nupload over the limit: {r.status_code} {r.text}")
    # the REST route that would skip the queue is closed
    r = httpx.post(server.api + "/run/upscale", json={"data": [None, 2.0, 0, 0]}, timeout=30)
    assert r.status_code == 404 and not LEAK.search(r.text), r.text
    assert "Traceback" not in server.text()
