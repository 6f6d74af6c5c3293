"""Lowering report: what a TPU or GPU would run, and a roofline guess of how fast,
computed on a laptop before renting the accelerator.

    python -m benchmarks.lower --platform tpu --program train_stage1 --dtype bfloat16 \\
        --json /tmp/ts1_tpu_bf16.json [--mlir /tmp/ts1.mlir] [--precision highest] [--devices 8]

The program (paper-size MSIT, the training protocol's shapes: global batch 32,
48x48 LR, 2304 queries) is lowered with `jax.export` for the target platform
(`msit_jax.lowering`); the report records

  * op counts, the precision of every dot_general / convolution, f64 and host
    callbacks, the largest gathers and scatters;
  * the acceptance check: lowered a second time with `jax.default_backend()`
    reporting the target platform (what a TPU host reports while tracing), the
    op counts (ignoring the one-branch `case` wrappers) must be the same;
  * FLOPs and bytes from XLA's cost model of the same math lowered for this CPU
    (`RuntimeOptions(conv_impl='xla', fft_min_kernel=0)`), next to the nominal
    FLOPs of `benchmarks.flops`;
  * a per-op roofline of the StableHLO program, per chip (TPU v5e, TPU v4, H100;
    `benchmarks.cost_model`, which reads the program through `msit_jax.hlo`):
    time = sum over ops of max(FLOPs / effective peak, bytes / HBM bandwidth),
    the three largest predicted bottlenecks on v5e, and for the train steps a
    data-parallel (weak) scaling estimate to a v5e-64 pod.

These are predictions from published peak rates, not measurements. The exit
status is non-zero when the acceptance check fails or, at precision 'highest',
a contraction carries no precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

PROGRAMS = ("encode", "decode", "grid", "train_stage1", "train_stage2")
PLATFORMS = ("tpu", "cuda")
DTYPES = ("float32", "bfloat16")
PRECISIONS = ("highest", "high", "default")
# jax, msit_jax and benchmarks.cost_model are imported inside the functions: main
# sets the virtual device count (XLA_FLAGS, JAX_PLATFORMS) before jax is imported.


def _ops_diff(a: dict, b: dict) -> dict:
    from msit_jax.lowering import compute_ops

    a, b = compute_ops(a), compute_ops(b)
    return {k: [a.get(k, 0), b.get(k, 0)] for k in sorted(set(a) | set(b))
            if a.get(k, 0) != b.get(k, 0)}


def _cost_dict(ca: Any) -> Optional[dict]:
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return None
    return {"flops": float(ca.get("flops", 0.0)),
            "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
            "transcendentals": float(ca.get("transcendentals", 0.0))}


def _nominal_flops(program: str, cfg, shapes, queries_per_call: int) -> float:
    """Analytic FLOPs from benchmarks.flops (reference formulation)."""
    from benchmarks import flops

    b, n = shapes.batch, shapes.lr_size
    if program.startswith("train"):
        return flops.train_step_flops(cfg, b, n, shapes.sample_q)
    if program == "encode":
        return 2.0 * b * n * n * flops.encoder_macs_per_pixel(cfg)
    if program == "decode":
        return 2.0 * b * shapes.sample_q * flops.decoder_macs_per_query(cfg)
    return 2.0 * queries_per_call * flops.decoder_macs_per_query(cfg)


def build_report(args: argparse.Namespace) -> tuple[dict, str]:
    """(report, StableHLO text) of one program: lower, analyse and predict (jax
    must already see `args.devices` devices)."""
    import jax

    from benchmarks import cost_model as cm
    from msit_jax import hlo
    from msit_jax.models.config import model_config, tiny_model_config
    from msit_jax.models.grid_decoder import plan_axis
    from msit_jax.lowering import (Shapes, abstract_variables, analyse, compute_ops,
                                   default_backend_reporting, lower_program, program_and_args,
                                   stage_config)
    from msit_jax.ops.runtime import RuntimeOptions

    if jax.device_count() != args.devices:
        raise SystemExit(f"jax sees {jax.device_count()} devices, --devices {args.devices}: "
                         "run python -m benchmarks.lower so it can set XLA_FLAGS first")
    cfg = tiny_model_config() if args.tiny else model_config()
    shapes = Shapes(batch=8, lr_size=12, sample_q=64, chunk=256) if args.tiny else Shapes()
    runtime = RuntimeOptions(precision=args.precision, dtype=args.dtype,
                             remat_decoder=args.remat_decoder,
                             s2d_min_kernel=args.s2d_min_kernel)
    train = args.program.startswith("train")
    timings = {}

    t = time.perf_counter()
    exported = lower_program(args.program, args.platform, cfg, runtime, shapes)
    mlir = exported.mlir_module()
    timings["lower_s"] = time.perf_counter() - t
    module = hlo.parse(mlir)  # read once: the checks, the costs, the reductions
    facts = analyse(module, top=5)

    # Acceptance check: the program a host of that platform would build. Lowering
    # happens on this host either way; only what tracing sees of the backend
    # changes (e.g. per-platform defaults read from jax.default_backend()).
    with default_backend_reporting(args.platform):
        emulated = analyse(lower_program(args.program, args.platform, cfg, runtime, shapes)
                           .mlir_module())
    same = compute_ops(emulated["ops"]) == compute_ops(facts["ops"])

    # XLA's cost model of the same math on this host: XLA's own conv rules and no
    # FFT convolutions (the accelerator methods), lowered for CPU.
    cost_rt = runtime.replace(conv_impl="xla", fft_min_kernel=0)
    cpu_facts = analyse(lower_program(args.program, "cpu", cfg, cost_rt, shapes).mlir_module())
    fn, fargs = program_and_args(args.program, cfg, cost_rt, shapes)
    t = time.perf_counter()
    lowered = fn.lower(*fargs)
    xla_lowered = None
    try:
        xla_lowered = _cost_dict(lowered.cost_analysis())
    except Exception as e:  # noqa: BLE001 - older/newer jax: fall back to compiling
        print(f"note: Lowered.cost_analysis failed ({e}); compiling instead", file=sys.stderr)
    xla_compiled, memory = None, None
    if args.compile or xla_lowered is None:
        compiled = lowered.compile()
        xla_compiled = _cost_dict(compiled.cost_analysis())
        try:
            m = compiled.memory_analysis()
            memory = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes",
                                                      "output_size_in_bytes",
                                                      "temp_size_in_bytes")}
        except Exception:  # noqa: BLE001 - not every backend reports it
            memory = None
    timings["xla_cost_s"] = time.perf_counter() - t
    # The train step is sharded over `devices`: XLA:CPU's compiled numbers are one
    # device's partition (checked against the unpartitioned lowered numbers);
    # inference programs run unsharded on one device.
    shards = args.devices if train else 1
    if xla_compiled:
        xla_compiled.update(scope="per device (SPMD partition, after CPU fusion)"
                            if shards > 1 else "whole program (after CPU fusion)",
                            devices=shards,
                            global_flops=xla_compiled["flops"] * shards,
                            global_bytes_accessed=xla_compiled["bytes_accessed"] * shards)
    if xla_lowered:
        xla_lowered["scope"] = "whole program, global batch, unoptimised HLO (no fusion)"

    ops, walk = cm.op_costs(module)
    totals = cm.kind_totals(ops)
    preds = {key: cm.roofline(ops, chip) for key, chip in cm.CHIPS.items()}
    for key, chip in cm.CHIPS.items():
        if xla_lowered:
            peak = chip.contraction_peak("bf16" if args.dtype == "bfloat16" else "f32",
                                         args.precision.upper())
            nbytes = (xla_compiled["global_bytes_accessed"] if xla_compiled
                      else xla_lowered["bytes_accessed"])
            # One overall roofline from XLA's totals, every FLOP at the contraction
            # peak; bytes fused (compiled) where available, else unfused.
            preds[key]["xla_cost_roofline_s"] = max(xla_lowered["flops"] / peak,
                                                    nbytes / chip.hbm_bytes_s)
            preds[key]["xla_cost_roofline_bytes"] = ("compiled (CPU-fused)" if xla_compiled
                                                     else "lowered (unfused)")

    if memory:
        # XLA:CPU's buffer assignment (the accelerator's differs): temporaries of
        # one shard scaled to the whole batch on one chip, plus arguments.
        one_chip = memory["temp_size_in_bytes"] * shards + memory["argument_size_in_bytes"]
        memory["one_chip_estimate_bytes"] = one_chip
        for key, chip in cm.CHIPS.items():
            preds[key]["fits_hbm_estimate"] = one_chip <= chip.hbm_capacity
    variables = abstract_variables(stage_config(cfg, args.program))
    params = int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(variables["params"])))
    py = plan_axis(shapes.lr_size * shapes.grid_scale, shapes.lr_size, cfg.radius)
    group = int(py.groups.shape[1])
    grid_queries = max(1, shapes.chunk // group ** 2) * group ** 2

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "platform": args.platform, "program": args.program, "dtype": args.dtype,
        "precision": args.precision, "remat_decoder": int(args.remat_decoder),
        "s2d_min_kernel": int(args.s2d_min_kernel),
        "devices": args.devices, "tiny": bool(args.tiny),
        "shapes": dataclasses.asdict(shapes),
        "model": {"encoder": cfg.encoder, "dim": cfg.dim, "conv": stage_config(
            cfg, args.program).conv, "learnable_params": params},
        "ops": facts["ops"],
        "contractions": facts["contractions"],
        "unset_precision": facts["unset_precision"],
        "unset_precision_examples": facts["unset_precision_examples"],
        "f64": facts["f64"], "callbacks": facts["callbacks"],
        "custom_calls": facts["custom_calls"],
        "largest_gathers": facts["gathers"], "largest_scatters": facts["scatters"],
        "emulated_host_same_ops": same,
        "emulated_host_ops_diff": _ops_diff(facts["ops"], emulated["ops"]),
        "cost": {
            "xla_lowered": xla_lowered,
            "xla_compiled": xla_compiled,
            "xla_cpu_memory_per_device": memory,
            "cost_program": {"platform": "cpu", "conv_impl": "xla", "fft_min_kernel": 0,
                             "ops_diff_vs_target": _ops_diff(facts["ops"], cpu_facts["ops"])},
            "nominal_flops": _nominal_flops(args.program, cfg, shapes, grid_queries),
            "stablehlo_flops": sum(v["flops"] for v in totals.values()),
            "stablehlo_bytes_fused": sum(v["bytes_fused"] for v in totals.values()),
            "stablehlo_bytes_unfused": sum(v["bytes_unfused"] for v in totals.values()),
        },
        "by_kind": totals,
        "while_loops_counted_once": walk["while_loops"],
        "predictions": preds,
        "bottlenecks_tpu_v5e": cm.bottlenecks(ops, cm.CHIPS["tpu_v5e"]),
        "op_groups_tpu_v5e": cm.bottlenecks(ops, cm.CHIPS["tpu_v5e"], top=12),
        "peaks": {k: dataclasses.asdict(c) | {"vector_flops": c.vector_flops}
                  for k, c in cm.CHIPS.items()},
        "assumptions": {
            "tpu_f32_passes": {"highest": 6, "high": 3, "default": 1},
            "h100_f32": {"highest": "FP32 CUDA cores", "high": "TF32", "default": "TF32"},
            "tpu_vector_fraction_of_bf16_peak": cm.TPU_VECTOR_FRACTION,
            "fused_model": "elementwise and layout ops fused away (no HBM bytes); "
                           "contractions, gathers, scatters, reduces read operands and "
                           "write results",
            "one_chip": "one chip runs the whole program at the global batch",
        },
        "timings": timings,
    }
    if train:
        step = preds["tpu_v5e"]["predicted_s"]
        per_chip = sorted({max(1, shapes.batch // args.devices), shapes.batch})
        reductions = cm.batch_reductions(module, shapes.batch)
        report["scaling_v5e"] = {
            "ici_bytes_s": cm.V5E_ICI_BYTES_S,
            "model": "weak scaling, ring all-reduce of f32 gradients, not overlapped",
            "batch_reductions": reductions,
            "small_allreduce_s_assumed": cm.SMALL_ALLREDUCE_S,
            "per_chip_batch": [cm.scaling(step, shapes.batch, params, b, reductions)
                               for b in per_chip],
        }
    failures = []
    if not same:
        failures.append(f"emulated host lowering differs: {report['emulated_host_ops_diff']}")
    if args.precision == "highest" and facts["unset_precision"]:
        failures.append(f"{facts['unset_precision']} contraction(s) without a precision: "
                        f"{facts['unset_precision_examples'][:2]}")
    report["failures"] = failures
    report["ok"] = not failures
    return report, mlir


def summary(r: dict) -> str:
    """A readable account of a report."""
    from benchmarks.cost_model import CHIPS
    from msit_jax.lowering import compute_ops

    lines = [f"{r['program']} for {r['platform']} ({r['dtype']}, precision {r['precision']}, "
             f"{r['devices']} devices, shapes {r['shapes']})",
             f"  learnable parameters: {r['model']['learnable_params']:,}",
             "  ops: " + ", ".join(f"{k} {v}" for k, v in sorted(
                 compute_ops(r["ops"]).items(), key=lambda kv: -kv[1])),
             f"  contractions: {r['contractions']}  (without a precision: "
             f"{r['unset_precision']})",
             f"  f64: {r['f64']}  host callbacks: {r['callbacks'] or 'none'}",
             "  largest gathers: " + "; ".join(g["type"] for g in r["largest_gathers"][:3]),
             f"  emulated {r['platform']} host, same ops: {r['emulated_host_same_ops']}"]
    c = r["cost"]
    lines.append(f"  FLOPs: nominal {c['nominal_flops'] / 1e9:,.1f} G, StableHLO "
                 f"{c['stablehlo_flops'] / 1e9:,.1f} G"
                 + (f", XLA (unfused, global) {c['xla_lowered']['flops'] / 1e9:,.1f} G"
                    if c["xla_lowered"] else ""))
    lines.append(f"  bytes: StableHLO fused {c['stablehlo_bytes_fused'] / 1e9:,.1f} GB, "
                 f"unfused {c['stablehlo_bytes_unfused'] / 1e9:,.1f} GB"
                 + (f", XLA:CPU compiled x{c['xla_compiled']['devices']} "
                    f"{c['xla_compiled']['global_bytes_accessed'] / 1e9:,.1f} GB"
                    if c["xla_compiled"] else ""))
    lines.append("  predicted time, one chip, whole program (roofline, not a measurement;"
                 " [overall bound .. unfused], full-MXU figure, share memory-bound):")
    for key, p in r["predictions"].items():
        kinds = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in p["by_kind_s"].items())
        fits = p.get("fits_hbm_estimate")
        lines.append(f"    {CHIPS[key].name:9s} {p['predicted_s'] * 1e3:9.2f} ms  "
                     f"[{p['lower_bound_s'] * 1e3:.2f} .. {p['upper_bound_s'] * 1e3:.2f}]  "
                     f"full MXU {p['no_tile_padding_s'] * 1e3:.2f}  "
                     f"memory-bound {p['memory_bound_share']:.0%}"
                     + ("" if fits is None else f"  fits HBM: {'yes' if fits else 'no'}")
                     + f"\n              by kind (ms): {kinds}")
    lines.append("  largest predicted bottlenecks on TPU v5e:")
    for i, b in enumerate(r["bottlenecks_tpu_v5e"], 1):
        lines.append(f"    {i}. {b['part']} [{b['kind']}] {b['time_s'] * 1e3:.2f} ms "
                     f"({b['share']:.0%}; fwd {b['fwd_s'] * 1e3:.2f}, bwd {b['bwd_s'] * 1e3:.2f};"
                     f" {b['bound']}-bound, {b['ops']} ops; largest {b['largest']})")
    if "scaling_v5e" in r:
        for s in r["scaling_v5e"]["per_chip_batch"]:
            eff = ", ".join(f"{row['chips']}: {row['efficiency']:.1%} "
                            f"({row['efficiency_with_sync']:.1%})" for row in s["rows"])
            lines.append(f"  v5e weak scaling at {s['per_chip_batch']}/chip "
                         f"({s['gradient_bytes'] / 1e6:.1f} MB gradients; in brackets with "
                         f"{r['scaling_v5e']['batch_reductions']} BatchNorm sync all-reduces): "
                         f"{eff}")
    for f in r["failures"]:
        lines.append(f"  FAILED: {f}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lower",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--platform", required=True, choices=PLATFORMS)
    ap.add_argument("--program", required=True, choices=PROGRAMS)
    ap.add_argument("--dtype", required=True, choices=DTYPES)
    ap.add_argument("--precision", default="highest", choices=PRECISIONS)
    ap.add_argument("--devices", type=int, default=8,
                    help="virtual CPU devices the train step is sharded over (default 8)")
    ap.add_argument("--mlir", help="write the StableHLO text here")
    ap.add_argument("--json", required=True, help="write the report here")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip compiling for CPU (XLA's fused bytes and memory figures)")
    ap.add_argument("--remat_decoder", type=int, default=0,
                    help="runtime.remat_decoder: the per-query decoder in chunks of this many "
                         "queries, recomputed in the backward (memory for time; 0: off)")
    ap.add_argument("--s2d_min_kernel", type=int, default=0,
                    help="runtime.s2d_min_kernel: multi-scale convs with kernels at least "
                         "this large on 4x4 pixel blocks (0: never)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny model and shapes (batch 8, LR 12, 64 queries; for tests)")
    args = ap.parse_args(argv)
    if args.devices < 1:
        ap.error(f"--devices must be >= 1, got {args.devices}")
    batch = 8 if args.tiny else 32
    if args.program.startswith("train") and batch % args.devices:
        ap.error(f"--devices {args.devices} does not divide the global batch {batch}")
    return args


def _set_device_count(n: int) -> None:
    """Virtual CPU devices: XLA reads the flag once, when jax initialises."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if "jax" not in sys.modules:
        _set_device_count(args.devices)
    report, mlir = build_report(args)
    if args.mlir:
        with open(args.mlir, "w") as f:
            f.write(mlir)
    print(summary(report))
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
