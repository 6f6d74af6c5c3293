"""benchmarks.lower, the lowering report: run as a user would (`python -m
benchmarks.lower`, tiny model, 8 virtual devices set by the script itself), and
its cost model (benchmarks.cost_model) on a hand-written module whose costs are
known.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = ("-m", "benchmarks.lower")  # run from the repository root (cwd=REPO)


def _load_lower():
    from benchmarks import cost_model

    return cost_model


def _run(tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    # No XLA_FLAGS from here: the script must set the device count itself.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, *SCRIPT, "--tiny", *flags, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return proc, json.load(f)


def _check_common(r: dict) -> None:
    assert r["emulated_host_same_ops"] is True and r["emulated_host_ops_diff"] == {}
    assert r["ok"] is True and r["failures"] == []
    assert r["unset_precision"] == 0
    assert r["contractions"] and all(k.endswith(":HIGHEST") for k in r["contractions"])
    assert r["f64"] is False and r["callbacks"] == []
    assert r["ops"].get("fft", 0) == 0
    cost = r["cost"]
    assert cost["nominal_flops"] > 0 and cost["stablehlo_flops"] > 0
    assert cost["xla_lowered"]["flops"] > 0 and cost["xla_lowered"]["bytes_accessed"] > 0
    # The StableHLO reader and XLA's cost model count the same program.
    assert 0.5 < cost["stablehlo_flops"] / cost["xla_lowered"]["flops"] < 2
    for chip in ("tpu_v5e", "tpu_v4", "h100_sxm"):
        p = r["predictions"][chip]
        assert 0 < p["lower_bound_s"] <= p["predicted_s"] * (1 + 1e-9) <= p["upper_bound_s"]
        assert p["predicted_s"] == pytest.approx(sum(p["by_kind_s"].values()))
    # A chip with more of everything is predicted faster.
    assert r["predictions"]["tpu_v4"]["predicted_s"] < r["predictions"]["tpu_v5e"]["predicted_s"]
    b = r["bottlenecks_tpu_v5e"]
    assert len(b) == 3 and all(x["time_s"] > 0 for x in b)
    assert [x["time_s"] for x in b] == sorted((x["time_s"] for x in b), reverse=True)


def test_train_step_report(tmp_path):
    mlir = tmp_path / "step.mlir"
    proc, r = _run(tmp_path, "--platform", "tpu", "--program", "train_stage1", "--dtype",
                   "bfloat16", "--devices", "8", "--mlir", str(mlir))
    assert (r["platform"], r["program"], r["dtype"], r["precision"], r["devices"]) == (
        "tpu", "train_stage1", "bfloat16", "highest", 8)
    _check_common(r)
    text = mlir.read_text()
    assert "stablehlo" in text and "num_partitions = 8" in text  # sharded over 8 devices
    # bf16 compute: the decoder's key/value gathers read bf16.
    assert r["largest_gathers"] and "bf16" in r["largest_gathers"][0]["type"]
    # XLA:CPU compiled the 8-way partition: per-device FLOPs ~ 1/8 of the global program.
    xc = r["cost"]["xla_compiled"]
    assert xc["devices"] == 8
    assert 0.5 < xc["global_flops"] / r["cost"]["xla_lowered"]["flops"] < 2
    s = r["scaling_v5e"]
    assert s["ici_bytes_s"] == 200e9
    for per_chip in s["per_chip_batch"]:
        rows = per_chip["rows"]
        assert [row["chips"] for row in rows] == [1, 4, 8, 16, 32, 64]
        assert rows[0]["efficiency"] == 1.0 and rows[0]["allreduce_s"] == 0.0
        assert per_chip["gradient_bytes"] == 4 * r["model"]["learnable_params"]
        effs = [row["efficiency"] for row in rows]
        assert effs == sorted(effs, reverse=True) and 0 < effs[-1] < 1
    assert "TPU v5e" in proc.stdout and "bottlenecks" in proc.stdout


def test_inference_report(tmp_path):
    _, r = _run(tmp_path, "--platform", "cuda", "--program", "decode", "--dtype", "float32",
                "--no-compile")
    assert (r["platform"], r["program"], r["dtype"]) == ("cuda", "decode", "float32")
    _check_common(r)
    assert "scaling_v5e" not in r and r["cost"]["xla_compiled"] is None


def test_bad_flags_are_refused():
    proc = subprocess.run([sys.executable, *SCRIPT, "--platform", "tpu", "--program", "train",
                           "--dtype", "float32", "--json", "x.json"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "--program" in proc.stderr
    proc = subprocess.run([sys.executable, *SCRIPT, "--platform", "tpu", "--program",
                           "train_stage1", "--dtype", "float32", "--devices", "3", "--json",
                           "x.json"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "does not divide" in proc.stderr


MODULE = """\
module @jit_f {
  func.func public @main(%arg0: tensor<4x8xf32>, %arg1: tensor<8x16xf32>, %arg2: tensor<2x10x10x3xbf16>, %arg3: tensor<3x3x3x32xbf16>) -> tensor<4x16xf32> {
    %0 = stablehlo.dot_general %arg0, %arg1, contracting_dims = [1] x [0], precision = [HIGHEST, HIGHEST] : (tensor<4x8xf32>, tensor<8x16xf32>) -> tensor<4x16xf32> loc(#loc3)
    %1 = stablehlo.convolution(%arg2, %arg3) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f], window = {pad = [[1, 1], [1, 1]]} {batch_group_count = 1 : i64, feature_group_count = 1 : i64} : (tensor<2x10x10x3xbf16>, tensor<3x3x3x32xbf16>) -> tensor<2x10x10x32xbf16> loc(#loc4)
    %2 = call @relu(%0) : (tensor<4x16xf32>) -> tensor<4x16xf32> loc(#loc5)
    %3 = call @relu(%2) : (tensor<4x16xf32>) -> tensor<4x16xf32> loc(#loc5)
    %cst = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %c = stablehlo.constant dense<0> : tensor<i32>
    %4 = stablehlo.reduce(%3 init: %cst) applies stablehlo.add across dimensions = [0] : (tensor<4x16xf32>, tensor<f32>) -> tensor<16xf32> loc(#loc3)
    %5 = "stablehlo.case"(%c) ({
      %6 = stablehlo.multiply %3, %3 : tensor<4x16xf32> loc(#loc3)
      stablehlo.return %6 : tensor<4x16xf32>
    }, {
      stablehlo.return %3 : tensor<4x16xf32>
    }) : (tensor<i32>) -> tensor<4x16xf32> loc(#loc3)
    return %5 : tensor<4x16xf32>
  }
  func.func private @relu(%arg0: tensor<4x16xf32>) -> tensor<4x16xf32> {
    %0 = stablehlo.maximum %arg0, %arg0 : tensor<4x16xf32> loc(#loc6)
    return %0 : tensor<4x16xf32>
  }
}
#loc1 = loc("f.py":1:1)
#loc3 = loc("jit(f)/jvp(MSIT)/MSIT.decode/decoder/mlp/layers_0/dot_general"(#loc1))
#loc4 = loc("jit(f)/transpose(jvp(MSIT))/MSIT.encode/encoder/head/conv_general_dilated"(#loc1))
#loc6 = loc("max")
#loc7 = loc("relu")
#loc8 = loc("jit(f)/jvp(MSIT)/MSIT.encode/act/relu"(#loc1))
#loc5 = loc(callsite(#loc7 at #loc8))
"""


def test_stablehlo_costs():
    lower = _load_lower()
    ops, facts = lower.op_costs(MODULE)
    kinds = [o.kind for o in ops]
    # relu expanded at both calls, the case's costlier branch, the reduce's scalar body not.
    assert kinds == ["dot_general", "convolution", "maximum", "maximum", "reduce", "multiply"]
    assert facts["while_loops"] == 0
    dot, conv = ops[0], ops[1]
    assert dot.flops == 2 * 4 * 16 * 8
    assert (dot.mxu_k, dot.mxu_n, dot.precision, dot.operand_dtype) == (8, 16, "HIGHEST", "f32")
    assert dot.bytes_fused == 4 * (4 * 8 + 8 * 16 + 4 * 16)
    assert conv.flops == 2 * (2 * 10 * 10 * 32) * (3 * 3 * 3)
    assert (conv.mxu_k, conv.mxu_n, conv.precision, conv.operand_dtype) == (27, 32, "DEFAULT",
                                                                           "bf16")
    assert conv.bytes_fused == 2 * (2 * 10 * 10 * 3 + 3 * 3 * 3 * 32 + 2 * 10 * 10 * 32)
    # Elementwise ops: fused away (no HBM bytes of their own), counted when unfused.
    assert ops[2].bytes_fused == 0 and ops[2].bytes_unfused == 3 * 4 * 4 * 16
    assert lower.scope_of(ops[1].name) == ("bwd", "MSIT.encode/encoder/head")
    assert lower.scope_of(ops[2].name) == ("fwd", "MSIT.encode/act")
    assert lower.model_part("MSIT.encode/amsno/msc/Ms_conv_16") == "MSIT.encode/amsno/msc/Ms_conv_*"

    v5e, h100 = lower.CHIPS["tpu_v5e"], lower.CHIPS["h100_sxm"]
    # f32 HIGHEST on TPU: 6 bf16 passes; bf16 operands: one. H100: FP32 cores vs bf16.
    assert v5e.contraction_peak("f32", "HIGHEST") == pytest.approx(197e12 / 6)
    assert v5e.contraction_peak("f32", "HIGH") == pytest.approx(197e12 / 3)
    assert v5e.contraction_peak("bf16", "HIGHEST") == 197e12
    assert h100.contraction_peak("f32", "HIGHEST") == 67e12
    assert h100.contraction_peak("f32", "DEFAULT") == 495e12
    # The conv fills 27/128 x 32/128 of a 128x128 MXU.
    assert lower.op_peak(conv, v5e) == pytest.approx(197e12 * 27 / 128 * 32 / 128)
    assert lower.op_time(conv, v5e) == pytest.approx(max(
        conv.flops / lower.op_peak(conv, v5e), conv.bytes_fused / 819e9))
    r = lower.roofline(ops, v5e)
    assert r["predicted_s"] == pytest.approx(sum(lower.op_time(o, v5e) for o in ops))
    assert r["lower_bound_s"] <= r["predicted_s"] <= r["upper_bound_s"]


def test_scaling_model():
    lower = _load_lower()
    s = lower.scaling(step_s=0.1, global_batch=32, params=6_000_000, per_chip_batch=4)
    row = {r["chips"]: r for r in s["rows"]}
    assert row[1]["compute_s"] == pytest.approx(0.1 * 4 / 32) and row[1]["allreduce_s"] == 0
    assert row[64]["allreduce_s"] == pytest.approx(2 * 63 / 64 * 24e6 / 200e9)
    assert row[64]["efficiency"] == pytest.approx(0.0125 / (0.0125 + row[64]["allreduce_s"]))
