"""Data parallelism: 8 virtual CPU devices and two jax.distributed processes match one device.

The multi-device runs happen in subprocesses (XLA's device count is fixed at
start-up); this file is also their entry point:
    python tests/test_train_distributed.py WORKDIR OUT.npz [PROCESS_ID NUM_PROCESSES PORT]
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # multi-device and multi-process training in subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420  # generous: two processes compile side by side on 2 cores


def tiny_config():
    # Not tests.conftest.load_config: this file also runs as a worker script, where the
    # tests package is not importable.
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg_tiny", os.path.join(REPO, "configs",
                                                                          "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def flat_state(state) -> dict:
    import jax

    out = {}
    for coll in ("params", "batch_stats"):
        for path, v in jax.tree_util.tree_leaves_with_path(state[coll]):
            out[coll + "/" + "/".join(str(p.key) for p in path)] = np.asarray(v)
    return out


def train_losses(workdir) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def worker(workdir: str, out: str, process_id: int = 0, num_processes: int = 1,
           port: int = 0) -> None:
    from msit_jax.training import train_and_evaluate

    cfg = tiny_config()
    if num_processes > 1:
        cfg.distributed.update(enabled=True, coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id)
    res = train_and_evaluate(cfg, workdir)
    import jax

    if jax.process_index() == 0:
        losses = train_losses(workdir)
        np.savez(out, **flat_state(res.state), losses=np.array([losses[s] for s in sorted(losses)]),
                 devices=jax.device_count(), processes=jax.process_count())


def run_workers(tmp_path, n_proc: int, xla_flags: str = ""):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env.pop("XLA_FLAGS", None)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    with socket.socket() as s:  # a free loopback port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    wd, out = str(tmp_path / "run"), str(tmp_path / "out.npz")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), wd, out, str(i),
                               str(n_proc), str(port)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n_proc)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return dict(np.load(out)), wd


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    import jax

    from msit_jax.training import train_and_evaluate

    assert jax.device_count() == 1
    wd = str(tmp_path_factory.mktemp("one_device"))
    res = train_and_evaluate(tiny_config(), wd)
    losses = train_losses(wd)
    return {**flat_state(res.state), "losses": np.array([losses[s] for s in sorted(losses)])}


# Biases whose output reaches a train-mode BatchNorm only through per-pixel
# linear maps (the multi-scale convs -> grouped 1x1 conv -> BN, in MSNO and in
# the Q/K branch) have an exactly zero gradient: BN subtracts the batch mean,
# which absorbs any constant. Numerically their gradient is reduction-order
# noise (~1e-11), which Adam normalises into steps of up to ~lr in random
# directions, so they agree only to the sum of the learning rates.
BN_NULL_SPACE = re.compile(
    r"params/(amsno/msc/[^/]+|amsno/sim/sim0|multi_conv_qs_0/msc/[^/]+|"
    r"multi_conv_qs_0/mix/proj1)/bias$")


def assert_close(got: dict, ref: dict, tol: float = 1e-5) -> None:
    from msit_jax.training.schedule import lr_schedule

    cfg = tiny_config()
    sched = lr_schedule(cfg.lr.base, cfg.lr.multiplier, cfg.lr.warmup_steps, cfg.total_steps)
    lr_sum = sum(float(sched(s)) for s in range(cfg.total_steps))
    assert set(ref) <= set(got)
    assert len(ref["losses"]) == cfg.total_steps
    null = [k for k in ref if BN_NULL_SPACE.match(k)]
    assert len(null) == cfg.model.msno_heads + cfg.model.qk_heads + 2
    for k, v in ref.items():
        atol = 2 * lr_sum if k in null else tol
        np.testing.assert_allclose(got[k], v, rtol=0, atol=atol, err_msg=k)


def test_eight_virtual_devices_match_one(one_device, tmp_path):
    got, _ = run_workers(tmp_path, 1, "--xla_force_host_platform_device_count=8")
    assert int(got["devices"]) == 8
    assert_close(got, one_device)


def test_two_processes_match_one(one_device, tmp_path):
    got, wd = run_workers(tmp_path, 2)
    assert int(got["devices"]) == 2 and int(got["processes"]) == 2
    assert_close(got, one_device)
    # both processes wrote their data-iterator state into the checkpoint
    data_dir = os.path.join(wd, "checkpoints", "4", "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))


if __name__ == "__main__":
    a = sys.argv[1:]
    worker(a[0], a[1], *(int(x) for x in a[2:]))
