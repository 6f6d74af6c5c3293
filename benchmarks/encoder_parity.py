"""Full-size encoder parity with the official MSIT: EDSR and RCAN checkpoints.

    python -m benchmarks.encoder_parity --official_root /path/to/MSIT
        [--encoders edsr rcan] [--scales 3 4] [--lr_size 24 20] [--json OUT]
        [--encoder_args '{"rcan": {"n_resgroups": 2}}']

For each encoder, the official `amsit` model (stage 2: RIM convs) is built from
the user's checkout with the encoder at its official defaults (`models.make`
on the spec `msit_jax.io.pretrained.official_args` writes; nothing of the
official code is copied here, its path is put on sys.path for this run only,
`.cuda()` patched to a no-op). Its state is randomised where the official init
leaves it trivial: the RIM base kernels (zeros), the BatchNorm statistics and
affine parameters, and every all-zero bias. It is saved as an official training
checkpoint ({'model': {'name', 'args', 'sd'}}) and loaded back by
`msit_jax.io.pretrained.load`, which reads the encoder name and args from it.

The encoder's own output is compared first (relative to its magnitude). Then,
per scale, one LR image of --lr_size (seeded uniform noise in [0, 1])
is upscaled by the official `chop_forward` and by `engine.upscale` (plain and
folded), unclamped, image space; the max abs differences are printed. The
model is also exported back to .pth (`export_cli.export_variables(..., 'pth')`)
and that file loaded with `load_state_dict(strict=True)` into a freshly built
official model, whose output is compared too. Parameter counts (official
`parameters()`, the encoder's and the whole model's) are printed beside ours.

Exit status 1 when any difference exceeds --tol (1e-5) or the strict load fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks import compare_torch  # noqa: E402  (timm stand-ins, the official chop_forward call)

from msit_jax import build_model, model_config  # noqa: E402

from msit_jax.inference import engine
from msit_jax.export import cli as export_cli  # noqa: E402
from msit_jax.io import pretrained  # noqa: E402
from msit_jax.models import reparam  # noqa: E402
from msit_jax.models.encoders import encoder_spec  # noqa: E402


def official_models(root: str):
    """The official `models` package from `root` (CPU: .cuda() is a no-op)."""
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    compare_torch.timm_standins()
    root = os.path.abspath(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    import models  # the official package

    return models


def randomise_(model, seed: int) -> None:
    """RIM base kernels, BatchNorm statistics / affine and all-zero biases get random
    values (the official init leaves them at 0 / 1); everything else keeps its init."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rim_weights = {f"{name}.weight" for name, m in model.named_modules()
                   if type(m).__name__ == "RiM"}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or ".sub_mean." in name or ".add_mean." in name \
                    or ".lem." in name:
                continue
            if name in rim_weights:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif name.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("bias") and not t.any():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def n_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def run(args, name: str) -> dict:
    import torch

    models = official_models(args.official_root)
    cfg = model_config(name, "rim")
    spec = encoder_spec(name)
    cfg[spec.sub_config].update(json.loads(args.encoder_args).get(name, {}))
    model_spec = {"name": "amsit", "args": pretrained.official_args(cfg)}
    torch.manual_seed(args.seed)
    theirs = models.make(model_spec).eval()
    randomise_(theirs, args.seed)
    report = {"encoder": name, "encoder_args": model_spec["args"]["encoder_spec"]["args"],
              "official_params": {"encoder": n_params(theirs.encoder), "model": n_params(theirs)}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "epoch-last.pth")
        torch.save({"model": dict(model_spec, sd=theirs.state_dict()), "epoch": 1}, path)
        t = time.perf_counter()
        got_cfg, variables = pretrained.load(path)
        report["load_seconds"] = round(time.perf_counter() - t, 2)
        assert got_cfg.encoder == name and got_cfg.conv == "rim", (got_cfg.encoder, got_cfg.conv)
        enc = variables["params"]["encoder"]
        report["our_params"] = {
            "encoder": reparam.count_params(enc),
            "model_variables": reparam.count_params(variables)}
        fcfg, fvars = reparam.fold(got_cfg, variables)

        out_dir = os.path.join(tmp, "export")
        files = export_cli.export_variables(got_cfg, variables, out_dir, "pth")
        pth = next(f for f in files if f.endswith(".pth"))
        back = torch.load(pth, map_location="cpu", weights_only=False)
        back = back["model"] if "model" in back else {"sd": back, "args": model_spec["args"]}
        fresh = models.make({"name": "amsit", "args": back.get("args", model_spec["args"])})
        try:
            fresh.load_state_dict(back["sd"], strict=True)
            report["export_pth_strict_load"] = "ok"
        except RuntimeError as e:
            report["export_pth_strict_load"] = f"failed: {str(e)[:300]}"
        fresh.eval()

        rs = np.random.RandomState(args.seed + 1)
        lr = rs.rand(*args.lr_size, 3).astype(np.float32)
        # the encoder's own output (before conv_ch / MSNO), in its feature space
        inp = (lr - 0.5) / 0.5
        with torch.no_grad():
            feat_ref = theirs.encoder(torch.from_numpy(inp).permute(2, 0, 1)[None])
        feat_ref = feat_ref[0].permute(1, 2, 0).numpy()
        feat = np.asarray(build_model(got_cfg).apply(
            variables, inp[None], method=lambda m, x: m.encoder(x)))[0]
        report["encoder_features"] = {
            "max_abs": float(np.abs(feat - feat_ref).max()),
            "max_abs_reference": float(np.abs(feat_ref).max()),
            "std_reference": float(feat_ref.std())}
        report["scales"] = {}
        for s in args.scales:
            out_hw = (args.lr_size[0] * s, args.lr_size[1] * s)
            t = time.perf_counter()
            ref = compare_torch.theirs_upscale(theirs, lr, out_hw, "cpu")
            t_ref = time.perf_counter() - t
            t = time.perf_counter()
            ours = np.asarray(engine.upscale(got_cfg, variables, lr, out_hw, clamp=False))
            t_ours = time.perf_counter() - t
            folded = np.asarray(engine.upscale(fcfg, fvars, lr, out_hw, clamp=False))
            exported = compare_torch.theirs_upscale(fresh, lr, out_hw, "cpu")
            report["scales"][f"x{s}"] = {
                "out_hw": list(out_hw),
                "max_abs_ours_vs_official": float(np.abs(ours - ref).max()),
                "max_abs_folded_vs_official": float(np.abs(folded - ref).max()),
                "max_abs_exported_pth_vs_official": float(np.abs(exported - ref).max()),
                "output_std": float(ref.std()),
                "seconds": {"official": round(t_ref, 2), "ours": round(t_ours, 2)}}
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official_root", required=True, help="checkout of the official MSIT")
    ap.add_argument("--encoders", nargs="+", default=["edsr", "rcan"])
    ap.add_argument("--scales", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--lr_size", nargs=2, type=int, default=[24, 20])
    ap.add_argument("--encoder_args", default="{}",
                    help="JSON {encoder: {size: value}} overriding the official defaults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()
    import jax

    jax.config.update("jax_platforms", "cpu")
    reports, ok = [], True
    for name in args.encoders:
        r = run(args, name)
        reports.append(r)
        print(json.dumps(r, indent=1), flush=True)
        ok &= r["export_pth_strict_load"] == "ok"
        ok &= all(v[k] <= args.tol for v in r["scales"].values()
                  for k in v if k.startswith("max_abs"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    print("PASS" if ok else f"FAIL (tolerance {args.tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
