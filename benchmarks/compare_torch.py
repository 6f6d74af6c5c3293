"""Side-by-side speed and memory: msit-jax vs the official PyTorch MSIT.

    python -m benchmarks.compare_torch --reference /path/to/MSIT [--device cpu|gpu] [--json OUT]
        [--dtype float32|bfloat16] [--precision highest|high|default] [--torch_tf32 off|on]
    python -m benchmarks.compare_torch            # ours alone

The official model is imported from the user's checkout at run time (its
`models` package; `.cuda()` patched to a no-op on CPU; minimal stand-ins for
timm's three helpers if timm is missing). Nothing of it is copied here. Both
models get the same random paper-size EDSR-baseline RIM weights (RIM base
kernels and BatchNorm statistics randomised); outputs are compared first.

Before timing, the outputs are compared (x4 of a 24x20 input, both of our
decoders vs the official `chop_forward`, image space [0, 1]): max abs error
<= 1e-4 for float32 / precision 'highest', <= 2e-2 (stated, looser) for
bfloat16 or a lower precision. The script exits 1 when that check fails (after
the timings and the JSON are written). On GPU the agreement check always runs
torch with TF32 off (torch's cuDNN convolutions default to TF32); the timings
use `--torch_tf32` (default off, like for like with our float32 'highest'),
and the JSON records which setting each figure used.

`--device gpu` asserts that JAX runs on the GPU and torch sees CUDA;
`--device cpu` keeps JAX on the CPU too. JAX's GPU preallocation is turned
off so both libraries can share the card and peak memory means something.
The train batch is rounded up to a multiple of the device count (the step
shards it across all devices).

Timings alternate the two implementations in one process, warm-up excluded,
median of --repeats. Ours runs the deployment path: `reparam.fold` + `upscale`
(its `auto` decoder choice). GFLOP/s use the nominal FLOPs (benchmarks/flops.py);
the roofline is a measured jitted float32 2048^3 matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from typing import Any, Callable, Optional

# Before jax is imported: without it JAX reserves 75% of GPU memory at start,
# which leaves torch too little and makes memory figures meaningless.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import flops as flop_model  # noqa: E402

from msit_jax import geometry, model_config

from msit_jax.inference.engine import Engine
from msit_jax.data.protocol import Batch  # noqa: E402
from msit_jax.models import reparam  # noqa: E402
from msit_jax.ops.runtime import DTYPES, PRECISIONS, RuntimeOptions  # noqa: E402
from msit_jax.models.random_init import random_variables  # noqa: E402
from msit_jax.io.torch_io import variables_to_state_dict  # noqa: E402

INFER_CASES = [("x4 64->256", 64, 256), ("x12 32->384", 32, 384), ("x2.5 96->240", 96, 240)]
TRAIN = dict(batch=4, lr_size=48, queries=2304)
MEMORY_CASE = (128, 1024)  # x8 of a 128^2 input
# The official training config whose model the comparisons build (paper-size
# EDSR-baseline with RIM convs; it matches msit_jax.model_config()).
OFFICIAL_YAML = "configs/train/train_edsr_baseline_MSIT_rim.yaml"
AGREEMENT_CASE = ((24, 20), (96, 80))  # x4, input (H, W) -> output (H, W)
# Agreement with the official model, max abs error in image space [0, 1].
# float32 'highest' on both sides: the same sums in another order (measured
# ~1e-7 on CPU). bf16 operands or TF32/bf16-pass products: a stated, looser bound.
AGREEMENT_TOL_F32 = 1e-4
AGREEMENT_TOL_REDUCED = 2e-2


def agreement_tolerance(dtype: str, precision: str) -> float:
    """The max abs error (image space) allowed between ours and the official model."""
    exact = dtype == "float32" and precision == "highest"
    return AGREEMENT_TOL_F32 if exact else AGREEMENT_TOL_REDUCED


def train_sizes(n_devices: Optional[int] = None) -> dict:
    """TRAIN with the batch rounded up to a multiple of the device count: the
    jitted step shards the batch over every device (a 1-D 'data' mesh)."""
    n = jax.device_count() if n_devices is None else n_devices
    return dict(TRAIN, batch=-(-TRAIN["batch"] // n) * n)


# --- devices ------------------------------------------------------------------

def use_device(device: str, need_torch: bool = True) -> None:
    """Point JAX at `device` ('cpu' | 'gpu') and check it took, with a clear error;
    with need_torch (the official model runs), also that torch sees CUDA on 'gpu'.

    Must run before anything has used a JAX backend (jax_platforms is read once)."""
    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    backend = jax.default_backend()
    if backend != device:
        hint = ("install a CUDA jaxlib (pip install -U 'jax[cuda12]') and check nvidia-smi"
                if device == "gpu" else "set JAX_PLATFORMS=cpu")
        raise SystemExit(f"--device {device}, but JAX's default backend is {backend!r} "
                         f"({jax.devices()[0].device_kind}): {hint}")
    if device == "gpu" and need_torch:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device gpu, but torch.cuda.is_available() is False: install "
                             "a CUDA build of PyTorch to run the official model on the GPU")


def host_cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_names(torch_device: Optional[str] = None) -> dict:
    """What ran what: JAX's devices, torch's device (if used) and the host CPU."""
    out = {"jax_backend": jax.default_backend(),
           "jax": [d.device_kind for d in jax.devices()], "host_cpu": host_cpu_name()}
    if torch_device == "cuda":
        import torch

        out["torch"] = torch.cuda.get_device_name(0)
    elif torch_device == "cpu":
        out["torch"] = "cpu: " + out["host_cpu"]
    return out


def torch_tf32(enabled: "Optional[bool | dict]" = None) -> dict:
    """Set and return torch's TF32 switches for CUDA matmuls and cuDNN convolutions.

    enabled: None (only read), a bool for both, or {'matmul': bool, 'cudnn': bool}
    (e.g. a dict this function returned). torch's defaults: matmul off, cuDNN on."""
    import torch

    if enabled is not None:
        flags = enabled if isinstance(enabled, dict) else {"matmul": enabled, "cudnn": enabled}
        torch.backends.cuda.matmul.allow_tf32 = bool(flags["matmul"])
        torch.backends.cudnn.allow_tf32 = bool(flags["cudnn"])
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32)}


