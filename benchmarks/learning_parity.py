"""Learning parity: train the same small MSIT with the official PyTorch code and with
msit-jax, on the same data and protocol, and compare the final PSNRs.

    python -m benchmarks.learning_parity --reference /path/to/MSIT --data /data/_291 \
        --eval_data /data [--steps 2000] [--seeds 0 1] [--side ours|theirs|both] [--out DIR]
    python -m benchmarks.learning_parity --report_only --out DIR   # table + plot from DIR

Both sides train one reduced MSIT (configs/default.py's model: EDSR-baseline 2 x 16,
dim 32, 4 heads, r 1, 4 MSNO heads, 2 Q/K heads, MLP (64, 64), posenc 16, plain convs)
from their own random init, with the official stage-1 batch protocol (one scale per
batch from U(1, 4), LR by Pillow bicubic, sample_q HR pixels without replacement,
flips/transpose), L1 loss, Adam, and the reference schedule (linear warm-up x10,
then cosine) stepped once per "epoch" of --epoch_steps steps.

- theirs: the official `image-folder` dataset and `sr-implicit-downsampled-cascaded`
  wrapper (as its train YAML configures them), the official `models.make`, Adam from
  `utils.make_optimizer` and the official `GradualWarmupScheduler` chained into
  `CosineAnnealingLR`, in a loop that does what the official `train.py` does (its
  `train` function, with the scheduler stepped every --epoch_steps steps). The
  official code is imported from --reference at run time; nothing is copied. Its
  RiM convs are swapped for plain `nn.Conv2d` at run time (the commented-out stage-1
  lines of its test_mod.py; a fresh RiM's frozen base kernel is zero), `.cuda()` is a
  no-op, and timm / torchvision get minimal stand-ins (`_standins`).
- ours: `msit_jax.training.loop.train_and_evaluate` with the same settings.

Both record the training loss every --log_every steps and Set5 x4 validation PSNR
(msit-jax's `validation_metrics`, Y channel, shave = scale) every --val_every steps.
The final weights of both sides are written as official checkpoints and evaluated
the same way (after all runs are trained, in one process): `msit_jax.io.pretrained.load` + `msit_jax.eval.runner.run` on Set5 and
Set14 at x2, x3, x4 (the benchmark preset: Y-channel PSNR, shave = scale).

Before training, a sanity check: msit-jax's init is converted to an official
state_dict (`msit_jax.io.torch_io`), which must load into the official model with
identical keys and shapes, and both forwards (train-mode BatchNorm and eval-mode)
must agree on a random batch.

Run it pinned to one core (`taskset -c 1 ...`); torch is set to one thread. Each (side, seed) run writes OUT/<side>_seed<k>/ and is
skipped when its train.json (training) / result.json (final evaluation) exists, so an
interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import types
from typing import Any, Optional, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

SIDES = ("ours", "theirs")
EVAL_SETS = ("Set5", "Set14")
EVAL_SCALES = (2.0, 3.0, 4.0)
VAL_SET, VAL_SCALE = "Set5", 4.0
PLOT_LOSS_STEPS = 200  # the plot's loss points average this many steps


# ---------------------------------------------------------------------------- settings

def default_settings() -> dict:
    """The compared protocol (every number both sides use)."""
    return dict(steps=2000, batch=4, inp_size=24, sample_q=576, scale_min=1.0,
                scale_max=4.0, repeat=8, lr=2e-4, multiplier=10.0, epoch_steps=20,
                warmup_epochs=5, log_every=50, val_every=500)


def model_cfg():
    """configs/default.py's model (plain convs, stage 1)."""
    from msit_jax.models.config import tiny_model_config

    m = tiny_model_config("edsr-baseline", conv="plain")
    m.edsr.update(n_resblocks=2, n_feats=16)
    m.update(dim=32, heads=4, radius=1, msno_heads=4, qk_heads=2, mlp_hidden=(64, 64),
             posenc_dims=16)
    return m


