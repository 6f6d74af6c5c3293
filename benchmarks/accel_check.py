"""One command for whoever has a GPU or TPU for ten minutes.

    python -m benchmarks.accel_check --json accel.json [--reference /path/to/MSIT]
        [--checkpoint epoch-best.pth] [--budget_s 420]
    python -m benchmarks.accel_check --allow_cpu --tiny --json out.json   # CPU smoke test

Checks the numerics on the device against the host CPU and measures the
choices this project has only estimated for accelerators (decoder crossover,
chunk size, FFT vs direct convolutions). Every check has a stated tolerance
(TOLERANCES below; `--tolerance NAME=VALUE` overrides one); all figures go to
--json; the exit status is 1 when a tolerance fails, and the summary lists
which. Sections, in order (`--sections` picks a subset):

  agreement_infer  device vs host CPU, float32 / precision 'highest', both
                   decoders ('grid', 'query') of the folded model, x4 of a
                   48x48 input: max abs error in image space [0, 1].
  agreement_grad   device vs host CPU, one jax.grad of the L1 train loss of
                   the unfolded (RIM, BatchNorm in train mode) model on a small
                   batch: max abs and relative error over the gradient tree.
  drift            PSNR (peak 1) of precision='default' and of bfloat16 vs the
                   device's float32 'highest' output, both decoders.
  fft              FFT (fft_min_kernel=17) vs direct (0) multi-scale convs on
                   the device: output agreement and encoder time.
  reference        (--reference) the official PyTorch model on the same
                   weights: parity with TF32 off, then timings with TF32 off
                   and with torch's defaults (both recorded).
  crossover        time of both decoders at x2 ... x6 of a fixed input; the
                   smallest scale from which the grid decoder wins.
  chunks           time of the per-query decoder at 4096, 16384, 65536
                   queries per call; the best.
  memory           JAX's peak device memory after each section (always).

The device runs its default program: float32, precision 'highest', XLA's
convolutions (fft_min_kernel -1 means no FFT on GPU/TPU). The host copy runs
under `jax.default_device(cpu)` with the CPU defaults (FFT from 17x17, the
CPU kernel-gradient methods; --tiny: FFT from 7x7), so the comparison also
covers those CPU-only paths; where its outputs landed is checked. Under --allow_cpu the "device" is
the CPU running the accelerator program (conv_impl='xla', fft_min_kernel=0).

All sections use the same weights: --checkpoint (anything
`msit_jax.pretrained.load` reads) or seeded random paper-size weights
(`random_variables(model_config(), 0)`). --budget_s bounds the run: each
section gets a share of it, timing sweeps stop at their share, and a section
that no longer fits is skipped (recorded, not a failure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from typing import Any, Callable, Optional

# Before jax is imported: JAX would otherwise reserve 75% of the GPU at start,
# leaving torch (--reference) too little and making peak memory meaningless.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import compare_torch  # noqa: E402  (its official-model helpers and timing loop)

from msit_jax import model_config, tiny_model_config
from msit_jax.models import reparam  # noqa: E402
from msit_jax.inference.engine import Engine, default_chunk, grid_min_queries  # noqa: E402
from msit_jax.models.model import MSIT, build_model  # noqa: E402
from msit_jax.ops.runtime import RuntimeOptions  # noqa: E402
from msit_jax.models.random_init import random_variables  # noqa: E402
from msit_jax.data.protocol import Batch  # noqa: E402
from msit_jax.training.step import l1_loss  # noqa: E402

# --- tolerances -------------------------------------------------------------------
# name: (value, 'max' (the figure must be <= value) | 'min' (>= value), what it bounds)
TOLERANCES: dict[str, tuple[float, str, str]] = {
    "device_vs_cpu_max_abs": (
        1e-4, "max", "device vs host CPU, float32 'highest', both decoders: max abs error, "
                     "image space [0, 1]"),
    "grad_rel": (
        1e-3, "max", "train-loss gradient, device vs host CPU: max abs difference / max abs "
                     "gradient, over the whole tree"),
    "precision_default_min_db": (
        35.0, "min", "PSNR (peak 1) of precision='default' vs the device's float32 'highest' "
                     "output, each decoder"),
    "bf16_min_db": (
        35.0, "min", "PSNR (peak 1) of dtype='bfloat16' vs the device's float32 'highest' "
                     "output, each decoder"),
    "fft_vs_direct_max_abs": (
        1e-4, "max", "FFT (fft_min_kernel=17) vs direct convs on the device: max abs error, "
                     "image space"),
    "torch_parity_max_abs": (
        1e-4, "max", "ours (device, float32 'highest') vs the official PyTorch model (TF32 "
                     "off, float32): max abs error, image space"),
}
PSNR_CAP_DB = 200.0  # identical outputs: a finite stand-in for +inf

SECTIONS = ("agreement_infer", "agreement_grad", "drift", "fft", "reference", "crossover",
            "chunks")
# Shares of --budget_s: a timing sweep stops adding points past its share.
# Numeric checks first: they matter most and are not truncated.
SECTION_SHARE = {"agreement_infer": 0.20, "agreement_grad": 0.25, "drift": 0.15, "fft": 0.10,
                 "reference": 0.20, "crossover": 0.15, "chunks": 0.12}
MIN_SECTION_S = 15.0  # a section is skipped when less than this is left

# Problem sizes. paper: for one H100 within ~7 minutes including compiles.
# tiny: the tiny model on CPU (smoke test of this script only).
SIZES = {
    "paper": dict(agree_lr=48, agree_scale=4, grad=dict(batch=2, lr_size=24, queries=576),
                  fft_k=17, enc_lr=96, cross_lr=48, scales=(2.0, 2.5, 3.0, 4.0, 6.0),
                  chunk_lr=64, chunks=(4096, 16384, 65536), torch_case=(64, 256)),
    "tiny": dict(agree_lr=12, agree_scale=4, grad=dict(batch=2, lr_size=8, queries=64),
                 fft_k=7, enc_lr=24, cross_lr=12, scales=(2.0, 2.5, 3.0, 4.0, 6.0),
                 chunk_lr=16, chunks=(256, 1024, 4096), torch_case=(16, 64)),
}


# --- small helpers ----------------------------------------------------------------

class Budget:
    """Wall-clock budget for the whole run, shared out to sections."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.t0)

    def deadline(self, section: str) -> float:
        """perf_counter() time by which `section` should stop adding timing points."""
        return time.perf_counter() + min(SECTION_SHARE[section] * self.total_s, self.left())