# --- the official model -----------------------------------------------------

def timm_standins() -> None:
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


def official_model(reference: str, device: str, state_dict: dict) -> Any:
    """The official `models.make` model of the EDSR-baseline RIM training YAML, with
    `state_dict` (numpy) loaded, on 'cpu' or 'gpu'."""
    import torch
    import yaml

    if device == "cpu":
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
    timm_standins()
    sys.path.insert(0, os.path.abspath(reference))
    import models  # the official package

    with open(os.path.join(reference, OFFICIAL_YAML)) as f:
        spec = yaml.safe_load(f)["model"]
    model = models.make(spec)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False)
    missing = set(model.state_dict()) - set(state_dict)
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    return model.to("cuda" if device == "gpu" else "cpu")


def torch_coords(h: int, w: int, device: Any) -> Any:
    """(1, h*w, 2) torch tensor of HR pixel-centre coordinates."""
    import torch

    return torch.from_numpy(geometry.make_coord((h, w)))[None].to(device)


def theirs_upscale(model: Any, lr: np.ndarray, out_hw: tuple[int, int], device: Any
                   ) -> np.ndarray:
    """The official model's `chop_forward`: lr (H, W, 3) in [0, 1] -> (out_h, out_w, 3),
    unclamped, image space."""
    import torch

    inp = (torch.from_numpy(lr).permute(2, 0, 1)[None].to(device) - 0.5) / 0.5
    cell = torch.tensor([[2.0 / out_hw[0], 2.0 / out_hw[1]]], device=device)
    with torch.no_grad():
        pred = model.chop_forward(inp, [torch_coords(*out_hw, device)], cell, 30000)
        if device != "cpu":
            torch.cuda.synchronize()
    return (pred * 0.5 + 0.5)[0].reshape(*out_hw, 3).cpu().numpy()