def schedule_epochs(s: dict) -> tuple[int, int]:
    """(warm-up epochs W, total epochs E) of the per-epoch schedule; checks divisibility."""
    if s["steps"] % s["epoch_steps"]:
        raise SystemExit(f"--steps {s['steps']} must be a multiple of --epoch_steps "
                         f"{s['epoch_steps']}")
    e = s["steps"] // s["epoch_steps"]
    if not 0 < s["warmup_epochs"] < e:
        raise SystemExit(f"--warmup_epochs must be in (0, {e})")
    return s["warmup_epochs"], e


def window_means(steps: Sequence[int], values: Sequence[float], every: int
                 ) -> tuple[list[int], list[float]]:
    """Mean of `values` over windows of `every` consecutive steps (1-based step numbers):
    (window end steps, means), as msit-jax's train log aggregates (a last partial window
    ends at the last step)."""
    out_s, out_v, acc = [], [], []
    for s, v in zip(steps, values):
        acc.append(v)
        if s % every == 0 or s == steps[-1]:
            out_s.append(int(s))
            out_v.append(float(np.mean(acc)))
            acc = []
    return out_s, out_v


def summarize(finals: dict) -> dict:
    """finals: {side: {seed: {'Set5': {'x2': psnr, ...}, ...}}} -> per (set, scale):
    per-seed values, mean, spread (max - min over seeds) per side, |diff of means| and
    the verdict (|diff| <= max(0.1 dB, larger spread))."""
    rows = {}
    sides = [s for s in SIDES if finals.get(s)]
    keys = []
    for side in sides:
        for res in finals[side].values():
            for ds, scores in res.items():
                for sc in scores:
                    if (ds, sc) not in keys:
                        keys.append((ds, sc))
    for ds, sc in keys:
        row: dict[str, Any] = {}
        for side in sides:
            vals = {seed: r[ds][sc] for seed, r in sorted(finals[side].items())
                    if ds in r and sc in r[ds]}
            v = list(vals.values())
            row[side] = dict(per_seed=vals, mean=float(np.mean(v)),
                             spread=float(max(v) - min(v)) if len(v) > 1 else 0.0)
        if len(sides) == 2:
            diff = abs(row["ours"]["mean"] - row["theirs"]["mean"])
            tol = max(0.1, row["ours"]["spread"], row["theirs"]["spread"])
            row.update(abs_diff=diff, tolerance=tol, agree=bool(diff <= tol))
        rows[f"{ds} {sc}"] = row
    return rows


def markdown_table(rows: dict, seeds: Sequence[int]) -> str:
    """The summary as a markdown table."""
    head = ["set, scale"]
    for side in SIDES:
        head += [f"{side} seed {k}" for k in seeds] + [f"{side} mean", f"{side} spread"]
    head += ["\\|diff of means\\|", "tolerance", "agree"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in rows.items():
        cells = [key]
        for side in SIDES:
            r = row.get(side)
            if r is None:
                cells += ["-"] * (len(seeds) + 2)
                continue
            cells += [f"{r['per_seed'][k]:.3f}" if k in r["per_seed"] else "-" for k in seeds]
            cells += [f"{r['mean']:.3f}", f"{r['spread']:.3f}"]
        if "abs_diff" in row:
            cells += [f"{row['abs_diff']:.3f}", f"{row['tolerance']:.3f}",
                      "yes" if row["agree"] else "**no**"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- official code

def _standins() -> None:
    """No-op `.cuda()`; timm's DropPath / to_2tuple / trunc_normal_ and torchvision's
    ToTensor / ToPILImage / Resize(BICUBIC) with torchvision's semantics on PIL images
    (ToPILImage of a float tensor is `mul(255).byte()`, as torchvision does), only where
    the real packages are missing."""
    import torch
    from PIL import Image

    from compare_torch import timm_standins  # the sibling script's timm stand-ins

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    timm_standins()
    try:
        import torchvision.transforms  # noqa: F401
    except ImportError:
        tr = types.ModuleType("torchvision.transforms")

        class InterpolationMode:
            BICUBIC = Image.BICUBIC

        class ToTensor:
            def __call__(self, pic):
                a = np.asarray(pic, dtype=np.uint8)
                if a.ndim == 2:
                    a = a[:, :, None]
                t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
                return t.float().div(255)

        class ToPILImage:
            def __call__(self, pic):
                if pic.is_floating_point():
                    pic = pic.mul(255).byte()
                return Image.fromarray(pic.permute(1, 2, 0).numpy(), "RGB")

        class Resize:
            def __init__(self, size, interpolation=Image.BICUBIC):
                self.size, self.interpolation = size, interpolation

            def __call__(self, img):
                h, w = self.size
                return img.resize((w, h), self.interpolation)

        tr.InterpolationMode, tr.ToTensor, tr.ToPILImage, tr.Resize = (
            InterpolationMode, ToTensor, ToPILImage, Resize)
        tv = types.ModuleType("torchvision")
        tv.transforms = tr
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tr})


