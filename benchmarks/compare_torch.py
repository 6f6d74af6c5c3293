"""Side-by-side speed and memory: msit-jax vs the official PyTorch MSIT.

    python benchmarks/compare_torch.py --reference /path/to/MSIT [--device cpu|gpu] [--json OUT]
    python benchmarks/compare_torch.py            # ours alone

The official model is imported from the user's checkout at run time (its
`models` package; `.cuda()` patched to a no-op on CPU; minimal stand-ins for
timm's three helpers if timm is missing). Nothing of it is copied here. Both
models get the same random paper-size EDSR-baseline RIM weights (RIM base
kernels and BatchNorm statistics randomised); outputs are compared first.

Timings alternate the two implementations in one process, warm-up excluded,
median of --repeats. Ours runs the deployment path: `reparam.fold` + `upscale`
(its `auto` decoder choice). GFLOP/s use the nominal FLOPs (benchmarks/flops.py);
the roofline is a measured jitted float32 2048^3 matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops as flop_model  # noqa: E402

from msit_jax import geometry, inference, model_config, reparam  # noqa: E402
from msit_jax.testing import random_variables  # noqa: E402
from msit_jax.torch_io import variables_to_state_dict  # noqa: E402

INFER_CASES = [("x4 64->256", 64, 256), ("x12 32->384", 32, 384), ("x2.5 96->240", 96, 240)]
TRAIN = dict(batch=4, lr_size=48, queries=2304)
MEMORY_CASE = (128, 1024)  # x8 of a 128^2 input


# --- the official model -----------------------------------------------------

def _timm_standins() -> None:
    """timm's DropPath / to_2tuple / trunc_normal_, only if timm is not installed."""
    try:
        import timm.models.layers  # noqa: F401
        return
    except ImportError:
        pass
    import torch

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = lambda p=0.0: torch.nn.Identity()
    layers.to_2tuple = lambda x: (x, x)
    layers.trunc_normal_ = lambda t, mean=0.0, std=1.0: torch.nn.init.trunc_normal_(t, mean, std)
    timm = types.ModuleType("timm")
    timm.models = types.ModuleType("timm.models")
    timm.models.layers = layers
    sys.modules.update({"timm": timm, "timm.models": timm.models, "timm.models.layers": layers})


def official_model(reference: str, device: str, state_dict: dict):
    import torch
    import yaml

    if device == "cpu":
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
    _timm_standins()
    sys.path.insert(0, os.path.abspath(reference))
    import models  # the official package

    with open(os.path.join(reference, "configs/train/train_edsr_baseline_MSIT_rim.yaml")) as f:
        spec = yaml.safe_load(f)["model"]
    model = models.make(spec)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False)
    missing = set(model.state_dict()) - set(state_dict)
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    return model.to("cuda" if device == "gpu" else "cpu")


def torch_coords(h: int, w: int, device):
    import torch

    return torch.from_numpy(geometry.make_coord((h, w)))[None].to(device)


def theirs_upscale(model, lr: np.ndarray, out_hw: tuple[int, int], device):
    import torch

    inp = (torch.from_numpy(lr).permute(2, 0, 1)[None].to(device) - 0.5) / 0.5
    cell = torch.tensor([[2.0 / out_hw[0], 2.0 / out_hw[1]]], device=device)
    with torch.no_grad():
        pred = model.chop_forward(inp, [torch_coords(*out_hw, device)], cell, 30000)
        if device != "cpu":
            torch.cuda.synchronize()
    return (pred * 0.5 + 0.5)[0].reshape(*out_hw, 3).cpu().numpy()


def theirs_train_step(model, opt, batch, device):
    import torch

    model.train()
    inp = torch.from_numpy(batch["inp"]).permute(0, 3, 1, 2).to(device)
    coords = [torch_coords(TRAIN["lr_size"] * 2, TRAIN["lr_size"] * 2, device)]
    pred = model(inp, coords, torch.from_numpy(batch["coord"]).to(device),
                 torch.from_numpy(batch["cell"]).to(device))[-1]
    loss = torch.nn.functional.l1_loss(pred, torch.from_numpy(batch["gt"]).to(device))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    model.eval()
    return float(loss)


