"""Smoke tests of the accelerator scripts on CPU: benchmarks.accel_check
(tiny model, --allow_cpu) and benchmarks.compare_torch (ours alone).

They run the scripts as users do (subprocesses, with timeouts) and check the
exit status and the JSON they write; the figures themselves mean nothing on CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as users do, from the repository root (run_script's cwd).
ACCEL = ("-m", "benchmarks.accel_check")
COMPARE = ("-m", "benchmarks.compare_torch")
NUMERIC_SECTIONS = ("agreement_infer", "agreement_grad", "drift", "fft", "crossover", "chunks")


def run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device: what a user's laptop has
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def numbers(tree) -> list[float]:
    """Every int/float in a JSON tree (bools excluded)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [float(tree)]
    return []


@pytest.fixture(scope="module")
def accel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel") / "accel.json"
    proc = run_script([*ACCEL, "--allow_cpu", "--tiny", "--repeats", "1", "--json", str(out)],
                      timeout=240)
    return proc, out


def test_accel_check_tiny_passes_and_writes_every_section(accel_run):
    proc, out = accel_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks within tolerance" in proc.stdout
    res = json.loads(out.read_text())
    assert res["failed"] == []
    assert res["meta"]["backend"] == "cpu" and res["meta"]["tiny"] is True
    assert res["meta"]["preallocate"] == "false"
    for name in NUMERIC_SECTIONS:
        sec = res["sections"][name]
        assert "error" not in sec and "skipped" not in sec, (name, sec)
        vals = numbers(sec)
        assert vals and all(math.isfinite(v) for v in vals), (name, sec)
    assert res["sections"]["reference"] == {"skipped": "no --reference",
                                            "seconds_total": res["sections"]["reference"]
                                            ["seconds_total"]}
    assert res["sections"]["memory"]["host_peak_rss_bytes"] > 0
    # Every tolerance is recorded with its value and meaning, and every check names one.
    tol = res["tolerances"]
    assert set(tol) == {"device_vs_cpu_max_abs", "grad_rel", "precision_default_min_db",
                        "bf16_min_db", "fft_vs_direct_max_abs", "torch_parity_max_abs"}
    assert tol["device_vs_cpu_max_abs"]["value"] == 1e-4
    assert tol["grad_rel"]["value"] == 1e-3
    assert tol["bf16_min_db"]["value"] == 35.0
    assert tol["precision_default_min_db"]["value"] == 35.0
    assert tol["fft_vs_direct_max_abs"]["value"] == 1e-4
    assert all(t["what"] for t in tol.values())
    checked = {r["tolerance"] for r in res["checks"]}
    assert checked == set(tol) - {"torch_parity_max_abs"}  # no --reference here
    assert all(r["passed"] and math.isfinite(r["value"]) for r in res["checks"])
    # The FFT comparison really compared an FFT program with a direct one.
    ffts = res["sections"]["fft"]["fft_ops"]
    assert ffts["fft"] > 0 and ffts["direct"] == 0
    assert len(res["sections"]["crossover"]["scales"]) == 5
    assert len(res["sections"]["chunks"]["seconds"]) == 3


def test_accel_check_failing_tolerance_exits_1(tmp_path):
    out = tmp_path / "fail.json"
    # bf16 differs from float32, so no PSNR reaches 1000 dB: the check must fail.
    proc = run_script([*ACCEL, "--allow_cpu", "--tiny", "--sections", "drift",
                       "--tolerance", "bf16_min_db=1000", "--json", str(out)], timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" in proc.stdout and "bf16 drift" in proc.stdout
    res = json.loads(out.read_text())
    assert res["tolerances"]["bf16_min_db"]["value"] == 1000
    failed = [r for r in res["checks"] if not r["passed"]]
    assert failed and {r["tolerance"] for r in failed} == {"bf16_min_db"}
    assert len(res["failed"]) == len(failed)


def test_accel_check_rejects_cpu_without_allow_cpu(tmp_path):
    proc = run_script([*ACCEL, "--tiny", "--json", str(tmp_path / "x.json")], timeout=60)
    assert proc.returncode != 0
    assert "not a GPU or TPU" in proc.stderr and "--allow_cpu" in proc.stderr


def test_compare_torch_quick_ours_alone(tmp_path):
    out = tmp_path / "compare.json"
    proc = run_script([*COMPARE, "--quick", "--cases", "infer", "--repeats", "1",
                       "--json", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["failed"] == [] and res["backend"] == "cpu"
    assert res["devices"]["jax"] == ["cpu"] and res["devices"]["host_cpu"]
    (case,) = res["cases"].values()
    assert case["ours_s"] > 0 and case["official_s"] is None


def test_compare_torch_helpers():
    """Batch rounding and the agreement tolerance, without running the models."""
    from benchmarks import compare_torch

    assert compare_torch.train_sizes(1)["batch"] == 4
    assert compare_torch.train_sizes(8)["batch"] == 8
    assert compare_torch.train_sizes(3)["batch"] == 6
    assert compare_torch.agreement_tolerance("float32", "highest") == 1e-4
    assert compare_torch.agreement_tolerance("bfloat16", "highest") > 1e-4
    assert compare_torch.agreement_tolerance("float32", "default") > 1e-4