def _plain_conv(in_channels, out_channels, kernel_size, stride=1, padding=None, groups=1,
                map_k=3):
    """A plain nn.Conv2d where the official code builds a RiM (stage 1)."""
    import torch

    pad = kernel_size // 2 if padding is None else padding
    return torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                           padding=pad, groups=groups)


def official(reference: str) -> types.SimpleNamespace:
    """The official modules (datasets, models, utils, scheduler), imported from the
    checkout at run time, with RiM -> plain conv."""
    import torch

    torch.set_num_threads(1)
    _standins()
    ref = os.path.abspath(reference)
    if ref not in sys.path:
        sys.path.insert(0, ref)
    import test_mod  # noqa: E402 (the official module)

    test_mod.RiM = _plain_conv
    import datasets  # noqa: E402
    import models  # noqa: E402
    import models.msit  # noqa: E402
    import scheduler  # noqa: E402
    import utils  # noqa: E402

    models.msit.RiM = _plain_conv
    return types.SimpleNamespace(datasets=datasets, models=models, utils=utils,
                                 scheduler=scheduler, torch=torch)


def official_spec(cfg) -> dict:
    from msit_jax.io.pretrained import official_args

    return {"name": "amsit", "args": official_args(cfg)}


def save_official_checkpoint(path: str, spec: dict, state_dict: dict) -> None:
    """{'model': {'name', 'args', 'sd'}} as the official train.py saves it."""
    import torch

    sd = {k: (v if hasattr(v, "detach") else torch.from_numpy(np.asarray(v)))
          for k, v in state_dict.items()}
    torch.save({"model": {"name": spec["name"], "args": spec["args"], "sd": sd}}, path)


def sd_to_numpy(model) -> dict:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- sanity check

