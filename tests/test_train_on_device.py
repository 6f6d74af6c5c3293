"""benchmarks.train_on_device without training: the plan (budget -> total_steps, the
warm-up, the deadlines), the worker choice, the probes that time the loop's input
pipeline, the JSON schema, and --pack. The whole command (calibration, run,
evaluation) needs minutes even tiny on CPU: run it by hand, as its docstring says
(`--allow_cpu --tiny --minutes 3`)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from benchmarks import train_on_device as tod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(**kw):
    import argparse

    base = dict(tiny=False, batch=None, data="291", data_root="/nowhere",
                cache_root="/tmp/msit-tod-cache")
    base.update(kw)
    return argparse.Namespace(**base)


def test_choose_workers_leaves_cpus_to_the_training_process():
    assert tod.choose_workers(16) == (12, 1)  # the lent H100/H200 host
    assert tod.choose_workers(8) == (4, 1)
    assert tod.choose_workers(64) == (12, 1)
    assert tod.choose_workers(2) == (0, 1) and tod.choose_workers(1) == (0, 1)
    assert tod.choose_workers(0) == (0, 1)


def test_deadlines_order_and_reserves():
    dl = tod.deadlines(420.0, eval_reserve_s=30.0, save_reserve_s=30.0, exit_margin_s=15.0)
    assert (dl.train_stop, dl.eval_stop, dl.hard) == (345.0, 405.0, 412.5)
    assert dl.train_stop < dl.eval_stop < dl.hard < dl.budget_s


def test_plan_fits_the_schedule_before_the_training_deadline():
    dl = tod.deadlines(420.0, 30.0, 30.0, 15.0)
    plan = tod.plan_steps(now_s=100.0, dl=dl, steps_per_s=10.0, setup_s=10.0, compile_s=40.0,
                          safety=0.95)
    assert plan["train_s_available"] == pytest.approx(195.0)
    assert plan["total_steps"] == math.floor(195.0 * 10.0 * 0.95) == 1852
    assert plan["warmup_steps"] == 185  # fit_warmup: total // 10
    assert plan["expected_end_s"] <= dl.train_stop
    assert not plan["clamped_to_min_steps"]
    # no time left: the minimum, flagged (the deadline then stops it, saved)
    late = tod.plan_steps(now_s=400.0, dl=dl, steps_per_s=10.0, setup_s=10.0, compile_s=40.0)
    assert late["total_steps"] == 10 and late["clamped_to_min_steps"]


@pytest.mark.parametrize("total", [10, 11, 99, 1852, 123_457])
def test_fitted_warmup_is_fit_warmups_and_the_config_validates(total):
    from msit_jax.training.config import fit_warmup, validate_config

    # the paper's 50k-step warm-up, clipped to total // 10 when not shorter than the run
    want = total // 10 if total <= 50_000 else 50_000
    assert tod.fitted_warmup(total) == want
    cfg = tod.train_config(args(), tod.SIZES["paper"], (12, 1), total)
    assert cfg.lr.warmup_steps == want and cfg.lr.epoch_steps == 0
    fitted, warning = fit_warmup(cfg)
    assert warning is None and fitted.lr.warmup_steps == cfg.lr.warmup_steps
    validate_config(cfg)


def test_train_config_is_the_paper_stage1_recipe():
    from msit_jax.training.config import paper_config

    cfg = tod.train_config(args(), tod.SIZES["paper"], (12, 1), 1000)
    ref = paper_config("edsr-baseline", stage=1)
    assert cfg.model.to_dict() == ref.model.to_dict()
    assert cfg.model.conv == "plain"
    assert (cfg.batch_size, cfg.data.inp_size, cfg.data.sample_q) == (32, 48, 2304)
    assert (cfg.data.scale_min, cfg.data.scale_max) == (1.0, 4.0)
    assert (cfg.lr.base, cfg.lr.multiplier) == (ref.lr.base, ref.lr.multiplier)
    assert cfg.data.train.kind == "named" and cfg.data.train.name == "291"
    assert cfg.data.train.skip_bad_images and cfg.data.train.cache_dir.endswith("npy")
    assert (cfg.data.num_workers, cfg.data.num_threads) == (12, 1)
    assert cfg.eval.every_steps == 0 and not cfg.demo.enabled
    folder = tod.train_config(args(data=REPO), tod.SIZES["paper"], (0, 1), 1000)
    assert folder.data.train.kind == "folder" and folder.data.train.path == REPO
    assert tod.train_config(args(batch=16), tod.SIZES["paper"], (0, 1), 10).batch_size == 16


def test_eval_reserve_prefers_the_warm_measurement():
    assert tod.eval_reserve(100.0, 10.0, minimum=20.0, default=120.0) == 20.0
    assert tod.eval_reserve(100.0, 40.0, minimum=20.0, default=120.0) == 60.0
    assert tod.eval_reserve(100.0, None, minimum=20.0, default=120.0) == 150.0
    assert tod.eval_reserve(None, None, minimum=20.0, default=120.0) == 120.0


def test_logged_rate_leaves_out_the_compiling_step_and_earlier_runs():
    hist = [{"step": 100, "steps_per_sec": 50.0}, {"step": 200, "steps_per_sec": 10.0},
            {"step": 300, "steps_per_sec": 20.0}, {"step": 310, "steps_per_sec": None}]
    assert tod.logged_rate(hist, 0) == (99 + 100 + 100, 99 / 50 + 100 / 10 + 100 / 20)
    assert tod.logged_rate(hist, 200) == (99, 99 / 20)  # a resumed run's own windows
    thr = tod.throughput(100, 10.0, 32, 2304)
    assert thr["steps_per_s"] == 10.0 and thr["samples_per_s"] == 320.0
    assert thr["queries_per_s"] == 320.0 * 2304


class FakeArray:
    def __init__(self, ready: bool):
        self.ready = ready

    def is_ready(self) -> bool:
        return self.ready


class FakeIterator:
    def __init__(self):
        self.state, self.closed = 0, False

    def __next__(self):
        self.state += 1
        return {"step": self.state}

    def get_state(self):
        return {"n": self.state}

    def set_state(self, s):
        self.state = s["n"]

    def close(self):
        self.closed = True


class FakeDataset:
    def __iter__(self):
        return FakeIterator()


def test_probe_classifies_data_waits_and_keeps_the_iterator_protocol():
    probe = tod.Probe()
    it = iter(probe.wrap_dataset(FakeDataset()))
    step = probe.wrap_step(lambda state, batch: (state + 1, {"loss": FakeArray(False)}))
    next(it)                          # start-up: recorded apart
    assert probe.first_next_s is not None and probe.waits == 0
    state, _ = step(0, None)          # the compiling step
    assert probe.calls == 1 and probe.first_call_s is not None
    next(it)                          # device busy before and after: no stall
    assert probe.waits == 1 and probe.stall_s_max == 0.0
    probe.last_metrics = {"loss": FakeArray(True)}
    next(it)                          # device idle when the wait began: all of it a stall
    assert probe.stall_s_min > 0 and probe.stall_s_min == probe.stall_s_max
    it.set_state({"n": 7})
    assert it.get_state() == {"n": 7} and next(it) == {"step": 8}
    it.close()
    assert it.it.closed
    figs = probe.pipeline_figures(10.0)
    assert figs["waits"] == 3 and 0 <= figs["data_wait_fraction"] < 1
    assert figs["method"].startswith("in-loop")


def test_probe_ends_the_calibration_without_dispatching(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "block_until_ready", lambda x: x)
    probe = tod.Probe(stop_after_s=0.0)
    calls = []
    step = probe.wrap_step(lambda s, b: (calls.append(s) or s + 1, {"loss": FakeArray(True)}))
    s, _ = step(0, None)
    with pytest.raises(tod.CalibrationDone):
        step(s, None)  # the second call starts the window; 0 s: over at once
    assert calls == [0] and probe.last_state == 1 and probe.t_last_done is not None
    assert probe.compile_s is not None and probe.setup_s is not None


def test_probe_signals_the_loop_once_and_only_inside_it(monkeypatch):
    sent = []
    monkeypatch.setattr(tod.os, "kill", lambda pid, sig: sent.append(sig))
    probe = tod.Probe(deadline=lambda: True)
    probe.signal_stop()               # before the first step: the loop's handlers are not in
    assert sent == []
    step = probe.wrap_step(lambda s, b: (s, {"loss": FakeArray(True)}))
    step(0, None)
    step(0, None)                     # past the deadline: SIGTERM
    step(0, None)
    probe.signal_stop()               # the timer too: still one signal
    assert sent == [tod.signal.SIGTERM]


def test_instrumented_wraps_and_restores_the_loop():
    from msit_jax.training import loop

    before = (loop.train_dataset, loop.jit_train_step)
    with tod.instrumented(tod.Probe()):
        assert loop.train_dataset is not before[0] and loop.jit_train_step is not before[1]
    assert (loop.train_dataset, loop.jit_train_step) == before


def filled_result() -> dict:
    out = tod.Output("/dev/null")
    res = out.res
    res["meta"] = {k: "x" for k in tod.META_KEYS}
    res["training"] = {k: 1 for k in tod.TRAINING_KEYS}
    res["data"] = {"num_workers": 12, "num_threads": 1}
    res["input_pipeline"] = {"method": "in-loop"}
    return res


def test_schema_check_and_json_writing(tmp_path):
    assert tod.check_schema(filled_result()) == []
    fresh = tod.Output(str(tmp_path / "a.json")).res
    missing = tod.check_schema(fresh)
    assert any(m.startswith("meta.device_kind") for m in missing)
    assert any(m.startswith("data.num_workers") for m in missing)
    out = tod.Output(str(tmp_path / "sub" / "r.json"))
    out.res.update(filled_result())
    out.res["training"]["final_loss"] = float("nan")
    out.res["training"]["steps_per_s"] = np.float32(2.5)
    out.write("completed", tod.EXIT_OK)
    back = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert back["status"] == "completed" and back["exit_code"] == 0
    assert back["training"]["final_loss"] == "nan" and back["training"]["steps_per_s"] == 2.5
    assert back["schema"] == tod.SCHEMA and "elapsed_s" in back["budget"]
    assert tod.check_schema(back) == []


def _image(path, seed, size=(40, 56)):
    rng = np.random.RandomState(seed)
    base = rng.rand(size[0] // 8, size[1] // 8, 3)
    img = np.kron(base, np.ones((8, 8, 1))) * 255  # smooth blocks: JPEG-friendly
    Image.fromarray(img.astype(np.uint8)).save(path)


def test_pack_writes_the_named_layout_and_measures_the_cost(tmp_path):
    root = tmp_path / "data"
    for folder, ext, n in (("T91", ".bmp", 2), ("BSD200", ".png", 3), ("Set5", ".png", 1),
                           ("Set14", ".png", 1)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            _image(root / folder / f"im{i}{ext}", seed=i)
    out = tmp_path / "carry"
    rep = tod.pack(str(out), "291", str(root), str(root))
    assert sorted(os.listdir(out / "T91")) == ["im0.jpg", "im1.jpg"]
    assert len(os.listdir(out / "BSD200")) == 3
    assert os.listdir(out / "Set5") == ["im0.png"] and os.listdir(out / "Set14") == ["im0.png"]
    for name in ("t91", "bsd200"):
        s = rep["sets"][name]
        assert s["psnr_min_db"] > 35 and s["packed_bytes"] > 0
    assert rep["quality"] == tod.PACK_QUALITY and rep["chroma"] == "4:4:4"
    assert json.loads((out / "pack.json").read_text())["total_bytes"] == rep["total_bytes"]
    # what the named sets read back: the packed folders
    from msit_jax.data.sources import named_source

    src = named_source("291", data_root=str(out))
    assert len(src) == 5
    assert all(os.path.realpath(str(out)) in src.identity(i) for i in range(5))
    lossless = tod.pack(str(tmp_path / "webp"), "t91", str(root), None, fmt="webp")
    assert lossless["sets"]["t91"]["lossless_images"] == 2