# --- ours ---------------------------------------------------------------------

def ours_train_step(cfg, variables):
    """A jitted Adam step on our model, as train.py runs it."""
    from msit_jax.model import build_model
    from msit_jax.training.state import create_state
    from msit_jax.training.step import jit_train_step, make_mesh, replicated
    import optax

    model = build_model(cfg)
    schedule = optax.constant_schedule(1e-4)
    tx = optax.adam(schedule)
    mesh = make_mesh()
    step = jit_train_step(model, tx, schedule, mesh)
    # Placed as the step returns it, so the step compiles once (as in train.py).
    state = jax.jit(lambda v: create_state(v, tx), out_shardings=replicated(mesh))(variables)
    return step, state


def train_batch(cfg, seed: int = 0) -> dict:
    rs = np.random.RandomState(seed)
    b, n, q = TRAIN["batch"], TRAIN["lr_size"], TRAIN["queries"]
    hr = 2 * n
    coord = np.stack([geometry.make_coord((hr, hr)).reshape(-1, 2)[rs.choice(hr * hr, q, False)]
                      for _ in range(b)])
    g = geometry.query_geometry(coord, (n, n), cfg.radius)
    cell = np.tile(np.array([[2.0 / hr, 2.0 / hr]], np.float32), (b, 1))
    return dict(inp=rs.uniform(-1, 1, (b, n, n, 3)).astype(np.float32), coord=g.coord,
                key_idx=g.key_idx, rel=g.rel, rel_cell=cell * np.float32(n), cell=cell,
                gt=rs.uniform(-1, 1, (b, q, 3)).astype(np.float32))


# --- measurement helpers --------------------------------------------------------