def sanity_check(reference: str, seed: int = 0) -> dict:
    """msit-jax's init -> official state_dict: same keys and shapes as the official model's
    own; then both forwards on a random x2.5 batch (train-mode BatchNorm and eval-mode)."""
    import jax

    from msit_jax import geometry
    from msit_jax.io.torch_io import variables_to_state_dict
    from msit_jax.models.model import build_model, dummy_inputs
    from msit_jax.training.state import init_variables

    off = official(reference)
    torch = off.torch
    cfg = model_cfg()
    spec = official_spec(cfg)
    torch.manual_seed(seed)
    tmodel = off.models.make(spec)
    own = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    model = build_model(cfg)
    variables = jax.device_get(init_variables(model, jax.random.PRNGKey(seed),
                                              dummy_inputs(cfg, (16, 16), 64)))
    sd = variables_to_state_dict(variables, cfg)
    conv = {k: tuple(np.shape(v)) for k, v in sd.items()}
    missing, unexpected = sorted(set(own) - set(conv)), sorted(set(conv) - set(own))
    shape_diff = sorted(k for k in set(own) & set(conv) if own[k] != conv[k])
    # The official LEM's mix_margin is a requires_grad scalar that the forward reads with
    # .item(): it never gets a gradient, so it is not counted (msit-jax has it as a constant).
    n_params = int(sum(p.numel() for n_, p in tmodel.named_parameters()
                       if p.requires_grad and n_ != "amsno.lem.mix_margin"))
    n_ours = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"])))
    tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                           strict=False)

    rs = np.random.RandomState(seed)
    b, n, hr, q = 2, 20, 50, 300
    inp = rs.uniform(-1, 1, (b, n, n, 3)).astype(np.float32)
    coord = np.stack([geometry.make_coord((hr, hr)).reshape(-1, 2)[rs.choice(hr * hr, q, False)]
                      for _ in range(b)])
    cell = np.tile(np.array([[2.0 / hr, 2.0 / hr]], np.float32), (b, 1))
    geom = geometry.query_geometry(coord, (n, n), cfg.radius, cell * np.float32(n))
    out = {}
    # eval first: a torch train-mode forward updates the BatchNorm running statistics.
    for mode in ("eval", "train"):
        train = mode == "train"
        if train:
            ours, _ = model.apply(variables, inp, geom, train=True, mutable=["batch_stats"])
            tmodel.train()
        else:
            ours = model.apply(variables, inp, geom, train=False)
            tmodel.eval()
        with torch.no_grad():
            coords = [torch.from_numpy(geometry.make_coord((hr, hr)))[None].repeat(b, 1, 1, 1)]
            theirs = tmodel(torch.from_numpy(inp).permute(0, 3, 1, 2), coords,
                            torch.from_numpy(coord), torch.from_numpy(cell))[-1].numpy()
        out[f"forward_max_abs_diff_{mode}"] = float(np.max(np.abs(np.asarray(ours) - theirs)))
    out.update(n_tensors=len(own), missing=missing, unexpected=unexpected,
               shape_mismatch=shape_diff, params_theirs=n_params, params_ours=n_ours)
    out["ok"] = (not missing and not unexpected and not shape_diff and n_params == n_ours
                 and max(out["forward_max_abs_diff_train"],
                         out["forward_max_abs_diff_eval"]) < 1e-4)
    return out


# ---------------------------------------------------------------------------- validation

def eval_config(scales: Sequence[float]):
    """config.eval for Set5 validation: the benchmark protocol (Y, shave = scale)."""
    from msit_jax.training.config import base_config

    e = base_config().eval
    e.update(scales=tuple(float(s) for s in scales), max_images=0, max_side=0,
             shave_extra=0, y_channel=True, chunk=8192)
    return e


def validate(cfg, variables: dict, source, ecfg) -> dict:
    from msit_jax.training.loop import validation_metrics

    return validation_metrics(cfg, variables, source, ecfg)


# ---------------------------------------------------------------------------- theirs

