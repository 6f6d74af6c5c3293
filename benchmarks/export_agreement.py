"""Export the paper-size official random checkpoint to every format; print agreement and speed.

    python -m benchmarks.export_agreement [--encoder edsr-baseline|rdn] [--out DIR]
                                          [--repeats 3] [--json OUT]

1. An official training checkpoint `{'model': {'name', 'args', 'sd'}}` of the
   paper-size model with random weights, made by the independent PyTorch
   reference (`tests/torch_reference.py`: `TorchMSIT`, `randomize_`; RIM base
   kernels random, BatchNorm statistics randomised) as `tests/` makes them.
2. `python -m msit_jax.export` of it to stablehlo, onnx, pth and safetensors.
3. Agreement with the JAX path (`pretrained.load` + `reparam.fold` +
   `engine.upscale`, raw unclamped prediction, float32 image space):
   max abs error on pixels without an exact .5 tie, and the fraction of tie
   pixels that differ by more than 1e-4; x3.5 (24x20 -> 84x70, ties) and x4
   (64^2 -> 256^2). ONNX is measured on a graph built with clamp=False from the
   same weights (model.onnx itself clamps; its clamped output is compared too).
   pth / safetensors: the tensors against the source, and the re-loaded model;
   pth also through the PyTorch reference's forward pass.
4. Speed on x4 64^2 -> 256^2 (warm, median of --repeats, interleaved):
   JAX CPU (`msit_jax.Upscaler`, folded, auto decoder), onnxruntime CPU
   (model.onnx), the StableHLO runner (`msit_jax.export.stablehlo`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from msit_jax import geometry, model_config  # noqa: E402,E501

from msit_jax.inference import api

from msit_jax.export import cli as export_cli

from msit_jax.export import stablehlo

from msit_jax.inference import engine

from msit_jax.export import onnx_graph, onnx_runner
from msit_jax.io import pretrained  # noqa: E402
from msit_jax.models import reparam  # noqa: E402

CASES = [("x3.5 24x20->84x70", (24, 20), (84, 70)), ("x4 64->256", (64, 64), (256, 256))]
SPEED_CASE = ("x4 64->256", (64, 64), (256, 256))


def official_checkpoint(path: str, encoder: str, seed: int = 0) -> None:
    import torch

    from tests.torch_reference import TorchMSIT, randomize_

    cfg = model_config(encoder, "rim")
    torch.manual_seed(seed)
    tm = randomize_(TorchMSIT(cfg), seed)
    torch.save({"model": {"name": "amsit", "args": pretrained.official_args(cfg),
                          "sd": tm.state_dict()}}, path)


def agreement(got: np.ndarray, want: np.ndarray, lr_hw, out_hw) -> dict:
    err = np.abs(got - want).max(-1)
    ties = geometry.tie_mask(out_hw, lr_hw)
    return {"max_abs_non_tie": float(err[~ties].max()) if (~ties).any() else 0.0,
            "tie_pixels": int(ties.sum()),
            "tie_pixels_differing": int((err[ties] > 1e-4).sum()),
            "tie_fraction_differing": float((err[ties] > 1e-4).mean()) if ties.any() else 0.0}


def tensors_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k]))
                                    for k in a)


def torch_forward(path: str, cfg, lr: np.ndarray, out_hw) -> np.ndarray:
    """The PyTorch reference's forward with the exported .pth loaded strictly."""
    import torch

    from tests.torch_reference import TorchMSIT, torch_make_coord

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    tm = TorchMSIT(cfg)
    tm.load_state_dict(ckpt["model"]["sd"], strict=True)
    tm.eval()
    inp = (torch.from_numpy(lr).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        out = tm(inp, torch_make_coord(*out_hw).reshape(1, -1, 2),
                 torch.tensor([[2 / out_hw[0], 2 / out_hw[1]]]))
    return (out * 0.5 + 0.5)[0].reshape(*out_hw, 3).numpy()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="edsr-baseline", choices=("edsr-baseline", "rdn"))
    ap.add_argument("--out", default=None, help="folder for the checkpoint and exports "
                                                "(default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    root = args.out or tempfile.mkdtemp(prefix="msit_export_")
    os.makedirs(root, exist_ok=True)
    src = os.path.join(root, "official.pth")
    official_checkpoint(src, args.encoder)
    cfg, variables = pretrained.load(src)
    fcfg, fvars = reparam.fold(cfg, variables)
    report: dict = {"encoder": args.encoder, "export_seconds": {}, "size_mib": {}}

    dirs = {}
    for fmt in export_cli.FORMATS:
        dirs[fmt] = os.path.join(root, fmt)
        t0 = time.perf_counter()
        files = export_cli.export(src, dirs[fmt], fmt)
        report["export_seconds"][fmt] = round(time.perf_counter() - t0, 2)
        report["size_mib"][fmt] = round(sum(os.path.getsize(f) for f in files) / 2 ** 20, 1)
        print(f"exported {fmt}: {', '.join(os.path.basename(f) for f in files)} "
              f"({report['size_mib'][fmt]} MiB, {report['export_seconds'][fmt]} s)", flush=True)

    raw_onnx = os.path.join(root, "model_raw.onnx")
    import onnx

    onnx.save(onnx_graph.build_graph(fcfg, fvars, clamp=False), raw_onnx)
    runners = {"stablehlo": stablehlo.load(dirs["stablehlo"]),
               "onnx": onnx_runner.load(raw_onnx)}
    onnx_clamped = onnx_runner.load(dirs["onnx"])
    jax_up = engine.Engine(fcfg, fvars)

    source_sd = pretrained.read_pth(src)["model"]["sd"]
    source_sd = {k: v.numpy() for k, v in source_sd.items()}
    pth = pretrained.read_pth(os.path.join(dirs["pth"], export_cli.PTH_FILE))
    pth_sd = {k: v.numpy() for k, v in pth["model"]["sd"].items()}
    st_sd, _ = pretrained.read_safetensors(os.path.join(dirs["safetensors"],
                                                        pretrained.SAFETENSORS_FILE))
    report["tensors_identical"] = {"pth": tensors_equal(pth_sd, source_sd),
                                   "safetensors": tensors_equal(st_sd, source_sd)}
    reloaded = {fmt: api.load(path) for fmt, path in (
        ("pth", os.path.join(dirs["pth"], export_cli.PTH_FILE)),
        ("safetensors", dirs["safetensors"]))}

    report["agreement"] = {}
    rs = np.random.RandomState(0)
    for name, lr_hw, out_hw in CASES:
        lr = rs.rand(*lr_hw, 3).astype(np.float32)
        want = jax_up(lr, out_hw, clamp=False)
        row = {fmt: agreement(up.upscale_array(lr, out_hw, clamp=False), want, lr_hw, out_hw)
               for fmt, up in runners.items()}
        row["onnx (model.onnx, clamped)"] = agreement(
            onnx_clamped.upscale_array(lr, out_hw), np.clip(want, 0, 1), lr_hw, out_hw)
        for fmt, (c, v) in reloaded.items():
            row[fmt] = agreement(engine.upscale(c, v, lr, out_hw, clamp=False), want,
                                 lr_hw, out_hw)
        if lr_hw[0] * lr_hw[1] <= 24 * 20:  # the torch reference is slow: small case only
            row["pth (PyTorch reference forward)"] = agreement(
                torch_forward(os.path.join(dirs["pth"], export_cli.PTH_FILE), cfg, lr, out_hw),
                want, lr_hw, out_hw)
        report["agreement"][name] = row
        for fmt, a in row.items():
            print(f"{name:18s} {fmt:34s} max abs (non-tie) {a['max_abs_non_tie']:.2e}   "
                  f"tie pixels differing {a['tie_pixels_differing']}/{a['tie_pixels']}",
                  flush=True)

    name, lr_hw, out_hw = SPEED_CASE
    lr = np.random.RandomState(1).rand(*lr_hw, 3).astype(np.float32)
    one_call = api.Upscaler(fcfg, fvars)
    fns = {"JAX CPU (msit_jax.Upscaler)": lambda: one_call(lr, size=out_hw),
           "onnxruntime CPU (model.onnx)": lambda: onnx_clamped(lr, size=out_hw),
           "StableHLO runner (msit_jax.export.stablehlo)":
               lambda: runners["stablehlo"](lr, size=out_hw)}
    for fn in fns.values():  # warm-up: compilation, session set-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.repeats):  # interleaved, so drift hits every runner alike
        for k, fn in fns.items():
            times[k] += timed(fn, 1)
    report["speed_case"] = name
    report["seconds"] = {k: round(statistics.median(v), 2) for k, v in times.items()}
    report["seconds_all"] = {k: [round(t, 2) for t in v] for k, v in times.items()}
    for k, v in report["seconds"].items():
        print(f"{name}: {k:38s} {v:6.2f} s  (runs {report['seconds_all'][k]})")
    report["tensors_identical_ok"] = all(report["tensors_identical"].values())
    print(f"pth / safetensors tensors identical to the source: {report['tensors_identical']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
