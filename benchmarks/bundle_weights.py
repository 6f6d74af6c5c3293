"""Ship a training run's weights inside the package, with its model card and figures.

    python -m benchmarks.bundle_weights WORKDIR [--name msit-lite] [--data_root /work/data] \\
        [--machine "1 core of ..."] [--step latest|N] [--context published.json]

1. Reads the run: WORKDIR/config.json, model_config.json, metrics.jsonl,
   config_history.jsonl and the checkpoint steps.
2. Exports the FINAL checkpoint (`--step latest`, the default) with the project's
   safetensors export (`msit_jax.export`, unfolded: the official layout with
   BatchNorm; `Upscaler.from_pretrained` folds it). Final, not "best": the best
   checkpoint is chosen by the validation PSNR on astronaut and chelsea, and a
   shipped model's figures should not depend on a choice made on images it is
   scored against elsewhere; with a decaying learning rate the last step is also
   the one the schedule was designed to end on. `--step N` ships another step
   (the card names it).
3. Refuses files over --max_mb (default 5 MB = 5,000,000 bytes).
4. Scores THE FILE TO BE SHIPPED through the evaluation runner (`msit_jax.eval.runner`:
   `pretrained.load` + fold + `inference.Engine`, what `Upscaler.from_pretrained`
   builds) on Set5, Set14 and B100 at x2, x3, x4, x6, x8 with the benchmark protocol
   (PSNR / SSIM on Y, shave = scale, LR made as the reference does), plus bicubic.
5. Moves msit_jax/weights/NAME.safetensors, NAME.md (the model card) and NAME.json
   (the figures, per image too) into place, checks that the bundled name now
   resolves to those bytes (sha256), rewrites README.md between
   `<!-- NAME table -->` and `<!-- /NAME table -->`, and prints that table.

Nothing is replaced when a step fails (size, a failed image, a missing dataset):
everything is staged in a temporary folder beside the package's weights first.

--context: a JSON list of published rows to print beside ours, each
{"method", "source", "psnr": {"Set5": {"2": 36.66, ...}, ...}}; only numbers
checked against their source belong there. Without it the card says that no
published rows were included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np

from msit_jax import weights

from msit_jax.export import cli as export_cli
from msit_jax.data.sources import named_source
from msit_jax.eval import reports, runner
from msit_jax.io import model_dir, pretrained, workdir as workdir_io
from msit_jax.io.torch_io import variables_to_state_dict
from msit_jax.models import reparam
from msit_jax.models.encoders import encoder_sizes, encoder_spec
from msit_jax.training.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = ("set5", "set14", "b100")
SCALES = (2.0, 3.0, 4.0, 6.0, 8.0)
MAX_MB = 5.0
MB = 1_000_000
TRAIN_DATA = ("the 291 set: T91 (Yang et al. 2010) + BSD200 (the Berkeley Segmentation "
              "Dataset's 200 training images), as distributed in github.com/jiny2001/"
              "dcscn-super-resolution (data/yang91 + data/bsd200)")
LICENSE_NOTE = ("The msit-jax code and these weights are licensed under the Apache License "
                "2.0 (Apache-2.0: the LICENSE file, and `license` in pyproject.toml). The "
                "official MSIT code (github.com/Jinchen2028/MSIT) is MIT-licensed; this is an "
                "independent re-implementation.")


def die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# ----------------------------------------------------------------------------- the run

def count_images(folder: str) -> Optional[int]:
    if not folder or not os.path.isdir(folder):
        return None
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    return sum(1 for n in os.listdir(folder) if n.lower().endswith(exts))


def training_images(train_src: dict, data_root: str) -> tuple[str, Optional[int]]:
    """(how the card names the training data, its image count or None) of a config block."""
    if train_src.get("kind") == "named":
        try:
            src = named_source(train_src["name"], data_root=train_src.get("data_root")
                               or data_root)
        except (OSError, ValueError) as e:
            print(f"warning: could not count the training images ({e})", file=sys.stderr)
            return f"the named sets {train_src['name']}", None
        return f"the named sets {train_src['name']}", len(src)
    return train_src.get("path", ""), count_images(train_src.get("path", ""))


def read_run(wd: str, step: str, data_root: str = "") -> dict[str, Any]:
    """What the card says about training, read from the workdir (nothing assumed)."""
    if not workdir_io.is_training_workdir(wd):
        die(f"{wd} is not a training workdir (expected model_config.json and checkpoints/)")
    steps = workdir_io.saved_steps(wd)
    if not steps:
        die(f"{wd}: no finished checkpoint")
    if step != "latest" and not step.isdigit():
        die(f"--step must be 'latest' or a step number, got {step!r}")
    chosen = steps[-1] if step == "latest" else int(step)
    if chosen not in steps:
        die(f"{wd}: no checkpoint at step {chosen} (have {steps})")
    with open(os.path.join(wd, "config.json")) as f:
        config = json.load(f)
    history = read_jsonl(os.path.join(wd, "config_history.jsonl"))
    metrics = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    train = [m for m in metrics if m.get("split") == "train" and m["step"] <= chosen]
    val = [m for m in metrics if m.get("split") == "val" and m["step"] <= chosen]
    # Step time from the logged throughput: each record covers the steps since the previous
    # one (its steps_per_sec is over that window; the first includes compilation).
    step_seconds, prev = 0.0, 0
    for m in sorted(train, key=lambda m: m["step"]):
        if m.get("steps_per_sec"):
            step_seconds += (m["step"] - prev) / m["steps_per_sec"]
        prev = m["step"]
    ckpt_dir = os.path.join(wd, workdir_io.CHECKPOINT_DIR, str(chosen))
    end = datetime.datetime.fromtimestamp(os.path.getmtime(ckpt_dir), datetime.timezone.utc)
    start = (datetime.datetime.fromisoformat(history[0]["time"]) if history and "time" in
             history[0] else None)
    train_src = config.get("data", {}).get("train", {})
    return {
        "workdir": os.path.abspath(wd), "step": chosen, "steps": steps,
        "total_steps": config.get("total_steps"), "config": config,
        "starts": len(history), "start": start.isoformat() if start else None,
        "end": end.isoformat(timespec="seconds"),
        "wall_s": (end - start).total_seconds() if start else None,
        "step_s": step_seconds, "last_train": train[-1] if train else None,
        "last_val": val[-1] if val else None,
        "train_kind": train_src.get("kind", ""),
        **dict(zip(("train_path", "train_images"), training_images(train_src, data_root))),
    }


def detect_machine() -> str:
    """This machine, in words (the card says it was detected where the script ran)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {n} CPU core(s) available to the process (detected by bundle_weights.py)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------- figures