class Checks:
    """Tolerance checks: each figure is compared with its stated tolerance."""

    def __init__(self, tolerances: dict[str, float]):
        self.tol = tolerances
        self.rows: list[dict] = []

    def add(self, name: str, tol_key: str, value: float) -> bool:
        tol = self.tol[tol_key]
        kind = TOLERANCES[tol_key][1]
        # NaN compares False both ways, so a NaN figure fails.
        ok = bool(value <= tol) if kind == "max" else bool(value >= tol)
        self.rows.append({"check": name, "tolerance": tol_key, "value": float(value),
                          "limit": tol, "kind": "<=" if kind == "max" else ">=", "passed": ok})
        return ok

    def failed(self) -> list[dict]:
        return [r for r in self.rows if not r["passed"]]


def psnr_db(a: np.ndarray, ref: np.ndarray) -> float:
    """PSNR (peak 1, image space) of a vs ref; identical images give PSNR_CAP_DB."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(ref, np.float64)) ** 2))
    if not math.isfinite(mse):
        return float("nan")
    return min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / max(mse, 1e-30)))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def platforms(tree: Any) -> set[str]:
    """Platforms holding the arrays of a pytree (e.g. {'cpu'})."""
    return {d.platform for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)
            for d in x.devices()}


def host_device() -> jax.Device:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError as e:
        raise SystemExit("the device-vs-CPU checks need JAX's CPU backend next to the "
                         "accelerator; JAX_PLATFORMS must not exclude it (e.g. "
                         f"JAX_PLATFORMS=cuda,cpu): {e}") from e


def peak_device_bytes() -> Optional[int]:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per callable, interleaved, first round (compiles) excluded."""
    return compare_torch.alternate(fns, repeats)


def random_image(n: int, seed: int) -> np.ndarray:
    """(n, n, 3) float32 in [0, 1)."""
    return np.random.RandomState(seed).rand(n, n, 3).astype(np.float32)


def out_size(n: int, scale: float) -> tuple[int, int]:
    m = int(round(n * scale))
    return m, m


