"""Training guards: divergence stops at the first non-finite step (or skips it, opt-in),
metrics stay strict JSON, grain workers die with their parent, a bad training image is
skipped without looping on resume, and invalid config values are refused up front,
naming the field, with distinct exit codes.

Parts that start processes or train are marked `slow`.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np
import pytest

from msit_jax import errors
from msit_jax.training import train_and_evaluate
from msit_jax.training.checkpoints import load_workdir_model
from msit_jax.training.config import validate_config
from msit_jax.training.metrics import MetricLogger
from tests.conftest import (assert_one_line_error, assert_trees_equal, flat, load_config,
                            popen_tiny_train, run_python, save_img, strict_json_lines,
                            wait_for_steps)


# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_divergence_stops_at_the_first_non_finite_step(tmp_path):
    cfg = load_config()
    cfg.lr.base = 1e3
    cfg.total_steps = 8
    wd = str(tmp_path / "run")
    with pytest.raises(errors.NonFiniteError) as e:
        train_and_evaluate(cfg, wd)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("step 2: non-finite loss")
    assert "Last good checkpoint: step 2" not in msg  # step 2 itself is never saved
    assert "lr.base (now 1000)" in msg and "skip_nonfinite_steps" in msg
    assert errors.exit_code_for(e.value) == errors.EXIT_NONFINITE
    recs = strict_json_lines(os.path.join(wd, "metrics.jsonl"))  # valid JSON, no bare NaN
    assert [r["step"] for r in recs] == [1]
    assert not os.listdir(os.path.join(wd, "checkpoints"))  # nothing (non-finite) saved
    # opt-in: skip such steps (no update), stopping after N in a row
    cfg.skip_nonfinite_steps = 2
    wd2 = str(tmp_path / "skip")
    with pytest.raises(errors.NonFiniteError, match="3 non-finite steps in a row"):
        train_and_evaluate(cfg, wd2)
    recs = strict_json_lines(os.path.join(wd2, "metrics.jsonl"))
    assert [r["loss"] for r in recs][1:] == [None, None]  # skipped steps: null, not NaN
    assert all(r.get("skipped_steps") == 1 for r in recs[1:])
    _, v = load_workdir_model(wd2, "latest")  # step 2 (skipped: unchanged) saved finite
    assert all(np.isfinite(x).all() for x in flat(v).values())


@pytest.mark.slow
def test_skipped_step_changes_nothing_but_the_counter():
    from msit_jax.data.protocol import Batch, Protocol
    from msit_jax.data.pipeline import host_dataset
    from msit_jax.data.sources import EmbeddedSource
    from msit_jax.models.model import build_model, dummy_inputs
    from msit_jax.training.state import create_state, init_variables, make_optimizer
    from msit_jax.training.step import jit_train_step, make_mesh, NONFINITE_LOSS

    cfg = load_config()
    cfg.lr.base, cfg.total_steps = 1e3, 8  # test_04's config: its compiled step is reused
    model = build_model(cfg.model)
    tx, schedule = make_optimizer(cfg)
    d = cfg.data
    v = init_variables(model, jax.random.PRNGKey(0), dummy_inputs(cfg.model, (d.inp_size, d.inp_size),
                                                                  d.sample_q))
    step = jit_train_step(model, tx, schedule, make_mesh(), skip_nonfinite=True)
    batch = next(iter(host_dataset(EmbeddedSource("train"), Protocol(
        d.inp_size, d.sample_q, radius=cfg.model.radius), global_batch=cfg.batch_size, seed=0,
        total_steps=2)))
    state = create_state(v, tx)
    before = jax.device_get(state)
    bad = dict(batch, inp=np.full_like(batch["inp"], np.nan))
    s1, m1 = step(create_state(v, tx), Batch.from_flat(bad))
    assert int(m1["nonfinite"]) & NONFINITE_LOSS and int(s1.step) == 1
    for k in ("params", "batch_stats", "opt_state"):
        assert_trees_equal(getattr(s1, k), getattr(before, k))
    s2, m2 = step(s1, Batch.from_flat(batch))
    assert int(m2["nonfinite"]) == 0 and int(s2.step) == 2
    assert any(not np.array_equal(a, b) for a, b in
               zip(flat(s2.params).values(), flat(before.params).values()))


def test_metrics_files_stay_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": NaN}\n'
                    '{"step": 2, "split": "train", "loss": 0.5}\n{"step": 3, "spl')  # cut short
    logger = MetricLogger(str(tmp_path), resume_step=2, tensorboard=False)
    logger.write(3, "train", {"loss": float("inf"), "lr": 1e-4})
    recs = strict_json_lines(str(path))
    assert recs == [{"step": 1, "split": "train", "loss": None},
                    {"step": 2, "split": "train", "loss": 0.5},
                    {"step": 3, "split": "train", "loss": None, "lr": 1e-4}]


# ----------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
def test_grain_workers_die_with_their_parent(tmp_path):
    wd = str(tmp_path / "run")
    p = popen_tiny_train(wd, "--config.data.num_workers=2")
    wait_for_steps(wd, 2, p)
    kids = _children(p.pid)
    assert len(kids) >= 2, kids  # the grain workers (and multiprocessing's helpers)
    p.kill()  # kill -9: no handler runs in the parent
    p.wait(timeout=30)
    t0 = time.time()
    while any(_alive(k) for k in kids) and time.time() - t0 < 15:
        time.sleep(0.2)
    assert not [k for k in kids if _alive(k)], "orphaned processes survived their parent"
    assert time.time() - t0 < 15


# ----------------------------------------------------------------------------

def _truncated_png(path: str, h: int = 40, w: int = 48) -> str:
    save_img(path, h, w, seed=99)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])  # valid header, truncated body
    return str(path)


@pytest.fixture
def folder_with_truncated(tmp_path):
    d = tmp_path / "hr"
    d.mkdir()
    for i in range(5):
        save_img(d / f"{i}.png", 36 + 2 * i, 44, seed=i)
    _truncated_png(str(d / "2_truncated.png"))
    return d


def test_skip_bad_images_decodes_each_image_once_up_front(folder_with_truncated, tmp_path,
                                                          monkeypatch):
    from msit_jax.data import sources

    cache = str(tmp_path / "checked.json")
    src = sources.FolderSource(str(folder_with_truncated), min_side=12, skip_bad=True,
                               check_cache=cache)
    assert len(src) == 5 and len(src.skipped) == 1 and "2_truncated.png" in src.skipped[0]
    calls = []
    real = sources.read_image
    monkeypatch.setattr(sources, "read_image", lambda p: calls.append(p) or real(p))
    again = sources.FolderSource(str(folder_with_truncated), min_side=12, skip_bad=True,
                                 check_cache=cache)
    assert calls == [] and again.files == src.files  # verdicts cached: nothing decoded again
    os.utime(folder_with_truncated / "0.png", ns=(1, 1))  # a changed file is checked again
    sources.FolderSource(str(folder_with_truncated), min_side=12, skip_bad=True,
                         check_cache=cache)
    assert [os.path.basename(c) for c in calls] == ["0.png"]
    # without skip_bad_images the header check cannot see the truncated body
    assert len(sources.FolderSource(str(folder_with_truncated), min_side=12)) == 6


@pytest.mark.slow
def test_bad_image_found_in_training_is_skipped_and_resume_does_not_loop(
        folder_with_truncated, tmp_path, caplog):
    cfg = load_config()
    cfg.data.train.update(kind="folder", path=str(folder_with_truncated))
    with caplog.at_level(logging.WARNING, logger="msit_jax"):
        full = train_and_evaluate(cfg, str(tmp_path / "full"))
    assert full.step == cfg.total_steps
    warned = [r.getMessage() for r in caplog.records if "2_truncated.png" in r.getMessage()]
    assert warned and "skipping a bad training image" in warned[0]
    wd = str(tmp_path / "resumed")
    train_and_evaluate(cfg, wd, stop_after_step=3)  # "killed" after the bad image was met
    res = train_and_evaluate(cfg, wd)  # the same replacement: no crash, no loop
    assert_trees_equal(res.state, full.state)


# ----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,needle", [
    ("data.scale_min", 0.5, "data.scale_min=0.5 must be a finite number >= 1"),
    ("data.scale_max", 0.9, "data.scale_max=0.9"),
    ("data.sample_q", 10_000, "data.sample_q=10000"),
    ("lr.base", float("nan"), "lr.base=nan"),
    ("eval.scales", (2.0, float("inf")), "eval.scales"),
    ("checkpoint.keep", 0, "checkpoint.keep=0"),
    ("model.heads", 0, "model.heads=0 must be a positive integer"),
    ("runtime.dtype", "float16", "runtime dtype='float16'"),
    ("data.train.kind", "csv", "data.train.kind='csv'")])
def test_invalid_values_are_rejected_up_front_naming_the_field(field, value, needle):
    cfg = load_config()
    *parents, leaf = field.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(errors.ConfigError) as e:
        validate_config(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_fields_are_rejected():
    cfg = load_config()
    cfg.unlock()
    cfg.nosuch = 1
    with pytest.raises(errors.ConfigError, match="unknown config field 'nosuch'"):
        validate_config(cfg)


@pytest.mark.slow
def test_train_cli_errors_are_one_line_with_distinct_codes(tmp_path):
    wd = str(tmp_path / "never")
    p = run_python(["train.py", "--config", "configs/tiny.py", "--workdir", wd,
             "--config.data.scale_min=0.5"])
    assert p.returncode == errors.EXIT_CONFIG
    assert_one_line_error(p.stderr, "data.scale_min=0.5")
    assert not os.path.exists(wd)  # rejected before the workdir is created
    p = run_python(["train.py", "--config", "configs/tiny.py", "--workdir", wd, "--config.nosuch=1"])
    assert p.returncode == errors.EXIT_CONFIG
    assert_one_line_error(p.stderr, "unknown config field 'nosuch'")
    missing = str(tmp_path / "no_images")
    args = ["train.py", "--config", "configs/tiny.py", "--workdir", wd,
            "--config.data.train.kind=folder", f"--config.data.train.path={missing}"]
    p = run_python(args)
    assert p.returncode == errors.EXIT_INPUT
    assert_one_line_error(p.stderr, missing)
    p = run_python(args + ["--verbose"])  # the traceback only on request
    assert p.returncode == errors.EXIT_INPUT and "Traceback" in p.stderr