def evaluate(path: str, data_root: str, sets, scales, json_path: str) -> tuple[dict, dict]:
    """(MSIT results, bicubic results) of the weights file `path` via the evaluation runner."""
    cfg = runner.default_config()
    cfg.model = "msit"
    cfg.checkpoint = path
    cfg.data = list(sets)
    cfg.data_root = data_root
    cfg.scales = [float(s) for s in scales]
    cfg.protocol = ["benchmark"]  # PSNR / SSIM on Y, shave = scale
    cfg.with_bicubic = True
    cfg.json = json_path
    cfg.progress = False
    results, baseline, failures = runner.run(cfg, verbose_progress=True)
    if failures:
        die(f"{len(failures)} evaluation failure(s), nothing shipped: " +
            "; ".join(str(f) for f in failures[:5]))
    return results, baseline


def figures(results: dict, baseline: dict, scales) -> dict:
    """{set: {"x2": {"msit": {psnr, ssim}, "bicubic": {...}, "n_images", "lr_source"}}} and
    per image {set: {"x2": {image: {"msit": [psnr, ssim], "bicubic": [psnr, ssim]}}}}."""
    table, per_image = {}, {}
    for ds, by_scale in results.items():
        for s in scales:
            r, b = by_scale[s], baseline[ds][s]
            key = f"x{reports.format_scale(s)}"
            table.setdefault(ds, {})[key] = {
                "msit": {"psnr": r.psnr, "ssim": r.ssim},
                "bicubic": {"psnr": b.psnr, "ssim": b.ssim},
                "n_images": len(r.per_image), "lr_source": r.lr_source, "shave": r.shave}
            per_image.setdefault(ds, {})[key] = {
                name: {"msit": [v["psnr"], v["ssim"]],
                       "bicubic": [b.per_image[name]["psnr"], b.per_image[name]["ssim"]]}
                for name, v in r.per_image.items()}
    return {"table": table, "per_image": per_image}


