"""Nothing lost, nothing silent: the 14 failure cases of issue 10, reproduced.

Each test re-runs one numbered case (data loss 1-3, wrong behaviour 4-14) as
the probe did and asserts the new behaviour: one-line errors naming the file,
flag or field with a distinct exit code (`msit_jax.errors`), no traceback
without --verbose, fallback to the newest good checkpoint, nothing non-finite
saved, nothing overwritten. Parts that start processes or train are marked
`slow` (they run by default; `-m "not slow"` skips them).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from msit_jax.io import model_dir as mdir, pretrained
from msit_jax import errors, images, tiny_model_config, upscale
from msit_jax.eval import cli as evaluate_cli, protocol, reports, runner
from msit_jax.models.random_init import random_variables
from msit_jax.training import train_and_evaluate
from msit_jax.training.checkpoints import (FILES_MANIFEST, REJECTED_DIR, Checkpointer,
                                           load_workdir_model)
from msit_jax.training.config import validate_config
from msit_jax.training.metrics import MetricLogger, read_jsonl
from tests.conftest import load_config, tree_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


# ---------------------------------------------------------------------------- helpers

def run(args, timeout=300, shell_prefix: str = "") -> subprocess.CompletedProcess:
    """python ARGS in the repository (shell_prefix: bash commands run first, e.g. ulimit)."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [PY] + list(args)
    if shell_prefix:
        cmd = ["bash", "-c", f'{shell_prefix} exec "$0" "$@"'] + cmd
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """An `error: ...` line of stderr holds all the needles (the error is that one line;
    per-input failures are followed by a summary line); no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error: ")]
    assert lines, stderr[-3000:]
    hits = [ln for ln in lines if all(n in ln for n in needles)]
    assert hits, (needles, lines)
    return hits[0]


def flat(tree) -> dict[str, np.ndarray]:
    def name(e):
        for a in ("key", "name", "idx"):
            if hasattr(e, a):
                return str(getattr(e, a))
        return str(e)

    return {"/".join(name(e) for e in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def largest_file(root: str) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def flip_bytes(path: str, n: int = 64) -> None:
    b = bytearray(open(path, "rb").read())
    mid = len(b) // 2
    for i in range(mid, min(mid + n, len(b))):
        b[i] ^= 0xFF
    open(path, "wb").write(b)


def strict_json_lines(path: str) -> list[dict]:
    """Parse a JSONL file rejecting NaN/Infinity (what strict JSON readers do)."""
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c} in {path}")

    with open(path) as f:
        return [json.loads(line, parse_constant=bad) for line in f if line.strip()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """An uninterrupted 4-step tiny run (checkpoints at 2 and 4, keep=2)."""
    cfg = load_config()
    wd = str(tmp_path_factory.mktemp("base") / "run")
    res = train_and_evaluate(cfg, wd)
    return cfg, wd, res


def copy_run(base_run, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(base_run[1], dst)
    return dst


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_model_config()
    path = str(tmp_path_factory.mktemp("model") / "tiny")
    mdir.save_model(path, cfg, random_variables(cfg, 0))
    return path, cfg


def save_img(path, h, w, seed=0) -> str:
    rs = np.random.RandomState(seed)
    Image.fromarray(rs.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(path)
    return str(path)


# ---------------------------------------------------------------------------- 1. corrupt latest

@pytest.mark.slow
@pytest.mark.parametrize("manifest", [True, False], ids=["file-digests", "value-checksums"])
def test_01_bit_flipped_latest_checkpoint_falls_back_and_is_kept(base_run, tmp_path, caplog,
                                                                  manifest):
    """Bytes flipped in the largest file of the latest checkpoint: reported in one line
    naming the step and file (or leaf), resumed from the newest good step (bit-exact to the
    uninterrupted run), the bad step moved aside, never deleted; no non-finite leaf saved."""
    cfg, _, full = base_run
    wd = copy_run(base_run, tmp_path)
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


def test_01_retention_keeps_the_last_verified_checkpoint(tmp_path, caplog):
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


# ---------------------------------------------------------------------------- 2. config change

@pytest.mark.slow
def test_02_architecture_change_on_resume_is_refused_before_any_write(base_run, tmp_path):
    wd = copy_run(base_run, tmp_path)
    before = tree_digest(wd)
    p = run(["train.py", "--config", "configs/tiny.py", "--workdir", wd,
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
def test_02_allowed_changes_are_printed_and_appended_never_overwritten(base_run, tmp_path,
                                                                       caplog):
    cfg, _, _ = base_run
    wd = copy_run(base_run, tmp_path)
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


# ---------------------------------------------------------------------------- 3. output over input

def test_03_output_never_overwrites_input_and_existing_needs_overwrite(tmp_path, model_dir,
                                                                       capsys):
    ckpt, _ = model_dir
    src = save_img(tmp_path / "selfin.png", 12, 14)
    before = open(src, "rb").read()
    rc = upscale.main([src, "--checkpoint", ckpt, "--scale", "2", "-o", src, "--noprogress"])
    assert rc == errors.EXIT_OUTPUT
    assert_one_line_error(capsys.readouterr().err, "is the input")
    assert open(src, "rb").read() == before
    # a directory output whose file name collides with an input is caught too
    rc = upscale.main([src, "--checkpoint", ckpt, "--scale", "2", "-o", str(tmp_path),
                       "--noprogress"])
    assert rc == errors.EXIT_OUTPUT and open(src, "rb").read() == before
    capsys.readouterr()
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    rc = upscale.main([src, "--checkpoint", ckpt, "--scale", "2", "-o", str(out),
                       "--noprogress"])
    assert rc == errors.EXIT_OUTPUT and out.read_bytes() == b"precious"
    assert_one_line_error(capsys.readouterr().err, "--overwrite")
    rc = upscale.main([src, "--checkpoint", ckpt, "--scale", "2", "-o", str(out),
                       "--overwrite", "--noprogress"])
    assert rc == 0 and images.read_image(str(out)).shape == (24, 28, 3)


# ---------------------------------------------------------------------------- 4. NaN guard

@pytest.mark.slow
def test_04_divergence_stops_at_the_first_non_finite_step(tmp_path):
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
def test_04_skipped_step_changes_nothing_but_the_counter():
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


def test_04_metrics_files_stay_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": NaN}\n'
                    '{"step": 2, "split": "train", "loss": 0.5}\n{"step": 3, "spl')  # cut short
    logger = MetricLogger(str(tmp_path), resume_step=2, tensorboard=False)
    logger.write(3, "train", {"loss": float("inf"), "lr": 1e-4})
    recs = strict_json_lines(str(path))
    assert recs == [{"step": 1, "split": "train", "loss": None},
                    {"step": 2, "split": "train", "loss": 0.5},
                    {"step": 3, "split": "train", "loss": None, "lr": 1e-4}]


# ---------------------------------------------------------------------------- 5. fallback

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
def test_05_corrupt_latest_checkpoint_falls_back_in_one_line(base_run, tmp_path, caplog, capfd,
                                                              damage, needle):
    cfg, _, full = base_run
    wd = copy_run(base_run, tmp_path)
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


# ---------------------------------------------------------------------------- 6. preemption

def _wait_for_steps(wd: str, n: int, proc, timeout: float = 240.0) -> None:
    path = os.path.join(wd, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if os.path.exists(path) and len(read_jsonl(path)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout} s")


def _popen_train(wd: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([PY, "train.py", "--config", "configs/tiny.py", "--workdir", wd,
                             "--config.total_steps=1000000", "--config.lr.warmup_steps=10",
                             "--config.checkpoint.every_steps=100000", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_06_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    wd = str(tmp_path / "run")
    p = _popen_train(wd)
    _wait_for_steps(wd, 3, p)
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
def test_06_sigint_saves_and_the_resume_is_bit_exact(base_run, tmp_path, monkeypatch):
    """Ctrl-C after step 3 (sent from inside the loop): step 3 is saved, TrainingInterrupted
    is raised, the handlers are restored, and resuming ends bit-identical."""
    from msit_jax.training import loop

    cfg, _, full = base_run
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


# ---------------------------------------------------------------------------- 7. orphaned workers

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
def test_07_grain_workers_die_with_their_parent(tmp_path):
    wd = str(tmp_path / "run")
    p = _popen_train(wd, "--config.data.num_workers=2")
    _wait_for_steps(wd, 2, p)
    kids = _children(p.pid)
    assert len(kids) >= 2, kids  # the grain workers (and multiprocessing's helpers)
    p.kill()  # kill -9: no handler runs in the parent
    p.wait(timeout=30)
    t0 = time.time()
    while any(_alive(k) for k in kids) and time.time() - t0 < 15:
        time.sleep(0.2)
    assert not [k for k in kids if _alive(k)], "orphaned processes survived their parent"
    assert time.time() - t0 < 15


# ---------------------------------------------------------------------------- 8. bad image

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


def test_08_skip_bad_images_decodes_each_image_once_up_front(folder_with_truncated, tmp_path,
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
def test_08_bad_image_found_in_training_is_skipped_and_resume_does_not_loop(
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


# ---------------------------------------------------------------------------- 9. config errors

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
def test_09_invalid_values_are_rejected_up_front_naming_the_field(field, value, needle):
    cfg = load_config()
    *parents, leaf = field.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(errors.ConfigError) as e:
        validate_config(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_09_unknown_fields_are_rejected():
    cfg = load_config()
    cfg.unlock()
    cfg.nosuch = 1
    with pytest.raises(errors.ConfigError, match="unknown config field 'nosuch'"):
        validate_config(cfg)


@pytest.mark.slow
def test_09_train_cli_errors_are_one_line_with_distinct_codes(tmp_path):
    wd = str(tmp_path / "never")
    p = run(["train.py", "--config", "configs/tiny.py", "--workdir", wd,
             "--config.data.scale_min=0.5"])
    assert p.returncode == errors.EXIT_CONFIG
    assert_one_line_error(p.stderr, "data.scale_min=0.5")
    assert not os.path.exists(wd)  # rejected before the workdir is created
    p = run(["train.py", "--config", "configs/tiny.py", "--workdir", wd, "--config.nosuch=1"])
    assert p.returncode == errors.EXIT_CONFIG
    assert_one_line_error(p.stderr, "unknown config field 'nosuch'")
    missing = str(tmp_path / "no_images")
    args = ["train.py", "--config", "configs/tiny.py", "--workdir", wd,
            "--config.data.train.kind=folder", f"--config.data.train.path={missing}"]
    p = run(args)
    assert p.returncode == errors.EXIT_INPUT
    assert_one_line_error(p.stderr, missing)
    p = run(args + ["--verbose"])  # the traceback only on request
    assert p.returncode == errors.EXIT_INPUT and "Traceback" in p.stderr


# ---------------------------------------------------------------------------- 10. non-finite out

def _scaled_model(path: str, factor) -> str:
    cfg = tiny_model_config()
    v = jax.tree_util.tree_map(lambda x: np.asarray(x) * np.float32(factor),
                               random_variables(cfg, 0))
    mdir.save_model(path, cfg, v)
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_10_non_finite_output_is_an_error_in_upscale_and_evaluate(tmp_path, capsys):
    # NaN weights (a corrupted model dir): refused when loading, naming the file
    nan_dir = _scaled_model(str(tmp_path / "nan"), np.nan)
    src = save_img(tmp_path / "in.png", 14, 12)
    rc = upscale.main([src, "--checkpoint", nan_dir, "--scale", "2", "-o",
                       str(tmp_path / "a.png"), "--noprogress"])
    assert rc == errors.EXIT_CHECKPOINT
    assert_one_line_error(capsys.readouterr().err, "non-finite", "variables")
    # finite weights whose output overflows: the image fails, nothing is written
    big = _scaled_model(str(tmp_path / "big"), 1e20)
    rc = upscale.main([src, "--checkpoint", big, "--scale", "2", "-o", str(tmp_path / "b.png"),
                       "--noprogress"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_NONFINITE and "non-finite value" in err
    assert not (tmp_path / "b.png").exists() and "Traceback" not in err
    data = tmp_path / "Mini"
    data.mkdir()
    save_img(data / "p.png", 24, 20)
    p = run(["evaluate.py", "--checkpoint", big, "--data", str(data), "--scales", "2",
             "--noprogress"])
    assert p.returncode == errors.EXIT_NONFINITE
    assert "non-finite" in p.stderr and "Traceback" not in p.stderr
    assert "| Method | Dataset | x2 |" in p.stdout  # the table is printed (no finite row)


# ---------------------------------------------------------------------------- 11. model dir

def test_11_model_dir_is_validated_with_one_line_errors(tmp_path, model_dir, capsys):
    src, cfg = model_dir
    cases = {}
    d = str(tmp_path / "mismatch")
    shutil.copytree(src, d)
    c = cfg.copy_and_resolve_references()
    c.dim = 64
    open(os.path.join(d, "model_config.json"), "w").write(mdir.config_to_json(c))
    cases[d] = "do not match its model_config.json"
    d = str(tmp_path / "heads0")
    shutil.copytree(src, d)
    data = json.load(open(os.path.join(d, "model_config.json")))
    data["heads"] = 0
    json.dump(data, open(os.path.join(d, "model_config.json"), "w"))
    cases[d] = "heads=0 must be a positive integer"
    d = str(tmp_path / "badjson")
    shutil.copytree(src, d)
    open(os.path.join(d, "model_config.json"), "w").write('{"dim": 32,')
    cases[d] = "model_config.json: invalid JSON"
    img = save_img(tmp_path / "in.png", 10, 10)
    for k, (d, needle) in enumerate(cases.items()):
        with pytest.raises(errors.CheckpointError, match=needle):
            pretrained.load(d)
        rc = upscale.main([img, "--checkpoint", d, "--scale", "2", "-o",
                           str(tmp_path / f"o{k}.png"), "--noprogress"])
        assert rc == errors.EXIT_CHECKPOINT
        assert_one_line_error(capsys.readouterr().err, needle, d)


# ---------------------------------------------------------------------------- 12. upscale inputs

def _bomb_png(path: str, side: int = 20000) -> str:
    """A 1-bit PNG of side x side pixels (400 M > 2 x Pillow's limit) in ~50 kB."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    row = b"\x00" + bytes((side + 7) // 8)
    raw = zlib.compress(row * side, 9)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    open(path, "wb").write(png)
    return path


def test_12_each_input_fails_independently_and_bounds_are_checked_first(tmp_path, model_dir,
                                                                         capsys):
    ckpt, _ = model_dir
    good1 = save_img(tmp_path / "good1.png", 20, 24)
    bomb = _bomb_png(str(tmp_path / "bomb.png"))
    folder = tmp_path / "adir.png"
    folder.mkdir()
    good2 = save_img(tmp_path / "good2.png", 12, 10, seed=3)
    out = tmp_path / "out"
    rc = upscale.main([good1, bomb, str(folder), good2, "--checkpoint", ckpt, "--scale", "2",
                       "-o", str(out), "--noprogress"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_FAILURE  # two causes: a resource limit and a non-image
    assert "bomb.png: Image size (400000000 pixels) exceeds limit" in err
    assert "adir.png: is a directory, not an image file" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == ["good1.png", "good2.png"]  # the others went on
    base = [good1, "--checkpoint", ckpt, "--noprogress"]
    for extra, code, needle in [
            (["--scale", "1e6", "-o", str(tmp_path / "s.png")], errors.EXIT_RESOURCE,
             "over --max_memory_gb 4"),
            (["--size", "100000x100000", "-o", str(tmp_path / "s.png")], errors.EXIT_RESOURCE,
             "--size 100000x100000"),
            (["--scale", "2", "--chunk", "100000000", "-o", str(tmp_path / "s.png")],
             errors.EXIT_RESOURCE, "--chunk 100000000"),
            (["--scale=", "-o", str(tmp_path / "s.png")], errors.EXIT_USAGE, "--scale"),
            (["--scale", "2", "--max_memory_gb", "-1", "-o", str(tmp_path / "s.png")],
             errors.EXIT_USAGE, "--max_memory_gb"),
            (["--scale", "2", "--max_memory_gb", "nan", "-o", str(tmp_path / "s.png")],
             errors.EXIT_USAGE, "--max_memory_gb"),
            (["--scale", "2", "-o", f"{good1}/x.png"], errors.EXIT_USAGE,
             f"{good1} is a file, not a directory")]:
        t0 = time.perf_counter()
        rc = upscale.main(base + extra)
        assert rc == code, (extra, capsys.readouterr().err)
        assert_one_line_error(capsys.readouterr().err, needle)
        assert time.perf_counter() - t0 < 30  # rejected before any decoding
    assert not (tmp_path / "s.png").exists()


# ---------------------------------------------------------------------------- 13. evaluate

def _evaluate_main(args: list[str]) -> int:
    """evaluate.py's command in this process (its flags parsed into a FlagValues of
    its own)."""
    return evaluate_cli.main(args)


@pytest.fixture
def mini(tmp_path):
    d = tmp_path / "Mini"
    d.mkdir()
    save_img(d / "p.png", 30, 26, seed=1)
    save_img(d / "q.png", 30, 26, seed=2)
    return str(d)


def test_13_unwritable_outputs_fail_before_evaluating(tmp_path, mini, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for flag in ("--json", "--save_images", "--plot"):
        rc = _evaluate_main(["--model", "bicubic", "--data", mini, "--scales", "2",
                             "--noprogress", flag, str(blocker / "out")])
        cap = capsys.readouterr()
        assert rc == errors.EXIT_OUTPUT and "PSNR" not in cap.err
        assert_one_line_error(cap.err, flag, f"{blocker} is a file, not a directory")
    for bad in ("inf", "nan"):
        rc = _evaluate_main(["--model", "bicubic", "--data", mini, "--scales", bad])
        assert rc == errors.EXIT_USAGE
        assert_one_line_error(capsys.readouterr().err, "--scales")


def test_13_a_late_write_failure_keeps_the_table(tmp_path, mini, capsys, monkeypatch):
    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reports, "write_json", full_disk)
    rc = _evaluate_main(["--model", "bicubic", "--data", mini, "--scales", "2",
                         "--noprogress", "--json", str(tmp_path / "r.json")])
    cap = capsys.readouterr()
    assert rc == errors.EXIT_OUTPUT
    assert "| Bicubic | Mini |" in cap.out  # the finished work is printed
    assert "--json" in cap.err and "No space left on device" in cap.err


def test_13_paired_lr_is_checked_in_both_dimensions():
    hr = np.zeros((60, 48, 3), np.uint8)
    with pytest.raises(errors.InputError, match=r"scale 2 \(height\) and 4 \(width\)"):
        protocol.pair(hr, np.zeros((30, 10, 3), np.uint8), 2, "x.png")
    gt, hw = protocol.pair(hr, np.zeros((30, 24, 3), np.uint8), 2, "x.png")
    assert gt.shape == (60, 48, 3) and hw == (60, 48)


def test_13_dataset_names_cannot_escape_the_output_folder(tmp_path, mini):
    out = tmp_path / "deep" / "OUT"
    cfg = runner.default_config()
    cfg.model, cfg.data, cfg.scales, cfg.progress = "bicubic", [f"../../x={mini}"], [2.0], False
    cfg.save_images = str(out)
    runner.run(cfg)
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
               if f.endswith(".png") and "Mini" not in d]
    assert written and all(w.startswith(str(out) + os.sep) for w in written)
    assert reports.safe_component("../../x") == "x"
    assert reports.safe_component("div2k/bicubic_x4") == "div2k_bicubic_x4"


# ---------------------------------------------------------------------------- 14. convert / load

def test_14_pth_errors_are_one_line_naming_the_file(tmp_path, model_dir, capsys):
    torch = pytest.importorskip("torch")

    ok = tmp_path / "ok.pth"
    torch.save({"x": torch.zeros(3)}, ok)
    data = ok.read_bytes()
    cases = {}
    (tmp_path / "trunc.pth").write_bytes(data[:len(data) // 2])
    cases["trunc.pth"] = "truncated or corrupt"
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    cases["list.pth"] = "holds list"
    (tmp_path / "empty.pth").write_bytes(b"")
    cases["empty.pth"] = "empty file (0 bytes)"
    (tmp_path / "text.pth").write_text("hello, not a checkpoint\n")
    cases["text.pth"] = "not a PyTorch checkpoint (neither a zip archive nor a pickle"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Evil()))
    cases["evil.pth"] = "objects other than tensors"
    img = save_img(tmp_path / "in.png", 10, 10)
    for name, needle in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(errors.CheckpointError) as e:
            pretrained.load(path)
        assert needle in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
        from msit_jax.io import convert

        assert convert.main([path, str(tmp_path / f"conv_{name}")]) == errors.EXIT_CHECKPOINT
        assert_one_line_error(capsys.readouterr().err, needle, path)
        rc = upscale.main([img, "--checkpoint", path, "--scale", "2", "-o",
                           str(tmp_path / f"u_{name}.png"), "--noprogress"])
        assert rc == errors.EXIT_CHECKPOINT
        assert_one_line_error(capsys.readouterr().err, needle)
        assert not os.path.exists(tmp_path / f"conv_{name}")


@pytest.mark.slow
def test_14_disk_full_during_convert_is_one_line(tmp_path, model_dir):
    """convert under a write limit (RLIMIT_FSIZE: writes fail with EFBIG, as on a full
    disk): one line naming the destination, exit 7, the partial write removed."""
    torch = pytest.importorskip("torch")

    from msit_jax.io.torch_io import variables_to_state_dict
    from tests.test_convert import official_args

    src, cfg = model_dir
    _, v = pretrained.load(src)
    sd = {k: torch.from_numpy(np.array(a)) for k, a in variables_to_state_dict(v, cfg).items()}
    pth = str(tmp_path / "epoch-best.pth")
    torch.save({"model": {"name": "amsit", "args": official_args(cfg), "sd": sd}}, pth)
    dst = str(tmp_path / "out")

    # bash sets the limit for the child (a preexec_fn would fork this threaded process)
    p = run(["-c", "import runpy, sys; sys.argv = sys.argv[1:]; "
             "runpy.run_module('msit_jax.convert', run_name='__main__')", "convert", pth, dst],
            shell_prefix="ulimit -f 4 &&")
    assert p.returncode == errors.EXIT_OUTPUT, p.stderr[-3000:]
    line = assert_one_line_error(p.stderr, dst)
    assert "File too large" in line or "No space" in line
    assert len(p.stderr.strip().splitlines()) <= 3, p.stderr  # not a 919-line log
    assert not os.path.exists(dst)  # the partial write removed
    p = run(["-m", "msit_jax.convert", pth, dst])  # with room, the same command works
    assert p.returncode == 0, p.stderr[-3000:]


def test_exit_codes_are_distinct():
    codes = [errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_USAGE, errors.EXIT_CONFIG,
             errors.EXIT_INPUT, errors.EXIT_CHECKPOINT, errors.EXIT_NONFINITE, errors.EXIT_OUTPUT,
             errors.EXIT_RESOURCE]
    assert len(set(codes)) == len(codes)
    assert errors.exit_code_for(images.ImageTooLargeError("x")) == errors.EXIT_RESOURCE
    assert errors.exit_code_for(OSError(28, "No space left on device")) == errors.EXIT_OUTPUT
    assert errors.exit_code_for(FileNotFoundError("x")) == errors.EXIT_INPUT
    assert errors.one_line("a\n  b\n\nc") == "a; b; c"