# --- the run ----------------------------------------------------------------------

class Run:
    """State shared by the sections: weights, runtimes, sizes, results."""

    def __init__(self, args: argparse.Namespace, cfg, variables: dict, checks: Checks):
        self.args = args
        self.cfg, self.variables = cfg, variables
        self.fcfg, self.fvars = reparam.fold(cfg, variables)
        self.sizes = SIZES["tiny" if args.tiny else "paper"]
        self.checks = checks
        self.backend = jax.default_backend()
        # The device's default program. On CPU (--allow_cpu) the same program the
        # accelerators build: XLA's conv rules, no FFT; so the smoke test compares
        # it with the CPU defaults as a GPU host would.
        self.rt = RuntimeOptions() if self.backend != "cpu" else RuntimeOptions(
            conv_impl="xla", fft_min_kernel=0)
        self.host = host_device()
        # CPU defaults: FFT from 17x17, CPU kernel gradients. The tiny model's
        # kernels stop at 9x9, so there the FFT starts at fft_k to be exercised.
        self.host_rt = RuntimeOptions(fft_min_kernel=self.sizes["fft_k"] if args.tiny else -1)
        self.repeats = args.repeats
        self._ref_out: dict[str, np.ndarray] = {}

    # Device outputs -------------------------------------------------------------
    def agreement_input(self) -> tuple[np.ndarray, tuple[int, int]]:
        n = self.sizes["agree_lr"]
        return random_image(n, 0), out_size(n, self.sizes["agree_scale"])

    def device_output(self, method: str, runtime: RuntimeOptions) -> np.ndarray:
        """The folded model's unclamped output (H', W', 3) on the agreement input."""
        lr, out_hw = self.agreement_input()
        return Engine(self.fcfg, self.fvars, method=method, runtime=runtime)(
            lr, out_hw, clamp=False)

    def reference_output(self, method: str) -> np.ndarray:
        """The device's float32 'highest' output, computed once per decoder."""
        if method not in self._ref_out:
            self._ref_out[method] = self.device_output(method, self.rt)
        return self._ref_out[method]

    def host_output(self, method: str) -> np.ndarray:
        """The same upscale on the host CPU; checks that it really ran there."""
        lr, out_hw = self.agreement_input()
        with jax.default_device(self.host):
            up = Engine(self.fcfg, self.fvars, chunk=default_chunk("cpu"), method=method,
                          runtime=self.host_rt)
            out = up(lr, out_hw, clamp=False)
            where = platforms(up.variables) | platforms(up.features(lr))
        if where != {"cpu"}:
            raise RuntimeError(f"the host copy ran on {where}, not on the CPU")
        return out

    # Sections ---------------------------------------------------------------------
    def agreement_infer(self, deadline: float) -> dict:
        lr, out_hw = self.agreement_input()
        res = {"case": f"x{self.sizes['agree_scale']} {lr.shape[0]}x{lr.shape[1]} -> "
                       f"{out_hw[0]}x{out_hw[1]}", "device_runtime": str(self.rt),
               "host_runtime": str(self.host_rt)}
        for method in ("grid", "query"):
            dev, host = self.reference_output(method), self.host_output(method)
            err = max_abs(dev, host)
            self.checks.add(f"device vs cpu ({method})", "device_vs_cpu_max_abs", err)
            res[method] = {"max_abs": err, "psnr_db": psnr_db(dev, host)}
        return res

    def agreement_grad(self, deadline: float) -> dict:
        g = self.sizes["grad"]
        batch = compare_torch.train_batch(self.cfg, seed=3, **g)
        batch = Batch.from_flat(batch)
        params = self.variables["params"]
        rest = {k: v for k, v in self.variables.items() if k != "params"}

        def loss_and_grad(runtime: RuntimeOptions) -> Callable:
            model = build_model(self.cfg, runtime)
            mutable = ["batch_stats"] if "batch_stats" in rest else []

            def loss(params, rest, batch):
                pred, _ = model.apply({"params": params, **rest}, batch.inp, batch.geometry,
                                      train=True, mutable=mutable)
                return l1_loss(pred, batch.gt)

            return jax.jit(jax.value_and_grad(loss))

        def run(device: jax.Device, runtime: RuntimeOptions):
            # Committed to `device`, so the jitted gradient runs there.
            args = jax.device_put((params, rest, batch), device)
            loss, grads = loss_and_grad(runtime)(*args)
            where = platforms(grads)
            if where != {device.platform}:
                raise RuntimeError(f"gradient meant for {device.platform} ran on {where}")
            return float(loss), jax.tree_util.tree_map(np.asarray, grads)

        loss_dev, g_dev = run(jax.devices()[0], self.rt)
        loss_cpu, g_cpu = run(self.host, self.host_rt)
        flat_dev = jax.tree_util.tree_flatten_with_path(g_dev)[0]
        flat_cpu = jax.tree_util.tree_leaves(g_cpu)
        diff = max(max_abs(a, b) for (_, a), b in zip(flat_dev, flat_cpu))
        scale = max(float(np.max(np.abs(b))) for b in flat_cpu)
        rel = diff / scale if scale > 0 else diff
        # Per-leaf relative errors, worst first: where to look if the check fails.
        leaves = sorted(((max_abs(a, b) / max(float(np.max(np.abs(b))), 1e-30),
                          jax.tree_util.keystr(p)) for (p, a), b in zip(flat_dev, flat_cpu)),
                        reverse=True)
        self.checks.add("train gradient, device vs cpu", "grad_rel", rel)
        return {"batch": g, "loss_device": loss_dev, "loss_cpu": loss_cpu,
                "loss_abs_diff": abs(loss_dev - loss_cpu), "grad_max_abs_diff": diff,
                "grad_max_abs": scale, "grad_rel": rel,
                "worst_leaves": [{"leaf": k, "rel": r} for r, k in leaves[:3]]}

    def drift(self, deadline: float) -> dict:
        res = {}
        variants = (("precision_default", self.rt.replace(precision="default"),
                     "precision_default_min_db"),
                    ("bf16", self.rt.replace(dtype="bfloat16"), "bf16_min_db"))
        for method in ("grid", "query"):
            ref = self.reference_output(method)
            for name, rt, tol_key in variants:
                out = self.device_output(method, rt)
                db = psnr_db(out, ref)
                self.checks.add(f"{name} drift ({method})", tol_key, db)
                res[f"{name}_{method}"] = {"psnr_db": db, "max_abs": max_abs(out, ref)}
        return res

    def fft(self, deadline: float) -> dict:
        k = self.sizes["fft_k"]
        rts = {"fft": self.rt.replace(fft_min_kernel=k),
               "direct": self.rt.replace(fft_min_kernel=0)}
        outs = {name: self.device_output("grid", rt) for name, rt in rts.items()}
        err = max_abs(outs["fft"], outs["direct"])
        self.checks.add(f"fft (k >= {k}) vs direct convs", "fft_vs_direct_max_abs", err)
        # Count FFTs in the encoder program: proves the FFT path is the one compared.
        n = self.sizes["enc_lr"]
        lr = random_image(n, 1)
        inp = jnp.zeros((1, n, n, 3), jnp.float32)

        def fft_ops(rt: RuntimeOptions) -> int:
            model = build_model(self.fcfg, rt)
            jaxpr = jax.make_jaxpr(lambda x: model.apply(self.fvars, x, method=MSIT.encode))(inp)
            return str(jaxpr).count(" fft[")

        ffts = {name: fft_ops(rt) for name, rt in rts.items()}
        ups = {name: Engine(self.fcfg, self.fvars, runtime=rt) for name, rt in rts.items()}
        t = median_times({name: (lambda u=u: jax.block_until_ready(u.features(lr)))
                          for name, u in ups.items()}, self.repeats)
        return {"fft_min_kernel": k, "max_abs": err, "fft_ops": ffts,
                "encoder_case": f"{n}x{n}", "encoder_s": t,
                "fft_speedup": t["direct"] / t["fft"]}

    def crossover(self, deadline: float) -> dict:
        n = self.sizes["cross_lr"]
        lr = random_image(n, 2)
        ups = {m: Engine(self.fcfg, self.fvars, method=m, runtime=self.rt)
               for m in ("grid", "query")}
        rows = []
        for s in self.sizes["scales"]:
            if time.perf_counter() > deadline:
                break
            hw = out_size(n, s)
            t = median_times({m: (lambda u=u: u(lr, hw)) for m, u in ups.items()}, self.repeats)
            rows.append({"scale": s, "out": hw[0], "queries_per_lr_pixel": (hw[0] / n) ** 2,
                         "grid_s": t["grid"], "query_s": t["query"],
                         "winner": "grid" if t["grid"] < t["query"] else "query"})
        # The smallest measured scale from which grid wins at every larger one.
        from_scale = None
        for r in reversed(rows):
            if r["winner"] != "grid":
                break
            from_scale = r
        return {"input": f"{n}x{n}", "chunk": default_chunk(), "scales": rows,
                "complete": len(rows) == len(self.sizes["scales"]),
                "grid_wins_from_scale": from_scale and from_scale["scale"],
                "grid_wins_from_queries_per_lr_pixel":
                    from_scale and from_scale["queries_per_lr_pixel"],
                "current_grid_min_queries": grid_min_queries()}

    def chunks(self, deadline: float) -> dict:
        n = self.sizes["chunk_lr"]
        lr, hw = random_image(n, 3), out_size(n, 4)
        times = {}
        for c in self.sizes["chunks"]:
            if time.perf_counter() > deadline:
                break
            up = Engine(self.fcfg, self.fvars, chunk=c, method="query", runtime=self.rt)
            times[c] = median_times({"q": lambda: up(lr, hw)}, self.repeats)["q"]
        best = min(times, key=times.get) if times else None
        return {"case": f"x4 {n}x{n} -> {hw[0]}x{hw[1]} ({hw[0] * hw[1]} queries), query decoder",
                "seconds": {str(c): t for c, t in times.items()}, "best_chunk": best,
                "complete": len(times) == len(self.sizes["chunks"]),
                "current_default_chunk": default_chunk()}

    def reference(self, deadline: float) -> dict:
        if not self.args.reference:
            return {"skipped": "no --reference"}
        import torch
        import yaml
        from msit_jax.io.pretrained import config_from_official_args

        # compare_torch.official_model builds the official EDSR-baseline RIM
        # training YAML: the weights must have exactly that architecture.
        with open(os.path.join(self.args.reference, compare_torch.OFFICIAL_YAML)) as f:
            official_cfg = config_from_official_args(yaml.safe_load(f)["model"]["args"], "rim")
        if self.cfg.to_dict() != official_cfg.to_dict():
            return {"skipped": f"the official model is built from {compare_torch.OFFICIAL_YAML}"
                               "; these weights have another architecture"}
        from msit_jax.io.torch_io import variables_to_state_dict

        gpu = self.backend == "gpu" and torch.cuda.is_available()
        tdev = "cuda" if gpu else "cpu"
        defaults = compare_torch.torch_tf32() if gpu else None
        theirs = compare_torch.official_model(self.args.reference, "gpu" if gpu else "cpu",
                                              variables_to_state_dict(self.variables, self.cfg))
        theirs = theirs.eval()
        res = {"torch_device": compare_torch.device_names(tdev).get("torch"),
               "torch_version": torch.__version__, "torch_tf32_defaults": defaults}
        # Parity: float32 against float32, so TF32 off on the GPU.
        tf32_off = compare_torch.torch_tf32(False) if gpu else None
        (h, w), out_hw = compare_torch.AGREEMENT_CASE
        lr = np.random.RandomState(2).rand(h, w, 3).astype(np.float32)
        ref = compare_torch.theirs_upscale(theirs, lr, out_hw, tdev)
        parity = {}
        for method in ("grid", "query"):
            ours = Engine(self.fcfg, self.fvars, method=method, runtime=self.rt)(
                lr, out_hw, clamp=False)
            parity[method] = max_abs(ours, ref)
            self.checks.add(f"official model parity ({method})", "torch_parity_max_abs",
                            parity[method])
        res.update(parity_case=f"x4 {h}x{w} -> {out_hw[0]}x{out_hw[1]}", parity_max_abs=parity,
                   parity_torch_tf32=tf32_off)
        # Timings only where both run on the same kind of device.
        if gpu != (self.backend == "gpu") or time.perf_counter() > deadline:
            res["timings"] = {"skipped": "torch and JAX on different devices"
                              if gpu != (self.backend == "gpu") else "budget"}
            return res
        n, m = self.sizes["torch_case"]
        lr = random_image(n, 4)
        up = Engine(self.fcfg, self.fvars, runtime=self.rt)
        fns = {"ours": lambda: up(lr, (m, m))}
        if gpu:
            def with_tf32(flags: dict) -> Callable[[], Any]:
                # TF32 switches are global: set them on every call, as the
                # timings of the two settings are interleaved.
                return lambda: (compare_torch.torch_tf32(flags),
                                compare_torch.theirs_upscale(theirs, lr, (m, m), tdev))

            fns["official_tf32_off"] = with_tf32({"matmul": False, "cudnn": False})
            fns["official_torch_defaults"] = with_tf32(defaults)
            torch.cuda.reset_peak_memory_stats()
        else:
            fns["official"] = lambda: compare_torch.theirs_upscale(theirs, lr, (m, m), tdev)
        t = median_times(fns, self.repeats)
        if gpu:
            compare_torch.torch_tf32(defaults)  # leave torch as found
            res["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        res["timings"] = {"case": f"x4 {n}x{n} -> {m}x{m}", "seconds": t,
                          "tf32": {"official_tf32_off": {"matmul": False, "cudnn": False},
                                   "official_torch_defaults": defaults} if gpu else None}
        return res