def train_theirs(a: argparse.Namespace, s: dict, seed: int, run_dir: str) -> dict:
    """The official side: official dataset + wrapper + model + optimizer + schedulers, a
    loop doing what official train.py's `train` does."""
    from msit_jax.data.sources import make_source
    from msit_jax.io.torch_io import state_dict_to_variables
    from msit_jax.training.config import source_config

    off = official(a.reference)
    torch = off.torch
    F = torch.nn.functional
    cfg = model_cfg()
    spec = official_spec(cfg)
    W, E = schedule_epochs(s)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    dataset = off.datasets.make({"name": "image-folder", "args": {
        "root_path": a.data, "repeat": s["repeat"], "cache": "none"}})
    wrapper = off.datasets.make({"name": "sr-implicit-downsampled-cascaded", "args": {
        "inp_size": s["inp_size"], "batch_size": s["batch"], "scale_min": [s["scale_min"]],
        "scale_max": [s["scale_max"]], "sample_q": s["sample_q"], "augment": True,
        "phase": "train", "k": 1}}, args={"dataset": dataset})
    # drop_last: the wrapper's coords/cell have `batch_size` rows, so a last partial batch
    # would not run (the official configs never have one: 800 x 40 / 32 steps).
    loader = torch.utils.data.DataLoader(wrapper, batch_size=s["batch"], shuffle=True,
                                         num_workers=0, collate_fn=wrapper.collate_fn,
                                         drop_last=True)
    model = off.models.make(spec)
    optimizer = off.utils.make_optimizer(model.parameters(), {"name": "adam",
                                                              "args": {"lr": s["lr"]}})
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, E - W)
    sched = off.scheduler.GradualWarmupScheduler(optimizer, multiplier=s["multiplier"],
                                                 total_epoch=W, after_scheduler=cosine)
    val_source = make_source(source_config("folder", path=os.path.join(a.eval_data, VAL_SET)))
    ecfg = eval_config([VAL_SCALE])
    sub = torch.tensor([0.5]).view(1, -1, 1, 1)
    div = torch.tensor([0.5]).view(1, -1, 1, 1)

    losses, lrs, scales, val = [], [], [], []
    step, t0, t_val = 0, time.perf_counter(), 0.0
    model.train()
    while step < s["steps"]:
        for batch in loader:
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            bs = batch["inp"].shape[0]
            scales.append(batch["gt"].shape[-1] / s["inp_size"])
            inp = (batch["inp"] - sub) / div
            preds = model(inp, batch["coords"], batch["sample_coord"], batch["cell"])
            gt = F.grid_sample((batch["gt"] - sub) / div,
                               batch["sample_coord"].unsqueeze(2).flip(-1), mode="nearest",
                               align_corners=False).permute(0, 2, 3, 1).reshape(bs, -1, 3)
            loss = F.l1_loss(preds[-1], gt)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            step += 1
            if step % s["epoch_steps"] == 0:
                sched.step()
            if step % s["log_every"] == 0:
                el = time.perf_counter() - t0 - t_val
                print(f"[theirs seed {seed}] step {step}: loss {np.mean(losses[-s['log_every']:]):.4f}"
                      f" lr {lrs[-1]:.2e} ({el / step:.3f} s/step)", flush=True)
            if step % s["val_every"] == 0 or step == s["steps"]:
                tv = time.perf_counter()
                model.eval()
                variables = state_dict_to_variables(sd_to_numpy(model), cfg)
                v = validate(cfg, variables, val_source, ecfg)
                model.train()
                val.append(dict(step=step, psnr=float(v[f"psnr_x{VAL_SCALE:g}"])))
                t_val += time.perf_counter() - tv
                print(f"[theirs seed {seed}] step {step}: val {VAL_SET} x{VAL_SCALE:g} "
                      f"{val[-1]['psnr']:.3f} dB", flush=True)
            if step >= s["steps"]:
                break
    train_s = time.perf_counter() - t0 - t_val
    ckpt = os.path.join(run_dir, "final.pth")
    save_official_checkpoint(ckpt, spec, model.state_dict())
    log_s, log_v = window_means(list(range(1, len(losses) + 1)), losses, s["log_every"])
    return dict(checkpoint=ckpt, loss_steps=log_s, loss=log_v, lr=lrs, val=val,
                scale_mean=float(np.mean(scales)), train_seconds=train_s,
                val_seconds=t_val)


# ---------------------------------------------------------------------------- ours

def ours_config(a: argparse.Namespace, s: dict, seed: int):
    """The msit-jax training config of the same run."""
    from msit_jax.training.config import base_config, source_config

    W, _ = schedule_epochs(s)
    c = base_config()
    c.seed = seed
    c.model = model_cfg()
    c.batch_size = s["batch"]
    c.total_steps = s["steps"]
    c.lr.update(base=s["lr"], multiplier=s["multiplier"],
                warmup_steps=W * s["epoch_steps"], epoch_steps=s["epoch_steps"])
    c.data.train = source_config("folder", path=a.data)
    c.data.update(inp_size=s["inp_size"], sample_q=s["sample_q"], scale_min=s["scale_min"],
                  scale_max=s["scale_max"], augment=True, repeat=s["repeat"], num_workers=0,
                  num_threads=1, buffer_size=2, device_buffer=2)
    c.eval.update(eval_config([VAL_SCALE]))
    c.eval.source = source_config("folder", path=os.path.join(a.eval_data, VAL_SET))
    c.eval.every_steps = s["val_every"]
    c.checkpoint.update(every_steps=s["steps"], keep=1, keep_best=False, async_save=False)
    c.log_every_steps = s["log_every"]
    c.progress_bar = False
    c.tensorboard = False
    c.demo.enabled = False
    return c


