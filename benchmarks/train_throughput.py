"""Train-step throughput of MSIT: steps/s and HR pixels/s (queried pixels, batch x sample_q).

    python -m benchmarks.train_throughput                       # paper EDSR, stage 2 (RIM), batch 4
    python -m benchmarks.train_throughput --conv plain          # stage 1
    python -m benchmarks.train_throughput --batch 32 --encoder rdn   # e.g. on a GPU

--encoder: any registered encoder (msit_jax.models.encoders.ENCODERS).

Batches follow the training protocol (48x48 LR, 2304 queries, one scale per
batch) built from scikit-image's images; the step is the jitted, data-parallel
train step of `msit_jax.training` over every local device. Prints the compile
time, the host time to build one batch, and the steady-state step rate.
"""

from __future__ import annotations

import argparse
import time

import jax

from msit_jax.models.encoders import ENCODERS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="edsr-baseline", choices=tuple(ENCODERS))
    ap.add_argument("--conv", default="rim", choices=("rim", "plain"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--inp_size", type=int, default=48)
    ap.add_argument("--sample_q", type=int, default=2304)
    ap.add_argument("--precision", default="highest", choices=("highest", "high", "default"))
    args = ap.parse_args()

    from msit_jax import console
    from msit_jax.models.config import model_config
    from msit_jax.data.pipeline import to_global
    from msit_jax.data.protocol import Batch, BatchPlanner, Protocol, collate, make_example
    from msit_jax.data.sources import EmbeddedSource
    from msit_jax.models.model import build_model, dummy_inputs
    from msit_jax.models.reparam import count_params
    from msit_jax.ops.runtime import RuntimeOptions
    from msit_jax.training.config import base_config
    from msit_jax.training.loop import jit_create_state
    from msit_jax.training.state import init_variables, make_optimizer
    from msit_jax.training.step import batch_sharding, jit_train_step, make_mesh, to_host

    cfg = base_config()
    cfg.model = model_config(args.encoder, conv=args.conv)
    cfg.runtime.precision = args.precision
    cfg.batch_size = args.batch
    model = build_model(cfg.model, RuntimeOptions.from_config(cfg.runtime))
    mesh = make_mesh()
    tx, schedule = make_optimizer(cfg)

    p = Protocol(args.inp_size, args.sample_q, 1.0, 4.0, True, radius=cfg.model.radius)
    src = EmbeddedSource("train")
    planner = BatchPlanner(src.sizes, args.batch, seed=0, protocol=p)

    def host_batch(step):
        idx, _, hr = planner.plan(step)
        return collate([make_example(src[int(i)], hr, p, planner.example_rng(step, r))
                        for r, i in enumerate(idx)])

    t = time.perf_counter()
    host = [host_batch(s) for s in range(args.steps + 1)]
    t_host = (time.perf_counter() - t) / len(host)
    batches = [Batch.from_flat(to_global(b, batch_sharding(mesh))) for b in host]

    t = time.perf_counter()
    variables = to_host(init_variables(model, jax.random.PRNGKey(0),
                                       dummy_inputs(cfg.model, (args.inp_size, args.inp_size),
                                                    args.sample_q)))
    state = jit_create_state(tx, mesh)(variables)
    t_init = time.perf_counter() - t
    step_fn = jit_train_step(model, tx, schedule, mesh, seed=cfg.seed)

    t = time.perf_counter()
    state, m = step_fn(state, batches[0])
    jax.block_until_ready(m)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    for b in batches[1:]:
        state, m = step_fn(state, b)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t

    sps = args.steps / dt
    dev = jax.devices()[0]
    print(f"model: MSIT {args.encoder} conv={args.conv} ({count_params(state.params):,} "
          f"trainable, {count_params(state.frozen):,} frozen), precision={args.precision}")
    print(f"devices: {jax.device_count()} x {dev.platform} ({dev.device_kind})")
    print(f"batch {args.batch} x {args.sample_q} queries, LR "
          f"{console.format_hw((args.inp_size, args.inp_size))} (H x W)")
    print(f"host batch build: {t_host * 1e3:.1f} ms/batch (one process, no workers)")
    print(f"init: {t_init:.1f} s; first step (compile + run): {t_first:.1f} s; "
          f"loss {float(m['loss']):.4f}")
    print(f"train step: {dt / args.steps * 1e3:.0f} ms -> {sps:.3f} steps/s, "
          f"{sps * args.batch * args.sample_q:,.0f} HR pixels/s")


if __name__ == "__main__":
    main()
