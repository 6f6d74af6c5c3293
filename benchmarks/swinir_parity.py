"""SwinIR encoder parity against LTE's own `models/swinir.py` (a local LTE checkout).

    python -m benchmarks.swinir_parity --lte_root /path/to/lte [--sizes 48x48,45x53]

Builds LTE's encoder exactly as its configs do (`models.make({'name': 'swinir',
'args': {'no_upsampling': True}})`: embed 180, depths 6x6, heads 6, window 8,
MLP ratio 2, upsampler 'none'), gives it random weights, imports its state dict
with `msit_jax.io.swinir_import` (which also checks the relative_position_index
and attn_mask buffers against ours) and compares `SwinIREncoder` with LTE's
forward at each size, in float32 at precision 'highest'; both are also compared
with LTE's forward in float64, which shows how much of the difference is
float32 rounding. LTE pads to a multiple
of the window and returns the padded map; the comparison is on its top-left
H x W (what `SwinIREncoder` returns). Prints one line per size and a JSON summary.

The LTE checkout is put on sys.path only while its module is built (and its
`models` package is dropped from sys.modules afterwards). LTE imports three
helpers from timm; when timm is not installed, a stand-in with the same
inference behaviour (DropPath is the identity in eval mode) is used.
Needs PyTorch (requirements-torch.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import types

import jax
import numpy as np

from msit_jax.io.swinir_import import infer_swinir_config, swinir_params_from_state_dict
from msit_jax.models.swinir import SwinIREncoder
from msit_jax.ops.runtime import RuntimeOptions


def _timm_standin(torch):
    """timm.models.layers' DropPath, to_2tuple and trunc_normal_ (what LTE imports)."""
    nn = torch.nn

    class DropPath(nn.Module):
        def __init__(self, drop_prob=0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if not self.training or not self.drop_prob:
                return x
            keep = 1.0 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return nn.init.trunc_normal_(tensor, mean, std, a, b)

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    models = types.ModuleType("timm.models")
    models.layers = layers
    timm = types.ModuleType("timm")
    timm.models = models
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers}


@contextlib.contextmanager
def lte_on_path(lte_root: str, torch):
    """LTE's root on sys.path (and a timm stand-in if needed) for the block only."""
    added: dict = {}
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        added = _timm_standin(torch)
    saved = {k: sys.modules.get(k) for k in added}
    sys.modules.update(added)
    sys.path.insert(0, lte_root)
    before = set(sys.modules)
    try:
        yield
    finally:
        sys.path.remove(lte_root)
        for name in set(sys.modules) - before:
            if name == "models" or name.startswith("models."):
                del sys.modules[name]
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def build_lte_swinir(lte_root: str, torch):
    with lte_on_path(lte_root, torch):
        import models as lte_models  # LTE's registry, from lte_root
        model = lte_models.make({"name": "swinir", "args": {"no_upsampling": True}})
    return model.eval()


def randomize_(model, torch, seed: int) -> None:
    """Random weights: LayerNorm weights 1 + 0.1 N, biases 0.1 N, bias tables
    0.5 N, Linear/conv weights N / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("relative_position_bias_table"):
                p.copy_(0.5 * r)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / (p[0].numel() ** 0.5))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lte_root", required=True, help="a checkout of the LTE repository")
    ap.add_argument("--sizes", default="48x48,45x53",
                    help="comma-separated HxW input sizes (default: one aligned to the "
                         "window, one not)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lte_root = os.path.abspath(args.lte_root)
    model = build_lte_swinir(lte_root, torch)
    randomize_(model, torch, args.seed)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    model64 = copy.deepcopy(model).double()
    cfg = infer_swinir_config(state)
    params = swinir_params_from_state_dict(state, config=cfg)
    cfg.pop("drop_path_rate")
    enc = SwinIREncoder.from_config(cfg, RuntimeOptions(precision="highest", dtype="float32"))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    n_torch = sum(p.numel() for p in model.parameters())
    print(f"LTE swinir: {cfg}")
    print(f"parameters: {n_params} (torch {n_torch}); LTE out_dim {model.out_dim}")
    fwd = jax.jit(lambda p, x: enc.apply({"params": p}, x))
    rng = np.random.RandomState(args.seed)
    results = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        x = rng.uniform(-1, 1, (args.batch, h, w, 3)).astype(np.float32)
        t0 = time.time()
        with torch.no_grad():
            ref_full = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        t_torch = time.time() - t0
        ref = ref_full[:, :, :h, :w].transpose(0, 2, 3, 1)
        with torch.no_grad():  # the float64 value: how large float32 rounding is
            exact = model64(torch.from_numpy(x).double().permute(0, 3, 1, 2)).numpy()
        exact = exact[:, :, :h, :w].transpose(0, 2, 3, 1)
        t0 = time.time()
        out = np.asarray(fwd(params, x))
        t_jax = time.time() - t0
        diff = float(np.max(np.abs(out - ref)))
        rel = diff / float(np.max(np.abs(ref)))
        ours64 = float(np.max(np.abs(out - exact)))
        lte64 = float(np.max(np.abs(ref - exact)))
        row = dict(size=f"{h}x{w}", aligned=h % 8 == 0 and w % 8 == 0,
                   lte_output_shape=list(ref_full.shape), ours_shape=list(out.shape),
                   max_abs_diff=diff, max_abs_ref=float(np.max(np.abs(ref))),
                   rel_diff=rel, ours_vs_lte_float64=ours64, lte_float32_vs_float64=lte64,
                   torch_s=round(t_torch, 2), jax_s_incl_compile=round(t_jax, 2))
        results.append(row)
        print(f"{h}x{w}: max |ours - LTE| = {diff:.3g} (max |LTE| {row['max_abs_ref']:.3g}); "
              f"vs LTE in float64: ours {ours64:.3g}, LTE float32 {lte64:.3g}; "
              f"LTE output {tuple(ref_full.shape)} (NCHW, padded), ours {tuple(out.shape)}")
    print(json.dumps(dict(params=n_params, out_dim=int(model.out_dim), results=results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