def train_ours(a: argparse.Namespace, s: dict, seed: int, run_dir: str) -> dict:
    from msit_jax.io.torch_io import variables_to_state_dict
    from msit_jax.training.loop import train_and_evaluate
    from msit_jax.training.metrics import read_jsonl
    from msit_jax.training.schedule import lr_schedule

    cfg = ours_config(a, s, seed)
    workdir = os.path.join(run_dir, "workdir")
    t0 = time.perf_counter()
    result = train_and_evaluate(cfg, workdir)
    wall = time.perf_counter() - t0
    recs = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train = [r for r in recs if r["split"] == "train"]
    val = [dict(step=r["step"], psnr=r[f"psnr_x{VAL_SCALE:g}"]) for r in recs
           if r["split"] == "val"]
    variables = {k: result.state[k] for k in ("params", "batch_stats", "frozen")
                 if result.state.get(k)}
    ckpt = os.path.join(run_dir, "final.pth")
    save_official_checkpoint(ckpt, official_spec(cfg.model),
                             variables_to_state_dict(variables, cfg.model))
    sched = lr_schedule(cfg.lr.base, cfg.lr.multiplier, cfg.lr.warmup_steps, cfg.total_steps,
                        cfg.lr.epoch_steps)
    lrs = [float(v) for v in np.asarray(sched(np.arange(cfg.total_steps)))]
    rate = [r["steps_per_sec"] for r in train if r.get("steps_per_sec")]
    return dict(checkpoint=ckpt, loss_steps=[r["step"] for r in train],
                loss=[r["loss"] for r in train], lr=lrs, val=val,
                train_seconds_total_incl_val=wall,
                mean_steps_per_sec=float(np.mean(rate)) if rate else None)


# ---------------------------------------------------------------------------- final eval

def final_eval(checkpoint: str, eval_data: str, out_json: str, model: str = "msit") -> dict:
    """{'Set5': {'x2': psnr, ...}, 'Set14': {...}} through msit-jax's evaluation runner
    (model 'bicubic': the baseline, no checkpoint)."""
    from msit_jax.eval import runner

    c = runner.default_config()
    c.model = model
    c.checkpoint = checkpoint
    c.data = [os.path.join(eval_data, d) for d in EVAL_SETS]
    c.scales = list(EVAL_SCALES)
    c.progress = False
    c.json = out_json
    results, _, failures = runner.run(c)
    if failures:
        print("evaluation failures:", failures, file=sys.stderr)
    return {ds: {f"x{s:g}": float(r.psnr) for s, r in per.items()}
            for ds, per in results.items()}