# --- main -------------------------------------------------------------------------

def parse_tolerances(items: list[str]) -> dict[str, float]:
    tol = {k: v[0] for k, v in TOLERANCES.items()}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in TOLERANCES:
            raise SystemExit(f"--tolerance {item!r}: expected NAME=VALUE, NAME one of "
                             f"{sorted(TOLERANCES)}")
        tol[name] = float(value)
    return tol


def load_weights(args: argparse.Namespace):
    """(model_cfg, variables as numpy) per --checkpoint / --tiny, and a description."""
    if args.checkpoint:
        if args.tiny:
            raise SystemExit("--tiny and --checkpoint exclude each other")
        from msit_jax.io import pretrained

        cfg, variables = pretrained.load(args.checkpoint)
        return cfg, variables, f"checkpoint {os.path.abspath(args.checkpoint)}"
    cfg = tiny_model_config() if args.tiny else model_config()
    name = "tiny_model_config()" if args.tiny else "model_config()"
    return cfg, random_variables(cfg, 0), f"random_variables({name}, 0)"


def jsonable(x: Any) -> Any:
    """Non-finite floats as strings ('nan'), so the JSON stays standard."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else str(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return x


def summary_lines(results: dict) -> list[str]:
    lines = [f"device: {results['meta']['device_kind']} ({results['meta']['backend']}), "
             f"weights: {results['meta']['weights']}, {results['elapsed_s']:.0f} s"]
    lines.append("| check | value | limit | ok |")
    lines.append("|---|---:|---:|---|")
    for r in results["checks"]:
        lines.append(f"| {r['check']} | {r['value']:.3g} | {r['kind']} {r['limit']:g} | "
                     f"{'ok' if r['passed'] else 'FAIL'} |")
    s = results["sections"]
    c = s.get("crossover", {})
    if "scales" in c:
        pts = ", ".join(f"x{r['scale']:g} grid {r['grid_s']:.3f}s / query {r['query_s']:.3f}s"
                        for r in c["scales"])
        wins = (f"grid wins from x{c['grid_wins_from_scale']:g} (queries per LR pixel "
                f"{c['grid_wins_from_queries_per_lr_pixel']:g})"
                if c["grid_wins_from_scale"] is not None
                else "grid not faster at the largest scale")
        if not c["complete"]:
            wins += " (sweep stopped at its share of --budget_s)"
        lines.append(f"crossover ({c['input']}): {pts}; {wins}; current threshold "
                     f"{c['current_grid_min_queries']:g} queries per LR pixel")
    ch = s.get("chunks", {})
    if "seconds" in ch:
        lines.append(f"chunks ({ch['case']}): "
                     + ", ".join(f"{k}: {v:.3f}s" for k, v in ch["seconds"].items())
                     + f"; best {ch['best_chunk']} (current default {ch['current_default_chunk']})"
                     + ("" if ch["complete"] else " (sweep stopped at its share of --budget_s)"))
    f = s.get("fft", {})
    if "encoder_s" in f:
        lines.append(f"encoder {f['encoder_case']}: fft {f['encoder_s']['fft']:.4f}s, direct "
                     f"{f['encoder_s']['direct']:.4f}s (fft speed-up x{f['fft_speedup']:.2f})")
    m = s.get("memory", {})
    if m.get("peak_bytes_in_use") is not None:
        lines.append(f"peak device memory (JAX): {m['peak_bytes_in_use'] / 2**30:.2f} GiB")
    for name, sec in s.items():
        if isinstance(sec, dict) and ("skipped" in sec or "error" in sec):
            lines.append(f"{name}: {sec.get('skipped') or 'ERROR ' + sec['error']}")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accel_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="accel_check.json", help="write all figures here")
    p.add_argument("--checkpoint", help="weights: anything msit_jax.pretrained.load reads "
                                        "(default: seeded random paper-size weights)")
    p.add_argument("--reference", help="a checkout of the official MSIT code: parity and "
                                       "timings of the PyTorch model on the same weights")
    p.add_argument("--allow_cpu", action="store_true",
                   help="run on a CPU-only JAX (smoke test of this script)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny model and sizes (CPU smoke test; figures not meaningful)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--tolerance", action="append", default=[], metavar="NAME=VALUE",
                   help="override a tolerance, e.g. bf16_min_db=30; names: "
                        + ", ".join(TOLERANCES))
    p.add_argument("--budget_s", type=float, default=420.0,
                   help="wall-clock budget in seconds, shared out to the sections")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    args = p.parse_args(argv)

    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown --sections {unknown}; choose from {', '.join(SECTIONS)}")
    tolerances = parse_tolerances(args.tolerance)
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu") and not args.allow_cpu:
        raise SystemExit(f"JAX's default backend is {backend!r} ({jax.devices()[0].device_kind})"
                         ", not a GPU or TPU: install jax for your accelerator (e.g. "
                         "pip install -U 'jax[cuda12]' or 'jax[tpu]') or pass --allow_cpu")
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({backend}), "
          f"jax {jax.__version__}", flush=True)

    budget = Budget(args.budget_s)
    cfg, variables, weights = load_weights(args)
    checks = Checks(tolerances)
    run = Run(args, cfg, variables, checks)
    results = {
        "meta": {"backend": backend, "device_kind": jax.devices()[0].device_kind,
                 "devices": compare_torch.device_names(), "jax_version": jax.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S"), "weights": weights,
                 "tiny": args.tiny, "model_config": cfg.to_dict(),
                 "device_runtime": str(run.rt), "host_runtime": str(run.host_rt),
                 "budget_s": args.budget_s, "repeats": args.repeats,
                 "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")},
        "tolerances": {k: {"value": tolerances[k], "kind": TOLERANCES[k][1],
                           "what": TOLERANCES[k][2]} for k in TOLERANCES},
        "sections": {},
    }
    memory = {"available": peak_device_bytes() is not None, "after_section": {}}
    errors = []
    for name in SECTIONS:
        if name not in sections:
            continue
        if budget.left() < MIN_SECTION_S:
            results["sections"][name] = {"skipped": f"budget ({budget.left():.0f} s left)"}
            print(f"[{name}] skipped: budget", flush=True)
            continue
        t = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            sec = getattr(run, name)(budget.deadline(name))
        except Exception as e:  # one broken section must not hide the others' figures
            traceback.print_exc()
            sec = {"error": f"{type(e).__name__}: {e}"}
            errors.append(name)
        sec.setdefault("seconds_total", time.perf_counter() - t)
        results["sections"][name] = sec
        memory["after_section"][name] = peak_device_bytes()
        print(f"[{name}] {sec['seconds_total']:.1f} s", flush=True)
    memory["peak_bytes_in_use"] = peak_device_bytes()
    memory["host_peak_rss_bytes"] = compare_torch.peak_rss_bytes()
    results["sections"]["memory"] = memory

    results["checks"] = checks.rows
    failed = [f"{r['check']}: {r['value']:.3g} (limit {r['kind']} {r['limit']:g})"
              for r in checks.failed()] + [f"{s}: raised an error" for s in errors]
    results["failed"] = failed
    results["elapsed_s"] = time.perf_counter() - budget.t0
    with open(args.json, "w") as f:
        json.dump(jsonable(results), f, indent=2, allow_nan=False)

    print()
    print("\n".join(summary_lines(results)))
    print(f"\nfigures: {args.json}")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed))
        return 1
    print("all checks within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
