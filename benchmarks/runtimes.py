"""JAX vs onnxruntime on the same folded model, interleaved in one process (CPU).

    python -m benchmarks.runtimes [--encoder edsr-baseline] [--repeats 5] [--json OUT]
    python -m benchmarks.runtimes --quick        # tiny model, one repeat (a smoke test)

The paper-size model (random weights, RIM and BatchNorm folded: what both
runtimes deploy) runs as `msit_jax.inference.Engine` (JAX on the CPU, its
`auto` decoder and each decoder forced) and as its ONNX graph
(`msit_jax.export.onnx_graph.build_graph`, clamp off) in onnxruntime's CPU provider.
Cases: x4 64^2 -> 256^2 and x2.5 96^2 -> 240^2. Every callable runs once per
round, rounds alternate the runtimes so load drift hits all alike; the first
round is warm-up (compilation, session set-up), and each case also counts the
rounds in which JAX auto beat onnxruntime. Figures: median wall seconds
and median process CPU-seconds (every thread of the process; the steadier
figure on a shared machine). The JAX rows also split the encoder from the
decoder. Before timing, each case's outputs are compared (max abs, image space).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np
import onnx

from msit_jax import geometry, model_config, tiny_model_config
from msit_jax.inference.engine import METHODS, Engine
from msit_jax.export import onnx_graph, onnx_runner
from msit_jax.models import reparam
from msit_jax.models.random_init import random_variables

CASES = (("x4 64->256", (64, 64), (256, 256)), ("x2.5 96->240", (96, 96), (240, 240)))
QUICK_CASES = (("x4 12->48", (12, 12), (48, 48)), ("x2.5 16->40", (16, 16), (40, 40)))


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """{name: {'wall': median s, 'cpu': median CPU-s, 'runs': [wall s]}}; one warm-up round."""
    walls: dict[str, list] = {k: [] for k in fns}
    cpus: dict[str, list] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            if r:
                walls[k].append(time.perf_counter() - t)
                cpus[k].append(time.process_time() - c)
    return {k: dict(wall=statistics.median(walls[k]), cpu=statistics.median(cpus[k]),
                    runs=[round(t, 3) for t in walls[k]]) for k in fns}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="edsr-baseline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny model, one repeat")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        cfg, cases, repeats = tiny_model_config(args.encoder), QUICK_CASES, 1
    else:
        cfg, cases, repeats = model_config(args.encoder, "rim"), CASES, args.repeats
    fcfg, fvars = reparam.fold(cfg, random_variables(cfg, 0))
    path = os.path.join(tempfile.mkdtemp(prefix="msit_runtimes_"), "model.onnx")
    onnx.save(onnx_graph.build_graph(fcfg, fvars, clamp=False), path)
    ort_up = onnx_runner.load(path)
    ups = {m: Engine(fcfg, fvars, method=m) for m in METHODS}
    print(f"device: {jax.devices()[0].device_kind}, {args.encoder}, "
          f"{'tiny' if args.quick else 'paper-size'} model, folded; repeats {repeats}")
    report: dict = dict(encoder=args.encoder, quick=args.quick, cases={})
    rs = np.random.RandomState(0)
    for name, lr_hw, out_hw in cases:
        lr = rs.rand(*lr_hw, 3).astype(np.float32)
        ref = ups["query"](lr, out_hw, clamp=False)
        ties = geometry.tie_mask(out_hw, lr_hw)
        agree = {}
        for label, fn in (("grid", lambda: ups["grid"](lr, out_hw, clamp=False)),
                          ("onnxruntime", lambda: ort_up.upscale_array(lr, out_hw, clamp=False))):
            err = np.abs(fn() - ref).max(-1)
            agree[label] = float(err[~ties].max())
        auto = "grid" if ups["auto"].uses_grid(lr_hw, out_hw) else "query"
        up = ups["auto"]
        inp, feats = up.features(lr)
        jax.block_until_ready(feats)
        fns = {
            "JAX auto": lambda: up(lr, out_hw),
            "onnxruntime": lambda: ort_up.upscale_array(lr, out_hw),
            "JAX grid": lambda: ups["grid"](lr, out_hw),
            "JAX query": lambda: ups["query"](lr, out_hw),
            "JAX encoder": lambda: jax.block_until_ready(up.features(lr)),
            "JAX grid decoder": lambda: ups["grid"]._decode_grid(inp, feats, out_hw, False),
            "JAX query decoder": lambda: ups["query"]._decode_queries(inp, feats, out_hw, False),
        }
        res = alternate(fns, repeats)
        report["cases"][name] = dict(auto=auto, max_abs_vs_query_non_tie=agree, timings=res)
        ort = res["onnxruntime"]
        print(f"\n{name} (auto decoder: {auto}; max abs vs the query decoder, non-tie pixels: "
              f"grid {agree['grid']:.1e}, onnxruntime {agree['onnxruntime']:.1e})")
        print("| runner | wall s | CPU-s | onnxruntime / runner (CPU-s) |")
        print("|---|---:|---:|---:|")
        for k, v in res.items():
            print(f"| {k} | {v['wall']:.2f} | {v['cpu']:.2f} | {ort['cpu'] / v['cpu']:.2f} |")
        # Rounds alternate the runners, so a round's pair saw the same machine load.
        wins = sum(a < b for a, b in zip(res["JAX auto"]["runs"], ort["runs"]))
        report["cases"][name]["jax_auto_faster_rounds"] = [wins, len(ort["runs"])]
        print(f"JAX auto faster than onnxruntime (wall) in {wins} of {len(ort['runs'])} rounds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