def theirs_train_step(model: Any, opt: Any, batch: dict, device: Any) -> float:
    """One official Adam step on a `train_batch` batch; returns the loss."""
    import torch

    model.train()
    inp = torch.from_numpy(batch["inp"]).permute(0, 3, 1, 2).to(device)
    hr = batch["inp"].shape[1] * 2
    coords = [torch_coords(hr, hr, device)]
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

def ours_train_step(cfg, variables: dict, runtime: Optional[RuntimeOptions] = None
                    ) -> tuple[Callable, Any]:
    """A jitted Adam step on our model, as train.py runs it: (step, initial state).
    The batch passed to step must be a multiple of jax.device_count()."""
    from msit_jax.models.model import build_model
    from msit_jax.training.state import create_state
    from msit_jax.training.step import jit_train_step, make_mesh, replicated
    import optax

    model = build_model(cfg, runtime)
    schedule = optax.constant_schedule(1e-4)
    tx = optax.adam(schedule)
    mesh = make_mesh()
    step = jit_train_step(model, tx, schedule, mesh)
    # Placed as the step returns it, so the step compiles once (as in train.py).
    state = jax.jit(lambda v: create_state(v, tx), out_shardings=replicated(mesh))(variables)
    return step, state


def train_batch(cfg, seed: int = 0, batch: Optional[int] = None,
                lr_size: Optional[int] = None, queries: Optional[int] = None) -> dict:
    """A random training batch (numpy), flat (`Batch.to_flat`): inp (B, n, n, 3) and
    `queries` random HR pixels of an x2 target, with their geometry, rel_cell (B, 2)
    and gt (B, Q, 3); plus cell (B, 2), the official model's input. Sizes default to
    `train_sizes()`."""
    sizes = train_sizes()
    b = sizes["batch"] if batch is None else batch
    n = sizes["lr_size"] if lr_size is None else lr_size
    q = sizes["queries"] if queries is None else queries
    rs = np.random.RandomState(seed)
    hr = 2 * n
    coord = np.stack([geometry.make_coord((hr, hr)).reshape(-1, 2)[rs.choice(hr * hr, q, False)]
                      for _ in range(b)])
    cell = np.tile(np.array([[2.0 / hr, 2.0 / hr]], np.float32), (b, 1))
    g = geometry.query_geometry(coord, (n, n), cfg.radius, cell * np.float32(n))
    inp = rs.uniform(-1, 1, (b, n, n, 3)).astype(np.float32)
    gt = rs.uniform(-1, 1, (b, q, 3)).astype(np.float32)
    return dict(Batch(inp, g, gt).to_flat(), cell=cell)


# --- measurement helpers --------------------------------------------------------

