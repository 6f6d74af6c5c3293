"""One trainer per workdir; readers never see a half-written step; a tampered
model_config.json is a checkpoint error naming the file (issue 21).

The lock is `msit_jax.training.lock`; the readers are `msit_jax.io.workdir`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path.atomicity_types import TMP_DIR_SUFFIX

from msit_jax import errors, tiny_model_config

from msit_jax.inference import cli as upscale
from msit_jax.io import model_dir as mdir
from msit_jax.io.workdir import CheckpointReader, leaf_records, load_workdir_model, saved_steps
from msit_jax.models.random_init import random_variables
from msit_jax.training import loop, train_and_evaluate
from msit_jax.training.checkpoints import Checkpointer
from msit_jax.training.lock import LOCK_FILE, WorkdirLock, lock_path
from tests.conftest import load_config, tree_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


# ---------------------------------------------------------------------------- the lock

def test_lock_is_exclusive_names_its_holder_and_is_removed_on_release(tmp_path):
    wd = str(tmp_path)
    with WorkdirLock(wd) as held:
        assert held.held and held.path == os.path.join(wd, LOCK_FILE)
        record = json.loads(open(held.path).read())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(errors.WorkdirBusy) as e:  # another open file: flock refuses
            WorkdirLock(wd).acquire()
        msg = str(e.value)
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in msg and "\n" not in msg
        assert errors.exit_code_for(e.value) == errors.EXIT_BUSY == 9
        assert "nothing was written" in msg
    assert not os.path.exists(os.path.join(wd, LOCK_FILE))  # released: the file is gone
    assert lock_path(wd, 3) == os.path.join(wd, ".lock.process-3")
    with WorkdirLock(wd, 3), WorkdirLock(wd, 0):  # processes of one run never contend
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """kill -9 of the holder: the kernel drops its flock; the file it leaves behind (its
    record) is taken over at once."""
    path = os.path.join(str(tmp_path), LOCK_FILE)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({path!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, ('{\"pid\": %d, \"host\": \"h\"}' % os.getpid()).encode())\n"
         "print('locked', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(errors.WorkdirBusy, match=f"PID {holder.pid} on host h"):
            WorkdirLock(str(tmp_path)).acquire()
        holder.kill()
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert os.path.exists(path)  # the dead holder's record stays ...
    with WorkdirLock(str(tmp_path)) as lk:  # ... and is no lock at all
        assert json.loads(open(lk.path).read())["pid"] == os.getpid()


def test_training_refuses_a_locked_workdir_before_reading_or_writing(tmp_path):
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    with open(os.path.join(wd, "config.json"), "w") as f:
        f.write("{}")  # would be compared (and the run refused) if it were read
    with WorkdirLock(wd):
        before = tree_digest(wd)
        t0 = time.perf_counter()
        with pytest.raises(errors.WorkdirBusy, match=f"PID {os.getpid()}"):
            train_and_evaluate(load_config(), wd)
        assert time.perf_counter() - t0 < 5
        assert tree_digest(wd) == before
    assert os.listdir(wd) == ["config.json"]


# ---------------------------------------------------------------------------- readers

@pytest.fixture(scope="module")
def small_workdir(tmp_path_factory):
    """A workdir as training leaves it, without training: model_config.json,
    config_history.jsonl and two verified checkpoints of a tiny model's variables."""
    wd = str(tmp_path_factory.mktemp("small") / "run")
    cfg = tiny_model_config()
    ckpt = Checkpointer(wd, keep=3, keep_best=False, async_save=False)
    for step in (2, 4):
        v = random_variables(cfg, step)
        ckpt.save(step, {"step": jax.numpy.asarray(step, jax.numpy.int32), **v}, None)
    ckpt.wait()
    ckpt.close()
    with open(os.path.join(wd, "model_config.json"), "w") as f:
        f.write(mdir.config_to_json(cfg))
    with open(os.path.join(wd, "config_history.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "changes": [], "config": {"model": cfg.to_dict()}}) + "\n")
    return wd, cfg


def copy_of(small_workdir, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(small_workdir[0], dst)
    return dst


@pytest.mark.slow  # Orbax saves and restores: seconds
def test_readers_ignore_a_step_orbax_is_still_writing(small_workdir, tmp_path, caplog):
    """Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete:
    a reader without the lock lists, loads and falls back over finished steps only."""
    wd = copy_of(small_workdir, tmp_path)
    ckdir = os.path.join(wd, "checkpoints")
    partial = os.path.join(ckdir, "6" + TMP_DIR_SUFFIX)
    shutil.copytree(os.path.join(ckdir, "4"), partial)
    for name in ("_CHECKPOINT_METADATA", "files.sha256.json"):
        os.remove(os.path.join(partial, name))
    shutil.rmtree(os.path.join(partial, "state", "d"))  # half the array data
    assert saved_steps(wd) == [2, 4]
    reader = CheckpointReader(wd)
    assert reader.all_steps() == [2, 4] and reader.latest_step() == 4
    reader.close()
    with caplog.at_level(logging.WARNING, logger="msit_jax"):
        _, v = load_workdir_model(wd, "latest")
    assert not [r for r in caplog.records if "step 6" in r.getMessage()]
    want = random_variables(small_workdir[1], 4)
    assert leaf_records(v) == leaf_records(jax.tree_util.tree_map(np.asarray, want))
    assert os.path.isdir(partial)  # a reader never cleans up a writer's files


@pytest.mark.slow
@pytest.mark.parametrize("record", [True, False], ids=["checked-before-restore",
                                                       "no-integrity-record"])
def test_tampered_model_config_is_a_checkpoint_error_naming_the_file(small_workdir, tmp_path,
                                                                     capsys, record):
    wd = copy_of(small_workdir, tmp_path)
    path = os.path.join(wd, "model_config.json")
    data = json.load(open(path))
    data["dim"] = data["dim"] * 2
    json.dump(data, open(path, "w"))
    if not record:  # a checkpoint written before integrity records: checked after restoring
        for step in (2, 4):
            shutil.rmtree(os.path.join(wd, "checkpoints", str(step), "integrity"))
            os.remove(os.path.join(wd, "checkpoints", str(step), "files.sha256.json"))
    with pytest.raises(errors.CheckpointError) as e:
        load_workdir_model(wd)
    msg = str(e.value)
    assert msg.startswith(f"{path} does not match checkpoint step 4") and "\n" not in msg
    assert "shape mismatch" in msg
    if record:
        assert f"dim: {data['dim'] // 2} in config_history.jsonl, {data['dim']} in the file" in msg
    img = str(tmp_path / "in.png")
    from PIL import Image

    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(img)
    rc = upscale.main([img, "--checkpoint", wd, "--scale", "2", "-o", str(tmp_path / "o.png"),
                       "--noprogress"])
    assert rc == errors.EXIT_CHECKPOINT
    err = capsys.readouterr().err
    assert f"error: {path} does not match" in err and "Traceback" not in err
    assert "cannot reshape" not in err


# ---------------------------------------------------------------------------- two trainers

_LONE: dict = {}


def lone_tiny_run(tmp_path_factory) -> tuple:
    """(TrainResult, workdir) of an uninterrupted configs/tiny.py run, trained once per
    session (test_training_faults uses it too); copy the workdir before changing it."""
    if not _LONE:
        wd = str(tmp_path_factory.mktemp("lone") / "run")
        _LONE["run"] = (train_and_evaluate(load_config(), wd), wd)
    return _LONE["run"]


@pytest.fixture
def lone_run(tmp_path_factory):
    return lone_tiny_run(tmp_path_factory)[0]


@pytest.mark.slow
def test_second_trainer_exits_at_once_and_the_first_ends_as_a_lone_run(lone_run, tmp_path,
                                                                       monkeypatch):
    """`train.py` on a workdir another run is training in: rc 9 with one line naming the
    holder's PID and host, in seconds, nothing written; the first run is undisturbed
    (its final params and Adam state are bit-identical to a lone run's)."""
    wd = str(tmp_path / "run")
    second: dict = {}
    real = loop.jit_train_step

    def with_a_second_trainer(*a, **kw):
        fn = real(*a, **kw)

        def step(state, batch):
            if not second:  # the first run holds the lock and has written its files
                second["before"] = tree_digest(wd)
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py",
                                    "--workdir", wd], cwd=REPO, env=_env(),
                                   capture_output=True, text=True, timeout=120)
                second.update(rc=p.returncode, err=p.stderr, s=time.perf_counter() - t0,
                              after=tree_digest(wd))
            return fn(state, batch)

        return step

    monkeypatch.setattr(loop, "jit_train_step", with_a_second_trainer)
    res = train_and_evaluate(load_config(), wd)
    assert second["rc"] == errors.EXIT_BUSY, second["err"][-3000:]
    lines = [ln for ln in second["err"].splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in second["err"]
    assert f"locked by PID {os.getpid()} on host {socket.gethostname()}" in lines[0]
    assert second["s"] < 30, second["s"]  # imports included
    assert second["after"] == second["before"]  # not a byte written
    print(f"second trainer exited in {second['s']:.1f} s (imports included)")
    assert res.step == 4
    assert leaf_records(res.state) == leaf_records(lone_run.state)
    assert not os.path.exists(os.path.join(wd, LOCK_FILE))


def test_lock_is_released_when_training_fails(tmp_path):
    """An error inside the locked part of a run releases the lock."""
    wd = str(tmp_path / "run")
    cfg = load_config()
    cfg.init_from = str(tmp_path / "missing")
    with pytest.raises(errors.ConfigError, match="init_from"):
        train_and_evaluate(cfg, wd)
    assert not os.path.exists(os.path.join(wd, LOCK_FILE))
    WorkdirLock(wd).acquire().release()
