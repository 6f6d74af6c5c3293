"""Checkpoints under faults: a corrupt latest step falls back to the newest good one (kept
aside, never deleted), retention never drops the last verified step, a refused config
change on resume writes nothing, and SIGTERM/SIGINT save the current step (the resume
bit-exact).

Parts that start processes or train are marked `slow`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from msit_jax.io import pretrained
from msit_jax import errors
from msit_jax.inference import cli as upscale
from msit_jax.training import train_and_evaluate
from msit_jax.training.checkpoints import (FILES_MANIFEST, REJECTED_DIR, Checkpointer,
                                           load_workdir_model)
from tests.conftest import (assert_one_line_error, assert_trees_equal, copy_run, flat, flip_bytes,
                            largest_file, load_config, popen_tiny_train, run_python, save_img,
                            strict_json_lines, tree_digest, wait_for_steps)


# ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("manifest", [True, False], ids=["file-digests", "value-checksums"])
def test_bit_flipped_latest_checkpoint_falls_back_and_is_kept(tiny_run, tmp_path, caplog,
                                                              manifest):
    """Bytes flipped in the largest file of the latest checkpoint: reported in one line
    naming the step and file (or leaf), resumed from the newest good step (bit-exact to the
    uninterrupted run), the bad step moved aside, never deleted; no non-finite leaf saved."""
    cfg, _, full = tiny_run
    wd = copy_run(tiny_run, tmp_path)
    step4 = os.path.join(wd, "checkpoints", "4")
    if not manifest:  # as if the run died before its read-back: only the record in the step
        os.remove(os.path.join(step4, FILES_MANIFEST))
    target = largest_file(os.path.join(step4, "state"))
    flip_bytes(target)
    with caplog.at_level(logging.WARNING, logger="msit_jax"):
        res = train_and_evaluate(cfg, wd)
    msgs = [r.getMessage() for r in caplog.records if "checkpoint step 4" in r.getMessage()]
    assert msgs and all("\n" not in m for m in msgs)
    if manifest:
        assert os.path.relpath(target, wd) in msgs[0].replace(wd + os.sep, "")
    else:
        assert "leaf" in msgs[0] or "cannot be restored" in msgs[0]
    assert any("resuming from checkpoint step 2" in r.getMessage() for r in caplog.records)
    assert_trees_equal(res.state, full.state)  # steps 3-4 retrained from step 2, bit-exact
    assert os.path.isdir(os.path.join(wd, REJECTED_DIR, "4", "state"))  # kept for inspection
    for step in (2, 4):  # retention kept good, verified, finite checkpoints
        _, v = load_workdir_model(wd, str(step))
        assert all(np.isfinite(x).all() for x in flat(v).values())
        assert os.path.isfile(os.path.join(wd, "checkpoints", str(step), FILES_MANIFEST))


def test_retention_keeps_the_last_verified_checkpoint(tmp_path, caplog):
    """keep=1: a newer step that fails its read-back never pushes out the verified one."""
    ckpt = Checkpointer(str(tmp_path), keep=1, keep_best=False, async_save=False)
    state = {"w": jax.numpy.arange(4.0), "n": jax.numpy.asarray(3)}
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpt.save(1, state, None)
    ckpt.save(2, state, None)   # reads back and verifies step 1
    assert ckpt.last_verified == 1
    flip_bytes(largest_file(os.path.join(ckpt.step_dir(2), "state")))
    with caplog.at_level(logging.ERROR, logger="msit_jax"):
        ckpt.save(3, state, None)  # step 2 fails its read-back: step 1 stays protected
    assert any("checkpoint step 2" in r.getMessage() for r in caplog.records)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 3] and ckpt.last_verified == 3
    restored, _ = ckpt.restore(1, abstract, with_data=False)
    assert_trees_equal(restored, state)
    # and nothing non-finite is ever saved
    with pytest.raises(errors.NonFiniteError, match="refusing to save step 4"):
        ckpt.save(4, {"w": jax.numpy.asarray([1.0, np.nan]), "n": state["n"]}, None)
    assert ckpt.all_steps() == [1, 3]
    ckpt.close()


# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_architecture_change_on_resume_is_refused_before_any_write(tiny_run, tmp_path):
    wd = copy_run(tiny_run, tmp_path)
    before = tree_digest(wd)
    p = run_python(["train.py", "--config", "configs/tiny.py", "--workdir", wd,
             "--config.model.dim=64"])
    assert p.returncode == errors.EXIT_CONFIG
    assert_one_line_error(p.stderr, "model.dim: 16 -> 64", "refused", "nothing was written")
    assert tree_digest(wd) == before  # config.json, model_config.json, checkpoints untouched
    # the run's model still loads for inference (the probe's `cannot reshape`)
    out = str(tmp_path / "o.png")
    save_img(tmp_path / "i.png", 14, 12)
    assert upscale.main([str(tmp_path / "i.png"), "--checkpoint", wd, "--scale", "2", "-o", out,
                         "--noprogress"]) == 0


@pytest.mark.slow
def test_allowed_changes_are_printed_and_appended_never_overwritten(tiny_run, tmp_path,
                                                                    caplog):
    cfg, _, _ = tiny_run
    wd = copy_run(tiny_run, tmp_path)
    with open(os.path.join(wd, "config.json")) as f:
        original = f.read()
    cfg = load_config()
    cfg.lr.base = 2e-5             # allowed: printed
    cfg.runtime.precision = "high"  # execution option: free
    cfg.data.scale_max = 3.0       # batch protocol: refused ...
    with pytest.raises(errors.ConfigError, match=r"data\.scale_max: 4\.0 -> 3\.0"):
        train_and_evaluate(cfg, wd)
    cfg.data.scale_max = 4.0
    cfg.model.bn_momentum = 0.2    # ... and an architecture change needs allow_config_change
    with pytest.raises(errors.ConfigError, match="allow_config_change"):
        train_and_evaluate(cfg, wd)
    cfg.allow_config_change = True  # the same parameter shapes: allowed when explicit
    with caplog.at_level(logging.WARNING, logger="msit_jax"):
        train_and_evaluate(cfg, wd)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "lr.base: 1e-05 -> 2e-05 (allowed)" in logged
    assert "runtime.precision" in logged and "model.bn_momentum: 0.1 -> 0.2" in logged
    with open(os.path.join(wd, "config.json")) as f:
        assert f.read() == original  # the run's first config, never overwritten
    hist = strict_json_lines(os.path.join(wd, "config_history.jsonl"))
    assert len(hist) == 2 and hist[0]["changes"] == [] and hist[1]["step"] == 4
    changed = {c["field"] for c in hist[1]["changes"]}
    assert {"lr.base", "runtime.precision", "model.bn_momentum"} <= changed
    assert hist[1]["config"]["lr"]["base"] == 2e-5
    mcfg, _ = pretrained.load(wd)  # the allowed model change reached model_config.json
    assert mcfg.bn_momentum == 0.2


# ----------------------------------------------------------------------------

def _break_missing_manifest(step_dir):
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _break_missing_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _break_truncated_data(step_dir):
    f = largest_file(os.path.join(step_dir, "state"))
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 3)


def _break_missing_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


@pytest.mark.slow
@pytest.mark.parametrize("damage,needle", [
    (_break_missing_manifest, "manifest.ocdbt is missing"),
    (_break_missing_metadata, "_METADATA is missing"),
    (_break_truncated_data, "differs from its recorded checksum"),
    (_break_missing_state, "state/ is missing")])
def test_corrupt_latest_checkpoint_falls_back_in_one_line(tiny_run, tmp_path, caplog, capfd,
                                                          damage, needle):
    cfg, _, full = tiny_run
    wd = copy_run(tiny_run, tmp_path)
    damage(os.path.join(wd, "checkpoints", "4"))
    # pretrained.load of the workdir falls back too (read-only: nothing moved)
    with caplog.at_level(logging.WARNING, logger="msit_jax"):
        _, v = pretrained.load(wd)
    assert any(needle in r.getMessage() and "checkpoint step 4" in r.getMessage()
               for r in caplog.records)
    _, v2 = load_workdir_model(wd, "2")
    assert_trees_equal(v, v2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="msit_jax"):
        res = train_and_evaluate(cfg, wd)
    lines = [r.getMessage() for r in caplog.records if "checkpoint step 4" in r.getMessage()]
    assert lines and needle in lines[0] and all("\n" not in m for m in lines)
    assert_trees_equal(res.state, full.state)
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("\n") < 20  # no asyncio traceback storm


# ----------------------------------------------------------------------------



@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    wd = str(tmp_path / "run")
    p = popen_tiny_train(wd)
    wait_for_steps(wd, 3, p)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert time.time() - t0 < 25  # preemption_grace_s: Cloud TPU gives ~30 s
    assert p.returncode == 128 + signal.SIGTERM
    line = assert_one_line_error(err, "interrupted by SIGTERM at step")
    step = int(line.split("at step ")[1].split(":")[0])
    assert step >= 3 and os.listdir(os.path.join(wd, "checkpoints")) == [str(step)]
    assert os.path.isfile(os.path.join(wd, "checkpoints", str(step), FILES_MANIFEST))
    _, v = load_workdir_model(wd, "latest")  # verified on load
    assert all(np.isfinite(x).all() for x in flat(v).values())


@pytest.mark.slow
def test_sigint_saves_and_the_resume_is_bit_exact(tiny_run, tmp_path, monkeypatch):
    """Ctrl-C after step 3 (sent from inside the loop): step 3 is saved, TrainingInterrupted
    is raised, the handlers are restored, and resuming ends bit-identical."""
    from msit_jax.training import loop

    cfg, _, full = tiny_run
    real = loop.jit_train_step

    def signalling(*a, **kw):
        fn = real(*a, **kw)

        def step(state, batch):
            out = fn(state, batch)
            if int(out[0].step) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return out

        return step

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(loop, "jit_train_step", signalling)
    wd = str(tmp_path / "run")
    with pytest.raises(errors.TrainingInterrupted) as e:
        train_and_evaluate(cfg, wd)
    assert e.value.step == 3 and e.value.exit_code == 130 and "\n" not in str(e.value)
    assert signal.getsignal(signal.SIGINT) is before
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "3"]
    monkeypatch.setattr(loop, "jit_train_step", real)
    res = train_and_evaluate(cfg, wd)
    assert res.step == 4
    assert_trees_equal(res.state, full.state)