def matmul_roofline(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a jitted float32 (precision HIGHEST) n^3 matmul on JAX's default device."""
    a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32))
    f = jax.jit(lambda x: jnp.dot(x, x, precision=jax.lax.Precision.HIGHEST))
    f(a).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def alternate(fns: dict, repeats: int, cpu: Optional[dict] = None) -> dict:
    """Median seconds of each callable, interleaved; the first round is warm-up.

    cpu: if given, filled with each callable's median process CPU-seconds (all threads;
    on a shared machine the CPU work is steadier than the wall time, which depends on
    how often the other jobs preempt each library's worker threads)."""
    times = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            if r:
                times[k].append(time.perf_counter() - t)
                cpus[k].append(time.process_time() - c)
    if cpu is not None:
        cpu.update({k: statistics.median(v) for k, v in cpus.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory_child(impl: str, reference: Optional[str], device: str,
                      runtime: RuntimeOptions) -> None:
    """Run one x8 upscale of a 128^2 input in this (fresh) process and print peak memory.
    runtime: our execution options (dtype, precision); unused for the official model."""
    cfg = model_config()
    variables = random_variables(cfg, 0)
    lr = np.random.RandomState(1).rand(MEMORY_CASE[0], MEMORY_CASE[0], 3).astype(np.float32)
    t = time.perf_counter()
    if impl == "ours":
        fcfg, fvars = reparam.fold(cfg, variables)
        Engine(fcfg, fvars, runtime=runtime)(lr, (MEMORY_CASE[1],) * 2)
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


def measure_memory(impl: str, reference: Optional[str], device: str,
                   runtime: RuntimeOptions) -> dict:
    """Peak memory of one x8 upscale, measured in a fresh process (so nothing this
    process allocated counts): {'rss_bytes', 'gpu_bytes', 'seconds'}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory_child", impl, "--device", device,
           "--dtype", runtime.dtype, "--precision", runtime.precision]
    if reference:
        cmd += ["--reference", reference]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- main -------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="path to a checkout of the official MSIT code")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--json", help="write all figures to this file")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="our compute dtype (bfloat16: float32 parameters and accumulation)")
    p.add_argument("--precision", choices=PRECISIONS, default="highest",
                   help="our matmul/conv precision ('highest': float32 products)")
    p.add_argument("--torch_tf32", choices=("off", "on"), default="off",
                   help="TF32 for the official model's timings on GPU (matmul and cuDNN); "
                        "off is like for like with our float32 'highest'. The agreement "
                        "check always runs with TF32 off.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", default="infer,train,memory",
                   help="comma-separated subset of infer, train, memory")
    p.add_argument("--quick", action="store_true", help="tiny inference cases (harness smoke test)")
    p.add_argument("--_memory_child", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    args = p.parse_args()
    use_device(args.device, need_torch=bool(args.reference))
    runtime = RuntimeOptions(precision=args.precision, dtype=args.dtype)
    if args._memory_child:
        peak_memory_child(args._memory_child, args.reference, args.device, runtime)
        return 0

    tdev = "cuda" if args.device == "gpu" else "cpu"
    cases = set(args.cases.split(","))
    unknown = cases - {"infer", "train", "memory"}
    if unknown:
        p.error(f"unknown --cases {sorted(unknown)}; choose from infer, train, memory")
    cfg = model_config()
    variables = random_variables(cfg, 0)
    fcfg, fvars = reparam.fold(cfg, variables)
    up = Engine(fcfg, fvars, runtime=runtime)
    results = {"devices": device_names(tdev if args.reference else None),
               "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
               "ours_dtype": args.dtype, "ours_precision": args.precision,
               "date": time.strftime("%Y-%m-%d"), "cases": {}}
    failed = []
    theirs = None
    if args.reference:
        theirs = official_model(args.reference, args.device,
                                variables_to_state_dict(variables, cfg)).eval()
        if tdev == "cuda":
            # The agreement check compares float32 with float32: TF32 off.
            results["torch_tf32"] = {"agreement": torch_tf32(False)}
        (h, w), out_hw = AGREEMENT_CASE
        lr = np.random.RandomState(2).rand(h, w, 3).astype(np.float32)
        ref = theirs_upscale(theirs, lr, out_hw, tdev)
        tol = agreement_tolerance(args.dtype, args.precision)
        errs = {m: float(np.abs(Engine(fcfg, fvars, method=m, runtime=runtime)(
            lr, out_hw, clamp=False) - ref).max()) for m in ("grid", "query")}
        ok = max(errs.values()) <= tol
        results["agreement"] = {"case": f"x4 {h}x{w} -> {out_hw[0]}x{out_hw[1]}",
                                "max_abs_error": errs, "tolerance": tol, "passed": ok}
        print(f"agreement (x4, {h}x{w} input, ours folded vs official, image space): "
              + ", ".join(f"{m} {e:.2e}" for m, e in errs.items())
              + f" (tolerance {tol:g}): {'ok' if ok else 'FAILED'}")
        if not ok:
            failed.append(f"agreement: max abs error {max(errs.values()):.2e} > {tol:g}")
        if tdev == "cuda":
            results["torch_tf32"]["timings"] = torch_tf32(args.torch_tf32 == "on")

    roof = matmul_roofline()
    results["matmul_gflops"] = roof
    print(f"matmul roofline (jitted fp32 2048^3): {roof:.1f} GFLOP/s")

    rows = []
    infer_cases = [("x4 16->64", 16, 64)] if args.quick else INFER_CASES
    for name, n, out in (infer_cases if "infer" in cases else []):
        lr = np.random.RandomState(n).rand(n, n, 3).astype(np.float32)
        fns = {"ours": lambda: up(lr, (out, out))}
        if theirs is not None:
            fns["theirs"] = lambda: theirs_upscale(theirs, lr, (out, out), tdev)
        cpu: dict = {}
        t = alternate(fns, args.repeats, cpu)
        fl = flop_model.inference_flops(cfg, (n, n), (out, out))
        rows.append((f"inference {name}", t, fl, cpu))

    if "train" in cases:
        sizes = train_sizes()
        if sizes["batch"] != TRAIN["batch"]:
            print(f"train batch {TRAIN['batch']} -> {sizes['batch']} "
                  f"(a multiple of the {jax.device_count()} devices)")
        batch = train_batch(cfg)
        step, state = ours_train_step(cfg, variables, runtime)
        dev_batch = jax.tree_util.tree_map(jnp.asarray, Batch.from_flat(batch))
        holder = {"state": state}

        def ours_step():
            holder["state"], m = step(holder["state"], dev_batch)
            jax.block_until_ready(m["loss"])

        fns = {"ours": ours_step}
        if theirs is not None:
            import torch

            opt = torch.optim.Adam(theirs.parameters(), lr=1e-4)
            fns["theirs"] = lambda: theirs_train_step(theirs, opt, batch, tdev)
        cpu = {}
        t = alternate(fns, args.repeats, cpu)
        rows.append((f"train step b{sizes['batch']} {sizes['lr_size']}^2 {sizes['queries']}q", t,
                     flop_model.train_step_flops(cfg, **sizes), cpu))

    print()
    print("| case | ours (s) | official (s) | speed-up | ours CPU-s | official CPU-s | "
          "CPU-s ratio | ours GFLOP/s (nominal) | of roofline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, t, fl, cpu in rows:
        ours_t, theirs_t = t["ours"], t.get("theirs")
        ours_c, theirs_c = cpu["ours"], cpu.get("theirs")
        gfs = fl / ours_t / 1e9
        ratio = f"x{theirs_t / ours_t:.2f}" if theirs_t else "-"
        th = f"{theirs_t:.2f}" if theirs_t else "-"
        cratio = f"x{theirs_c / ours_c:.2f}" if theirs_c else "-"
        tc = f"{theirs_c:.2f}" if theirs_c else "-"
        print(f"| {name} | {ours_t:.2f} | {th} | {ratio} | {ours_c:.2f} | {tc} | {cratio} | "
              f"{gfs:.1f} | {gfs / roof:.0%} |")
        results["cases"][name] = {"ours_s": ours_t, "official_s": theirs_t,
                                  "ours_cpu_s": ours_c, "official_cpu_s": theirs_c,
                                  "nominal_gflop": fl / 1e9, "ours_gflops": gfs,
                                  "official_tf32": results.get("torch_tf32", {}).get("timings")}
    if theirs is not None and tdev == "cuda":
        print(f"official timings with TF32 {results['torch_tf32']['timings']}")

    if "memory" in cases:
        mem = {"ours": measure_memory("ours", None, args.device, runtime)}
        if args.reference:
            mem["theirs"] = measure_memory("theirs", args.reference, args.device, runtime)
        key = "gpu_bytes" if args.device == "gpu" else "rss_bytes"
        line = " | ".join(f"{k} {v[key] / 2**30:.2f} GiB ({v['seconds']:.0f} s)" for k, v in mem.items())
        print(f"\npeak memory, x8 upscale of 128^2 ({'device' if args.device == 'gpu' else 'RSS'}): {line}")
        results["memory_x8_128"] = mem

    results["failed"] = failed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
