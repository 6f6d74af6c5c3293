"""Resuming with a changed config: what is refused, what is reported, what is written.

One tiny 4-step run (module fixture) is copied for each case; a resume at its
last step with total_steps unchanged trains nothing, so those cases only
compare configs and write files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from msit_jax import errors
from msit_jax.training import run_config, train_and_evaluate
from msit_jax.training.metrics import read_jsonl
from msit_jax.training.schedule import lr_schedule
from tests.conftest import load_config, tree_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def history(wd: str) -> list[dict]:
    with open(os.path.join(wd, run_config.HISTORY_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("resume") / "run")
    train_and_evaluate(load_config(), wd)
    return wd


@pytest.fixture
def wd(run4, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(run4, dst)
    return dst


def test_protected_fields():
    for f in ("model.dim", "seed", "batch_size", "data.inp_size", "data.sample_q",
              "data.scale_min", "data.scale_max", "data.augment", "data.repeat",
              "data.train.kind", "data.train.first_k", "data.a_field_added_later"):
        assert run_config.is_protected(f), f
    for f in run_config.DATA_FREE + ("lr.base", "total_steps", "eval.every_steps",
                                     "checkpoint.every_steps", "runtime.precision"):
        assert not run_config.is_protected(f), f
    assert [f for f in ("total_steps", "lr.base", "lr.warmup_steps", "lr.epoch_steps",
                        "adam.b1", "batch_size") if run_config.is_schedule(f)] == [
        "total_steps", "lr.base", "lr.warmup_steps", "lr.epoch_steps"]


@pytest.mark.slow
def test_longer_run_reports_the_schedule_change_and_keeps_config_json(wd, caplog):
    with open(os.path.join(wd, "config.json"), "rb") as f:
        first = f.read()
    cfg = load_config()
    cfg.total_steps = 6
    with caplog.at_level(logging.INFO, logger="msit_jax"):
        res = train_and_evaluate(cfg, wd)
    assert res.step == 6
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "config on resume: total_steps: 4 -> 6 (allowed)" in lines
    old, new = lr_schedule(1e-5, 10.0, 2, 4)(4), lr_schedule(1e-5, 10.0, 2, 6)(4)
    note = [ln for ln in lines if "learning-rate schedule changes mid-run" in ln]
    assert note == [
        "the learning-rate schedule changes mid-run at step 4 (total_steps changed): steps "
        "before 4 followed the stored schedule, from 4 on the new one applies (warm-up 2 "
        f"steps, cosine to 0 at step 6); the rate at step 4 goes from {float(old):.3g} to "
        f"{float(new):.3g}"]
    # config.json is the run's first config, byte for byte; the new one is beside it
    with open(os.path.join(wd, "config.json"), "rb") as f:
        assert f.read() == first
    with open(os.path.join(wd, "config.resume-4.json")) as f:
        resumed = json.load(f)
    stored = json.loads(first)
    assert resumed["total_steps"] == 6 and stored["total_steps"] == 4
    assert {**resumed, "total_steps": 4} == stored
    h = history(wd)
    assert [r["step"] for r in h] == [0, 4]
    assert h[1]["changes"] == [{"field": "total_steps", "old": 4, "new": 6}]
    # steps 5 and 6 trained on the new schedule
    train = {r["step"]: r["lr"] for r in read_jsonl(os.path.join(wd, "metrics.jsonl"))
             if r["split"] == "train"}
    sched = lr_schedule(1e-5, 10.0, 2, 6)
    assert train[5] == pytest.approx(float(sched(4)), rel=1e-6)
    assert train[6] == pytest.approx(float(sched(5)), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("field,value,shown", [
    ("data.scale_max", 3.0, "data.scale_max: 4.0 -> 3.0"),
    ("data.inp_size", 16, "data.inp_size: 12 -> 16"),
    ("data.train.first_k", 2, "data.train.first_k: 0 -> 2")])
def test_batch_protocol_change_is_refused_before_any_write(wd, field, value, shown):
    before = tree_digest(wd)
    cfg = load_config()
    *parents, leaf = field.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(errors.ConfigError) as e:
        train_and_evaluate(cfg, wd)
    msg = str(e.value)
    assert shown in msg and "the batch protocol" in msg and "nothing was written" in msg
    assert "allow_config_change" in msg and "\n" not in msg
    assert tree_digest(wd) == before


@pytest.mark.slow
def test_allowed_protocol_change_and_free_fields_are_written_beside_config_json(wd, caplog):
    before = tree_digest(wd)
    cfg = load_config()
    cfg.data.num_threads = 2     # how images are read: free
    cfg.data.scale_max = 3.0     # the batch protocol: only when explicit
    cfg.allow_config_change = True
    with caplog.at_level(logging.WARNING, logger="msit_jax"):
        res = train_and_evaluate(cfg, wd)
    assert res.step == 4  # nothing left to train
    logged = [r.getMessage() for r in caplog.records]
    assert "config on resume: data.num_threads: 0 -> 2 (allowed)" in logged
    assert "config on resume: data.scale_max: 4.0 -> 3.0 (protected)" in logged
    assert not any("learning-rate schedule" in m for m in logged)  # schedule unchanged
    after = tree_digest(wd)
    assert after["config.json"] == before["config.json"]
    assert after["model_config.json"] == before["model_config.json"]
    with open(os.path.join(wd, "config.resume-4.json")) as f:
        resumed = json.load(f)
    assert resumed["data"]["scale_max"] == 3.0 and resumed["allow_config_change"] is True
    # the next resume compares with the config in effect (the last history record)
    cfg = load_config()
    cfg.data.num_threads = 2
    with pytest.raises(errors.ConfigError, match=r"data\.scale_max: 3\.0 -> 4\.0"):
        train_and_evaluate(cfg, wd)


def test_schedule_note_when_the_stored_schedule_cannot_be_rebuilt():
    cfg = load_config()
    cfg.total_steps = 50
    cfg.lr.warmup_steps = 5
    # a stored warm-up of 100 steps in a 50-step run (written before clipping existed)
    note = run_config.schedule_change(cfg, [("lr.warmup_steps", 100, 5)], 10)
    now = float(lr_schedule(1e-5, 10.0, 5, 50)(10))
    assert note.endswith(f"the rate at step 10 goes from unknown to {now:.3g}")
    assert run_config.schedule_change(cfg, [("data.num_threads", 0, 2)], 10) is None


def test_sizes_of_an_encoder_the_run_does_not_use_are_inert(tmp_path):
    """A workdir written before an encoder family was added (its sub-dict absent), or a
    change to an unused family's sizes, is no architecture change; the used family's is."""
    cfg = load_config()
    old = run_config.config_to_dict(cfg)
    del old["model"]["rcan"]  # as written before RCAN existed
    old["model"]["rdn"]["growth"] += 1  # an unused family's size, changed
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert run_config.check_resume(str(tmp_path), cfg, resuming=True) == []
    assert run_config.inert_model_field("model.rcan.n_feats", old["model"])
    assert not run_config.inert_model_field("model.edsr.n_feats", old["model"])
    changed = load_config()
    changed.model.edsr.n_feats += 8  # the family the run uses: refused
    with pytest.raises(errors.ConfigError, match="model.edsr.n_feats"):
        run_config.check_resume(str(tmp_path), changed, resuming=True)
    switched = load_config()
    switched.model.encoder = "rdn"  # a switch makes the rdn sizes count again
    with pytest.raises(errors.ConfigError, match="model.encoder"):
        run_config.check_resume(str(tmp_path), switched, resuming=True)