def official_test_psnr(reference: str, checkpoint: str, eval_data: str, dataset: str,
                       scale: int) -> float:
    """The official test protocol on one (set, integer scale): its `test.eval_psnr` with
    the test YAML's settings (image-folder + `sr-implicit-downsampled-cascaded`,
    phase 'valid', scale_base 4; eval_type benchmark-<s>, chop_forward in chunks of
    30000 queries)."""
    import tempfile

    off = official(reference)
    torch = off.torch
    torch.cuda.synchronize = lambda *a, **k: None
    import test as official_test  # noqa: E402 (the official test.py)

    folder = off.datasets.make({"name": "image-folder", "args": {
        "root_path": os.path.join(eval_data, dataset)}})
    wrapper = off.datasets.make({"name": "sr-implicit-downsampled-cascaded", "args": {
        "batch_size": 1, "scale_max": scale, "scale_base": 4, "phase": "valid"}},
        args={"dataset": folder})
    loader = torch.utils.data.DataLoader(wrapper, batch_size=1, shuffle=False, num_workers=0,
                                         collate_fn=wrapper.collate_fn)
    spec = torch.load(checkpoint, weights_only=False)["model"]
    model = off.models.make(spec, load_sd=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = official_test.eval_psnr(
            loader, model, "check", data_norm={"inp": {"sub": [0.5], "div": [0.5]},
                                               "gt": {"sub": [0.5], "div": [0.5]}},
            eval_type=f"benchmark-{scale}", eval_bsize=30000, scale_max=scale,
            save_dir=tmp, save_fig=False)
    return float(res)


def official_check(a: argparse.Namespace) -> dict:
    """Set5 x4 of every final checkpoint in OUT through the official test protocol, next
    to msit-jax's runner figure for the same weights."""
    out = {}
    for side in SIDES:
        for seed in a.seeds:
            p = os.path.join(a.out, f"{side}_seed{seed}", "result.json")
            if not os.path.exists(p):
                continue
            with open(p) as f:
                r = json.load(f)
            theirs = official_test_psnr(a.reference, r["checkpoint"], a.eval_data, "Set5", 4)
            ours = r["final"]["Set5"]["x4"]
            out[f"{side}_seed{seed}"] = dict(official_protocol=theirs, msit_jax_runner=ours,
                                            diff=theirs - ours)
            print(f"{side} seed {seed}: Set5 x4 official test.py {theirs:.4f} dB, msit-jax "
                  f"runner {ours:.4f} dB", flush=True)
    with open(os.path.join(a.out, "official_check.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


# ---------------------------------------------------------------------------- plot, report

def plot(runs: dict, path: str, settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"ours": "tab:blue", "theirs": "tab:orange"}
    names = {"ours": "msit-jax", "theirs": "official PyTorch"}
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
    every = settings.get("log_every", 50)
    group = max(1, PLOT_LOSS_STEPS // every)
    for side in SIDES:
        for i, (seed, r) in enumerate(sorted(runs.get(side, {}).items())):
            ls = styles[i % len(styles)]
            # the logged windows (every `log_every` steps) averaged in groups: a batch of 4
            # at one random scale makes single windows too noisy to compare by eye
            n = len(r["loss"]) // group * group
            xs = [r["loss_steps"][k + group - 1] for k in range(0, n, group)]
            ys = [float(np.mean(r["loss"][k:k + group])) for k in range(0, n, group)]
            ax1.plot(xs, ys, linestyle=ls, marker="o", color=colors[side], ms=3,
                     label=f"{names[side]}, seed {seed}", lw=1.2)
            ax2.plot([v["step"] for v in r["val"]], [v["psnr"] for v in r["val"]], linestyle=ls,
                     marker="o", color=colors[side], label=f"{names[side]}, seed {seed}", ms=4)
    ax1.set(xlabel="step", ylabel=f"training L1 loss (mean over {group * every} steps)",
            title="training loss")
    ax2.set(xlabel="step", ylabel="PSNR (dB, Y)", title=f"validation: {VAL_SET} x{VAL_SCALE:g}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learning parity: msit-jax vs the official MSIT code, same model, data and "
                 "protocol", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: str, seeds: Sequence[int], plot_path: Optional[str]) -> dict:
    runs: dict = {}
    for side in SIDES:
        for seed in seeds:
            p = os.path.join(out, f"{side}_seed{seed}", "result.json")
            if os.path.exists(p):
                with open(p) as f:
                    runs.setdefault(side, {})[seed] = json.load(f)
    finals = {side: {seed: r["final"] for seed, r in per.items()} for side, per in runs.items()}
    rows = summarize(finals)
    table = markdown_table(rows, seeds)
    settings = next(iter(next(iter(runs.values())).values()))["settings"] if runs else {}
    lr_check = None
    if "ours" in runs and "theirs" in runs:
        a = np.asarray(next(iter(runs["ours"].values()))["lr"])
        b = np.asarray(next(iter(runs["theirs"].values()))["lr"])
        n = min(len(a), len(b))
        lr_check = float(np.max(np.abs(a[:n] - b[:n]) / np.maximum(b[:n], 1e-30)))
    bic_path = os.path.join(out, "bicubic.json")
    bicubic = json.load(open(bic_path)) if os.path.exists(bic_path) else None
    check_path = os.path.join(out, "official_check.json")
    check = json.load(open(check_path)) if os.path.exists(check_path) else None
    summary = dict(settings=settings, rows=rows, lr_max_rel_diff=lr_check,
                   official_check=check, bicubic=bicubic,
                   all_agree=all(r.get("agree", False) for r in rows.values()) if rows else None,
                   timings={side: {seed: {k: r.get(k) for k in (
                       "train_seconds", "val_seconds", "train_seconds_total_incl_val",
                       "mean_steps_per_sec", "eval_seconds")} for seed, r in per.items()}
                       for side, per in runs.items()},
                   finals=finals)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if lr_check is not None:
        print(f"learning rate, max relative difference over all steps: {lr_check:.2e}")
    if plot_path and runs:
        plot(runs, plot_path, settings)
        print(f"wrote {plot_path}")
    return summary


# ---------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    d = default_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="the official MSIT checkout")
    p.add_argument("--data", help="training HR image folder")
    p.add_argument("--eval_data", help="folder holding Set5/ and Set14/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--side", choices=("ours", "theirs", "both"), default="both")
    p.add_argument("--out", default="runs/learning_parity")
    p.add_argument("--plot", default="docs/learning_parity.png")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--skip_sanity", action="store_true")
    p.add_argument("--official_check", action="store_true",
                   help="only: Set5 x4 of the finished runs' weights through the official "
                        "test protocol (official test.py's eval_psnr)")
    for k, v in d.items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    a = p.parse_args(argv)
    s = {k: getattr(a, k) for k in d}
    os.makedirs(a.out, exist_ok=True)
    if a.report_only:
        report(a.out, a.seeds, a.plot)
        return 0
    if a.official_check:
        if not (a.reference and a.eval_data):
            p.error("--official_check needs --reference and --eval_data")
        official_check(a)
        return 0
    for need in ("data", "eval_data"):
        if not getattr(a, need):
            p.error(f"--{need} is required")
    sides = SIDES if a.side == "both" else (a.side,)
    if "theirs" in sides and not a.reference:
        p.error("--reference is required for the official side")
    schedule_epochs(s)
    if a.reference and not a.skip_sanity:
        path = os.path.join(a.out, "sanity.json")
        if not os.path.exists(path):
            chk = sanity_check(a.reference)
            with open(path, "w") as f:
                json.dump(chk, f, indent=2)
        with open(path) as f:
            chk = json.load(f)
        print("sanity check:", json.dumps(chk))
        if not chk["ok"]:
            print("sanity check failed: the two models differ", file=sys.stderr)
            return 1
    # Train everything first, then evaluate everything in this one process: the jitted
    # decoders are cached per model config, so the final evaluations share compilations.
    for seed in a.seeds:
        for side in sides:
            run_dir = os.path.join(a.out, f"{side}_seed{seed}")
            train_path = os.path.join(run_dir, "train.json")
            if os.path.exists(train_path):
                print(f"{side} seed {seed}: trained ({train_path})")
                continue
            os.makedirs(run_dir, exist_ok=True)
            t0 = time.perf_counter()
            r = (train_ours if side == "ours" else train_theirs)(a, s, seed, run_dir)
            r["wall_seconds"] = time.perf_counter() - t0
            r.update(side=side, seed=seed, settings=s, model_args=official_spec(model_cfg()))
            with open(train_path, "w") as f:
                json.dump(r, f)
            print(f"{side} seed {seed}: trained in {r['wall_seconds']:.0f} s", flush=True)
    for seed in a.seeds:
        for side in sides:
            run_dir = os.path.join(a.out, f"{side}_seed{seed}")
            res_path = os.path.join(run_dir, "result.json")
            if os.path.exists(res_path):
                continue
            with open(os.path.join(run_dir, "train.json")) as f:
                r = json.load(f)
            t1 = time.perf_counter()
            r["final"] = final_eval(r["checkpoint"], a.eval_data,
                                    os.path.join(run_dir, "final_eval.json"))
            r["eval_seconds"] = time.perf_counter() - t1
            with open(res_path, "w") as f:
                json.dump(r, f)
            print(f"{side} seed {seed}: {json.dumps(r['final'])} "
                  f"({r['eval_seconds']:.0f} s eval)", flush=True)
    bic = os.path.join(a.out, "bicubic.json")
    if not os.path.exists(bic):
        with open(bic, "w") as f:
            json.dump(final_eval("", a.eval_data, os.path.join(a.out, "bicubic_eval.json"),
                                 model="bicubic"), f)
    report(a.out, a.seeds, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