def matmul_roofline(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32))
    f = jax.jit(lambda x: jnp.dot(x, x, precision=jax.lax.Precision.HIGHEST))
    f(a).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def alternate(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, interleaved; the first round is warm-up."""
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory_child(impl: str, reference: str | None, device: str) -> None:
    """Run one x8 upscale of a 128^2 input in this (fresh) process and print peak memory."""
    cfg = model_config()
    variables = random_variables(cfg, 0)
    lr = np.random.RandomState(1).rand(MEMORY_CASE[0], MEMORY_CASE[0], 3).astype(np.float32)
    t = time.perf_counter()
    if impl == "ours":
        fcfg, fvars = reparam.fold(cfg, variables)
        inference.Upscaler(fcfg, fvars)(lr, (MEMORY_CASE[1],) * 2)
        gpu = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) \
            if device == "gpu" else 0
    else:
        import torch

        model = official_model(reference, device, variables_to_state_dict(variables, cfg)).eval()
        theirs_upscale(model, lr, (MEMORY_CASE[1],) * 2, "cuda" if device == "gpu" else "cpu")
        gpu = torch.cuda.max_memory_allocated() if device == "gpu" else 0
    print(json.dumps({"rss_bytes": peak_rss_bytes(), "gpu_bytes": gpu,
                      "seconds": time.perf_counter() - t}))


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss, which Linux
    carries over from the parent across fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(impl: str, reference: str | None, device: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory_child", impl, "--device", device]
    if reference:
        cmd += ["--reference", reference]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- main -------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="path to a checkout of the official MSIT code")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--json", help="write all figures to this file")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="our compute dtype (bfloat16: float32 parameters and accumulation)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", default="infer,train,memory",
                   help="comma-separated subset of infer, train, memory")
    p.add_argument("--quick", action="store_true", help="tiny inference cases (harness smoke test)")
    p.add_argument("--_memory_child", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory_child:
        return peak_memory_child(args._memory_child, args.reference, args.device)

    tdev = "cuda" if args.device == "gpu" else "cpu"
    cases = set(args.cases.split(","))
    cfg = model_config()
    cfg.dtype = args.dtype
    variables = random_variables(cfg, 0)
    fcfg, fvars = reparam.fold(cfg, variables)
    up = inference.Upscaler(fcfg, fvars)
    theirs = None
    if args.reference:
        theirs = official_model(args.reference, args.device,
                                variables_to_state_dict(variables, cfg)).eval()
        lr = np.random.RandomState(2).rand(24, 20, 3).astype(np.float32)
        ref = theirs_upscale(theirs, lr, (96, 80), tdev)
        err = float(np.abs(up(lr, (96, 80), clamp=False) - ref).max())
        print(f"agreement (x4, 24x20 input, ours folded+grid vs official): max abs error {err:.2e}")

    roof = matmul_roofline()
    results = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
               "ours_dtype": args.dtype,
               "matmul_gflops": roof, "date": time.strftime("%Y-%m-%d"), "cases": {}}
    print(f"matmul roofline (jitted fp32 2048^3): {roof:.1f} GFLOP/s")

    rows = []
    infer_cases = [("x4 16->64", 16, 64)] if args.quick else INFER_CASES
    for name, n, out in (infer_cases if "infer" in cases else []):
        lr = np.random.RandomState(n).rand(n, n, 3).astype(np.float32)
        fns = {"ours": lambda: up(lr, (out, out))}
        if theirs is not None:
            fns["theirs"] = lambda: theirs_upscale(theirs, lr, (out, out), tdev)
        t = alternate(fns, args.repeats)
        fl = flop_model.inference_flops(cfg, (n, n), (out, out))
        rows.append((f"inference {name}", t, fl))

    if "train" in cases:
        batch = train_batch(cfg)
        step, state = ours_train_step(cfg, variables)
        dev_batch = {k: jnp.asarray(batch[k]) for k in ("inp", "coord", "key_idx", "rel",
                                                       "rel_cell", "gt")}
        holder = {"state": state}

        def ours_step():
            holder["state"], m = step(holder["state"], dev_batch)
            jax.block_until_ready(m["loss"])

        fns = {"ours": ours_step}
        if theirs is not None:
            import torch

            opt = torch.optim.Adam(theirs.parameters(), lr=1e-4)
            fns["theirs"] = lambda: theirs_train_step(theirs, opt, batch, tdev)
        t = alternate(fns, args.repeats)
        rows.append(("train step b4 48^2 2304q", t,
                     flop_model.train_step_flops(cfg, **TRAIN)))

    print()
    print("| case | ours (s) | official (s) | speed-up | ours GFLOP/s (nominal) | of roofline |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, fl in rows:
        ours_t, theirs_t = t["ours"], t.get("theirs")
        gfs = fl / ours_t / 1e9
        ratio = f"x{theirs_t / ours_t:.2f}" if theirs_t else "-"
        th = f"{theirs_t:.2f}" if theirs_t else "-"
        print(f"| {name} | {ours_t:.2f} | {th} | {ratio} | {gfs:.1f} | {gfs / roof:.0%} |")
        results["cases"][name] = {"ours_s": ours_t, "official_s": theirs_t,
                                  "nominal_gflop": fl / 1e9, "ours_gflops": gfs}

    if "memory" in cases:
        mem = {"ours": measure_memory("ours", None, args.device)}
        if args.reference:
            mem["theirs"] = measure_memory("theirs", args.reference, args.device)
        key = "gpu_bytes" if args.device == "gpu" else "rss_bytes"
        line = " | ".join(f"{k} {v[key] / 2**30:.2f} GiB ({v['seconds']:.0f} s)" for k, v in mem.items())
        print(f"\npeak memory, x8 upscale of 128^2 ({'device' if args.device == 'gpu' else 'RSS'}): {line}")
        results["memory_x8_128"] = mem

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