def markdown_table(name: str, table: dict, scales) -> str:
    """The README / card table: sets x methods, scales as columns, 'PSNR / SSIM' cells."""
    keys = [f"x{reports.format_scale(s)}" for s in scales]
    lines = ["| Dataset | Method | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for ds, by_scale in table.items():
        for method, label in (("msit", name), ("bicubic", "bicubic")):
            cells = [f"{by_scale[k][method]['psnr']:.2f} / {by_scale[k][method]['ssim']:.4f}"
                     for k in keys]
            lines.append(f"| {ds} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lr_note(table: dict) -> str:
    """Where the LR images came from, per cell (the reference reads LR files for Set14 and
    B100 at x2-x4; without them here they were made on the fly)."""
    missing = [f"{ds} {k}" for ds, by in table.items() for k, c in by.items()
               if "not found" in c["lr_source"]]
    files = [f"{ds} {k}" for ds, by in table.items() for k, c in by.items()
             if c["lr_source"] == "paired"]
    parts = []
    if files:
        parts.append(f"LR read from `LR_bicubic` files: {', '.join(files)}.")
    if missing:
        parts.append(f"{', '.join(missing)}: the reference reads `LR_bicubic` files there, "
                     "which this data has not; the LR was made on the fly (Pillow bicubic), "
                     "as for every other cell.")
    return " ".join(parts) or "Every LR image was made on the fly (Pillow bicubic)."


def context_table(rows: list[dict], sets: list[str]) -> str:
    """Published PSNR rows (method, source, {set: {scale: psnr}})."""
    keys = ["2", "3", "4"]
    head = "| Method | " + " | ".join(f"{ds} x{k}" for ds in sets for k in keys) + " | Source |"
    lines = [head, "|---|" + "---|" * (len(sets) * len(keys) + 1)]
    for row in rows:
        cells = []
        for ds in sets:
            for k in keys:
                v = row["psnr"].get(ds, {}).get(k)
                cells.append(f"{v:.2f}" if v is not None else "-")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['source']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ card

def fmt_duration(s: Optional[float]) -> str:
    if s is None:
        return "unknown"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def architecture(model_cfg) -> list[tuple[str, str]]:
    """The model card's architecture rows: (field, value)."""
    c = model_cfg
    # the registry's own description: any registered encoder, sized by its sub-config
    enc = encoder_spec(c.encoder).describe(encoder_sizes(c))
    return [("encoder", enc),
            ("convolutions", f"{c.conv} (stage 1)" if c.conv == "plain" else
             f"{c.conv} (stage 2)"),
            ("BatchNorm", "yes (folded into the convolutions at load)" if c.batch_norm
             else "no"),
            ("feature width / attention heads / local radius",
             f"{c.dim} / {c.heads} / {c.radius}"),
            ("MSNO heads / Q-K heads", f"{c.msno_heads} / {c.qk_heads}"),
            ("decoder MLP hidden", " x ".join(str(h) for h in c.mlp_hidden)),
            ("positional encoding dims / scale", f"{c.posenc_dims} / {c.posenc_scale:g}")]


def model_card(name: str, run: dict, model_cfg, n_params: int, n_values: int, size: int,
               digest: str, figs: dict, scales, machine: str, context: list[dict]) -> str:
    cfg = run["config"]
    data = cfg.get("data", {})
    lr = cfg.get("lr", {})
    ev = cfg.get("eval", {})
    val_src = ev.get("source", {})
    val_desc = ("scikit-image's astronaut and chelsea (the `embedded` source's val split), "
                "never the benchmark sets" if val_src.get("kind") == "embedded"
                else f"{val_src.get('kind')} {val_src.get('path') or val_src.get('name')}")
    lv = run["last_val"] or {}
    val_line = ", ".join(f"x{k[len('psnr_x'):]} {v:.2f} dB" for k, v in lv.items()
                         if k.startswith("psnr_x")) or "not recorded"
    imgs = (f"{run['train_images']} images in {run['train_path']}"
            if run["train_images"] is not None else run["train_path"])
    if run["train_images"] not in (None, 291):
        print(f"warning: the training folder holds {run['train_images']} images, not 291: "
              "check the card's training-data line", file=sys.stderr)
    sets = list(figs["table"])
    ctx = (context_table(context, sets) + "\n\nThese are the published papers' figures "
           "(MATLAB bicubic LR, their own evaluation code), trained on other data; they "
           "are context, not a like-for-like comparison. A dash is a figure not checked "
           "against its source here. The MSIT paper's rows (arXiv 2403.06536: "
           "EDSR-baseline-MSIT, RDN-MSIT, trained on DIV2K) are not included: its table could "
           "not be checked against the paper when this card was made, and unchecked numbers "
           "are left out; those models are far larger and trained on far more data, expect "
           "them well above the figures here." if context else
           "No published figures are included: the SRCNN, FSRCNN and MSIT-paper tables "
           "(arXiv 2403.06536: EDSR-baseline-MSIT, RDN-MSIT) could not be checked against "
           "their sources when this card was made, and unchecked numbers are left out. "
           "Those models are far larger and trained on far more data (the MSIT paper's "
           "on DIV2K); expect them well above the figures here.")
    arch = "\n".join(f"| {k} | {v} |" for k, v in architecture(model_cfg))
    sched_unit = (f"per epoch of {lr['epoch_steps']} steps" if lr.get("epoch_steps")
                  else "per step")
    final_step = run["step"] == run["steps"][-1]
    step_note = ("the final checkpoint" if final_step else
                 f"step {run['step']} (not the final {run['steps'][-1]})")
    if final_step and run["total_steps"] not in (None, run["step"]):
        step_note = (f"the newest checkpoint, but the run's total_steps is "
                     f"{run['total_steps']}: training had not finished")
    selection_note = ("* The validation images chose nothing about this file: it is the "
                      "final checkpoint, not the best-validating one." if final_step else
                      f"* This is {step_note}, chosen by hand (--step); if it was chosen by "
                      "its validation PSNR, the validation images took part in the choice.")
    return f"""{export_cli.CARD_FRONT_MATTER}
# {name}

A small MSIT (Multi-Scale Implicit Transformer, Zhu et al., arXiv 2403.06536) for
arbitrary-scale super-resolution, bundled with msit-jax: {weights.BUNDLED.get(name, '')}.
Any scale >= 1 (and different per axis) from one model.

```python
from msit_jax import Upscaler

up = Upscaler.from_pretrained("{name}")      # bundled: no download, no PyTorch
sr = up(image, scale=3.5)                      # PIL image or array, any scale
```

`msit-upscale photo.png --scale 3 --output out/` and `python -m msit_jax.demo` use it
by default; `python evaluate.py --model {name} --data set5 --scales 2,3,4` scores it.

## Model

| | |
|---|---|
{arch}
| trainable parameters | {n_params:,} |
| stored values (incl. BatchNorm statistics) | {n_values:,} |
| file | `{name}.safetensors`, {size:,} bytes, sha256 `{digest[:16]}...` |

The file holds the weights under the official PyTorch parameter names (stage-1
plain-conv layout, BatchNorm unfolded) with the msit-jax model config in its
metadata; `Upscaler.from_pretrained` folds the BatchNorms into the convolutions.

## Training

| | |
|---|---|
| data | {TRAIN_DATA}; {imgs} |
| validation | {val_desc}; PSNR at the last validation (step {lv.get('step', '-')}): {val_line} |
| degradation | bicubic (Pillow) on the fly, one scale per batch from U({data.get('scale_min')}, {data.get('scale_max')}) |
| batch | {cfg.get('batch_size')} LR patches of {data.get('inp_size')} px, {data.get('sample_q')} HR queries each |
| optimiser | Adam; learning rate linear from {lr.get('base')} to {lr.get('multiplier')} x that over {lr.get('warmup_steps')} warm-up steps, then cosine to 0 ({sched_unit}; `msit_jax.training.schedule`) |
| steps | {run['step']:,} ({step_note}; config total_steps {run['total_steps']}) |
| training time | {fmt_duration(run['step_s'])} of training steps (from metrics.jsonl's throughput; the first window includes compilation); {fmt_duration(run['wall_s'])} wall clock from the first start to the checkpoint ({run['starts']} start(s), validation and checkpointing included) |
| machine | {machine} |
| seed | {cfg.get('seed')} |

## Results

Benchmark protocol (`evaluate.py`, preset `benchmark`): the HR image cropped
top-left to the scale's grid, LR by Pillow bicubic as the official code makes it,
PSNR / SSIM on the Y channel with `shave = scale` border pixels removed. Bicubic is
Pillow's bicubic upscaling of the same LR image. Figures from `python
benchmarks/bundle_weights.py` on this file; every per-image value is in
`{name}.json`.

{markdown_table(name, figs['table'], scales)}

{lr_note(figs['table'])}

Scales x6 and x8 are outside the training range (U({data.get('scale_min')}, {data.get('scale_max')})).

### Published methods, for context

{ctx}

## Limitations

* Bicubic degradation only: no noise, blur, JPEG or camera pipeline in training.
  Real photographs with such degradations will not be restored and may show
  amplified artefacts.
* A small model trained briefly on 291 images on a CPU: far below the paper's
  models (trained on DIV2K with a full-size encoder), and not a reproduction of
  the paper's figures.
* Trained on scales U({data.get('scale_min')}, {data.get('scale_max')}): x6 and x8 (and anything above
  x{data.get('scale_max')}) are out of distribution.
{selection_note}

## License

{LICENSE_NOTE}
The training images keep their own terms: T91 (Yang et al., "Image
super-resolution via sparse representation", 2010) and BSD200 (Martin et al.,
the Berkeley Segmentation Dataset) are distributed for research use.

## Provenance

Made by `benchmarks/bundle_weights.py` on {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
from step {run['step']} of `{run['workdir']}` (msit-jax commit {git_commit()}).
"""


def replace_readme_table(readme: str, name: str, table: str) -> bool:
    """Rewrite README between `<!-- NAME table -->` and `<!-- /NAME table -->`; False if
    the markers are missing."""
    with open(readme) as f:
        text = f.read()
    start, end = f"<!-- {name} table -->", f"<!-- /{name} table -->"
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pat.search(text):
        return False
    new = pat.sub(lambda _: f"{start}\n{table}\n{end}", text, count=1)
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, readme)
    return True


# ------------------------------------------------------------------------------ main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--name", default=weights.DEFAULT, choices=weights.available(),
                   help="bundled model name (msit_jax.weights.BUNDLED)")
    p.add_argument("--data_root", default=os.environ.get("MSIT_DATA", "/work/data"),
                   help="folder holding Set5/, Set14/, B100/")
    p.add_argument("--step", default="latest", help="'latest' (the final step) or a step")
    p.add_argument("--machine", default=None, help="the training machine, in words "
                   "(default: this machine, detected)")
    p.add_argument("--max_mb", type=float, default=MAX_MB, help="size limit, 10^6 bytes")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES))
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--context", default=None, help="JSON list of checked published rows")
    p.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    p.add_argument("--card_only", action="store_true", help="rewrite the card and the README "
                   "table from the shipped NAME.json (no export, no evaluation; the JSON must "
                   "describe the shipped file), e.g. to add --context or --machine")
    args = p.parse_args()
    t0 = time.perf_counter()
    scales = [float(s) for s in args.scales.split(",")]
    sets = [s for s in args.sets.split(",") if s]
    context = []
    if args.context:
        with open(args.context) as f:
            context = json.load(f)

    final = {ext: os.path.join(weights.HERE, args.name + ext)
             for ext in (weights.WEIGHTS_SUFFIX, weights.CARD_SUFFIX, ".json")}
    if args.card_only:
        rewrite_card(args, final, context)
        return

    run = read_run(args.workdir, args.step, args.data_root)
    print(f"run: step {run['step']} of {run['workdir']} (steps {run['steps']})", file=sys.stderr)
    if args.step == "latest" and run["total_steps"] not in (None, run["step"]):
        print(f"warning: the newest checkpoint is step {run['step']} but total_steps is "
              f"{run['total_steps']}: is training still running? (the card will say so)",
              file=sys.stderr)
    model_cfg, variables = workdir_io.load_workdir_model(args.workdir, str(run["step"]))

    stage = tempfile.mkdtemp(prefix=f".{args.name}-", dir=weights.HERE)
    try:
        hub = os.path.join(stage, "hub")
        export_cli.export_variables(model_cfg, variables, hub, "safetensors", fold=False)
        staged = os.path.join(stage, args.name + weights.WEIGHTS_SUFFIX)
        os.replace(os.path.join(hub, pretrained.SAFETENSORS_FILE), staged)
        size = os.path.getsize(staged)
        if size > args.max_mb * MB:
            die(f"{staged}: {size:,} bytes, over --max_mb {args.max_mb:g} "
                f"({args.max_mb * MB:,.0f} bytes); nothing shipped")
        digest = workdir_io.file_sha256(staged)
        print(f"exported {size:,} bytes (sha256 {digest[:16]}...)", file=sys.stderr)

        # The evaluation reads the staged file, byte for byte the one shipped (sha256 below).
        results, baseline = evaluate(staged, args.data_root, sets, scales,
                                     os.path.join(stage, "runner.json"))
        figs = figures(results, baseline, scales)
        n_params = reparam.count_params({"params": variables["params"]})
        sd = variables_to_state_dict(variables, model_cfg)
        n_values = sum(int(np.size(v)) for v in sd.values())
        machine = args.machine or detect_machine()
        card = model_card(args.name, run, model_cfg, n_params, n_values, size, digest, figs,
                          scales, machine, context)
        meta = {"name": args.name, "file": os.path.basename(final[weights.WEIGHTS_SUFFIX]),
                "bytes": size, "sha256": digest, "step": run["step"],
                "workdir": run["workdir"], "model_config": json.loads(
                    model_dir.config_to_json(model_cfg)),
                "trainable_parameters": n_params, "stored_values": n_values,
                "machine": machine,
                "protocol": {"preset": "benchmark", "metric": "PSNR / SSIM on Y",
                             "shave": "scale", "lr": "Pillow bicubic (reference)"},
                "scales": scales, **figs}
        with open(os.path.join(stage, "card.md"), "w") as f:
            f.write(card)
        with open(os.path.join(stage, "figures.json"), "w") as f:
            json.dump(reports.json_safe(meta), f, indent=1, allow_nan=False)
        # Everything is ready: move the three files into place (same filesystem).
        os.chmod(staged, 0o644)  # written under a private temporary folder; ships readable
        os.replace(staged, final[weights.WEIGHTS_SUFFIX])
        os.replace(os.path.join(stage, "card.md"), final[weights.CARD_SUFFIX])
        os.replace(os.path.join(stage, "figures.json"), final[".json"])
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    shipped = pretrained.resolve(args.name)
    if (not os.path.samefile(shipped, final[weights.WEIGHTS_SUFFIX])
            or workdir_io.file_sha256(shipped) != digest):
        die(f"the bundled name {args.name!r} resolves to {shipped}, not the file just written "
            f"({final[weights.WEIGHTS_SUFFIX]}): is another msit-jax installed?")
    finish(args, final, figs["table"], scales)
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def finish(args: argparse.Namespace, final: dict, table: dict, scales) -> None:
    """README table between the markers; report the files; print the table."""
    md = markdown_table(args.name, table, scales)
    if not replace_readme_table(args.readme, args.name, md):
        print(f"warning: {args.readme} has no <!-- {args.name} table --> markers; "
              "not updated", file=sys.stderr)
    for path in final.values():
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)", file=sys.stderr)
    print(md)


