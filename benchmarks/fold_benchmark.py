"""What re-parameterisation buys: parameters and inference time, before/after `fold`.

    python -m benchmarks.fold_benchmark [--encoder NAME] [--lr 48] [--scale 4]

--encoder: any registered encoder (msit_jax.models.encoders.ENCODERS), default
edsr-baseline.

Paper-size model with random weights (timings do not depend on the values).
Prints the parameter count (learnable + frozen + BatchNorm statistics) and the
median wall time of the encoder alone and of a full `upscale`, warm-up excluded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from msit_jax import model_config

from msit_jax.inference.engine import Engine
from msit_jax.models import reparam
from msit_jax.models.encoders import ENCODERS
from msit_jax.models.random_init import random_variables


def median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="edsr-baseline", choices=tuple(ENCODERS))
    p.add_argument("--lr", type=int, default=48, help="LR side length")
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    cfg = model_config(args.encoder, "rim")
    variables = random_variables(cfg)
    fcfg, fvars = reparam.fold(cfg, variables)
    lr = np.random.RandomState(0).rand(args.lr, args.lr, 3).astype(np.float32)
    out = round(args.lr * args.scale)

    rows = []
    for name, c, v in [("RIM (unfolded)", cfg, variables), ("folded", fcfg, fvars)]:
        up = Engine(c, v)
        enc = median_time(lambda: jax.block_until_ready(up.features(lr)), args.repeats)
        full = median_time(lambda: up(lr, (out, out)), max(1, args.repeats // 2))
        n_learn = reparam.count_params({"params": v["params"]})
        rows.append((name, reparam.count_params(v), n_learn, enc, full))

    print(f"device: {jax.devices()[0].device_kind}, {args.encoder}, LR {args.lr}x{args.lr} "
          f"-> {out}x{out} (x{args.scale:g})")
    print("| model | values (all) | learnable | encoder (s) | upscale (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, n_all, n_learn, enc, full in rows:
        print(f"| {name} | {n_all:,} | {n_learn:,} | {enc:.3f} | {full:.2f} |")
    print(f"encoder speed-up x{rows[0][3] / rows[1][3]:.2f}, upscale speed-up "
          f"x{rows[0][4] / rows[1][4]:.2f}")


if __name__ == "__main__":
    main()