def rewrite_card(args: argparse.Namespace, final: dict, context: list) -> None:
    """--card_only: the card and README table again from the shipped figures JSON."""
    with open(final[".json"]) as f:
        meta = json.load(f)
    digest = workdir_io.file_sha256(final[weights.WEIGHTS_SUFFIX])
    if digest != meta["sha256"]:
        die(f"{final['.json']} describes another file than {final[weights.WEIGHTS_SUFFIX]} "
            "(sha256 differs): run without --card_only")
    run = read_run(args.workdir, str(meta["step"]), args.data_root)
    if os.path.abspath(args.workdir) != meta["workdir"]:
        print(f"warning: the figures were made from {meta['workdir']}, not {args.workdir}",
              file=sys.stderr)
    model_cfg = model_dir.config_from_json(json.dumps(meta["model_config"]))
    machine = args.machine or meta.get("machine") or detect_machine()
    card = model_card(args.name, run, model_cfg, meta["trainable_parameters"],
                      meta["stored_values"], meta["bytes"], digest, meta, meta["scales"],
                      machine, context)
    if machine != meta.get("machine"):
        meta["machine"] = machine
        tmp = final[".json"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, allow_nan=False)
        os.replace(tmp, final[".json"])
    tmp = final[weights.CARD_SUFFIX] + ".tmp"
    with open(tmp, "w") as f:
        f.write(card)
    os.replace(tmp, final[weights.CARD_SUFFIX])
    finish(args, final, meta["table"], meta["scales"])


if __name__ == "__main__":
    main()
