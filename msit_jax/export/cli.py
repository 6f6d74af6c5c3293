"""Export MSIT weights to serve them anywhere.

    python -m msit_jax.export SRC OUT --format stablehlo|onnx|pth|safetensors [--fold|--nofold]

SRC is anything `msit_jax.pretrained.load` reads (official .pth, .safetensors, a
model folder, a msit-jax checkpoint or training workdir). OUT is a new
directory (an existing non-empty one is refused):

  stablehlo    encoder.jaxexport, decoder.jaxexport, export.json: `jax.export`
               programs lowered for --platforms (default cpu,cuda,tpu) at once;
               the encoder takes any LR size (symbolic), the decoder a fixed
               --chunk of queries. Run with `msit_jax.export.stablehlo.load(OUT)`.
  onnx         model.onnx: one graph, LR image + output size in, SR image out
               (opset --opset, default 17; --decoder auto|grid|query; see
               msit_jax.export.onnx_graph). Run with
               `msit_jax.export.onnx_runner.load(OUT)`.
  pth          model.pth: the official PyTorch checkpoint format
               {'model': {'name': 'amsit', 'args', 'sd'}} (stage-2 RIM or stage-1
               plain layout, as the source), for the official code.
  safetensors  model.safetensors (official parameter names, the model config in
               the metadata), config.json and a model card README.md: a folder
               to publish on a model hub as it is; `pretrained.load(OUT)` reads it
               without PyTorch.

--fold (default for stablehlo and onnx) exports the re-parameterised model
(RIM and BatchNorm merged into plain convs, same outputs); --nofold (default
for pth and safetensors) keeps the trained layout. The official .pth layout
always has BatchNorm, so a folded model cannot be written as pth.

OUT appears complete or not at all: the files are written in a partial folder
beside it (`.OUT.partial-HOST-PID-XXXX`) that is renamed to OUT at the end, so a
killed export (SIGKILL, power loss) leaves no OUT, only that hidden folder, which
the runners refuse (a missing or truncated file) and the next export to the same
OUT removes (when the process that wrote it is dead).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax import export as jax_export

from msit_jax import console, errors, flags_util
from msit_jax.export import onnx_graph, stablehlo
from msit_jax.export.onnx_runner import ONNX_FILE
from msit_jax.inference.frontend import DEFAULT_CHUNK
from msit_jax.geometry import QueryGeometry
from msit_jax.io import model_dir, pretrained
from msit_jax.io.convert import commit_partial, partial_dir
from msit_jax.io.torch_io import variables_to_state_dict
from msit_jax.models import reparam
from msit_jax.models.encoders import encoder_sizes, encoder_spec
from msit_jax.models.model import MSIT, build_model
from msit_jax.ops.runtime import RuntimeOptions

FORMATS = ("stablehlo", "onnx", "pth", "safetensors")
DEFAULT_FOLD = {"stablehlo": True, "onnx": True, "pth": False, "safetensors": False}
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")  # stablehlo: lowered together unless --platforms
PTH_FILE = "model.pth"


class ExportError(ValueError):
    """An export that cannot be made; the message names the reason."""


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def check_output(out: str) -> str:
    """OUT must not exist, or be an empty directory."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        kind = "directory" if os.path.isdir(out) else "file"
        raise ExportError(f"output {out} already exists (a non-empty {kind}); choose a new "
                          "directory")
    return out


def is_folded(model_cfg: ml_collections.ConfigDict) -> bool:
    return model_cfg.conv == "plain" and not model_cfg.batch_norm


def layout_name(model_cfg: ml_collections.ConfigDict) -> str:
    if is_folded(model_cfg):
        return "folded"
    return "rim (stage 2)" if model_cfg.conv == "rim" else "plain (stage 1)"


def official_state_dict(model_cfg: ml_collections.ConfigDict, variables: Any
                        ) -> dict[str, np.ndarray]:
    """Official-layout tensors, with the BatchNorms' `num_batches_tracked` counters
    (zero: never read in eval mode) so that a strict `load_state_dict` accepts them."""
    sd = variables_to_state_dict(variables, model_cfg)
    for key in [k for k in sd if k.endswith(".running_mean")]:
        sd[key[:-len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
    return sd


# --- writers (each fills an empty directory) ---------------------------------------

def write_pth(out: str, model_cfg: ml_collections.ConfigDict, variables: Any) -> list[str]:
    """OUT/model.pth: {'model': {'name': 'amsit', 'args': ..., 'sd': ...}}."""
    if not model_cfg.batch_norm:
        raise ExportError("pth cannot express a folded model (BatchNorm merged into convs): "
                          "the official layout has BatchNorm; export the unfolded "
                          "checkpoint with --nofold, or use --format safetensors")
    try:
        args = pretrained.official_args(model_cfg)
    except ValueError as e:
        raise ExportError(f"pth: {e}") from None
    torch = pretrained.import_torch()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in
          official_state_dict(model_cfg, variables).items()}
    path = os.path.join(out, PTH_FILE)
    torch.save({"model": {"name": "amsit", "args": args, "sd": sd}}, path)
    return [path]


def write_safetensors(out: str, model_cfg: ml_collections.ConfigDict, variables: Any
                      ) -> list[str]:
    """OUT/model.safetensors + config.json + README.md (a model-hub folder)."""
    try:  # an optional dependency, imported when used
        from safetensors.numpy import save_file
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("writing .safetensors needs the safetensors package, a "
                          "dependency of msit-jax: pip install safetensors") from e
    sd = official_state_dict(model_cfg, variables) if model_cfg.batch_norm else \
        variables_to_state_dict(variables, model_cfg)
    meta = {"format": "pt", pretrained.META_CONFIG: model_dir.config_to_json(model_cfg),
            "msit.layout": layout_name(model_cfg)}
    args = None
    if model_cfg.batch_norm:  # the official code can build it: record its args too
        try:
            args = pretrained.official_args(model_cfg)
            meta[pretrained.META_ARGS] = json.dumps(args, sort_keys=True)
        except ValueError:
            pass
    weights = os.path.join(out, pretrained.SAFETENSORS_FILE)
    # np.array, not ascontiguousarray: that would turn 0-d tensors into (1,)
    save_file({k: np.array(v, order="C") for k, v in sd.items()}, weights, metadata=meta)
    config = os.path.join(out, pretrained.HUB_CONFIG_FILE)
    with open(config, "w") as f:
        f.write(model_dir.config_to_json(model_cfg))
    card = os.path.join(out, "README.md")
    with open(card, "w") as f:
        f.write(model_card(model_cfg, sd, args))
    return [weights, config, card]


# The model-hub metadata block every model card of this project starts with.
CARD_FRONT_MATTER = """---
library_name: msit-jax
pipeline_tag: image-to-image
tags:
- super-resolution
- arbitrary-scale-super-resolution
- msit
- jax
- safetensors
---
"""


def model_card(model_cfg: ml_collections.ConfigDict, sd: dict, args: Optional[dict]) -> str:
    """A model card (hub README) describing the exported weights."""
    n = sum(int(np.size(v)) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    enc = model_cfg.encoder
    size = encoder_spec(enc).describe(encoder_sizes(model_cfg))
    torch_use = ("""
In PyTorch, with the official code (github.com/Jinchen2028/MSIT) on the path:

```python
import json, models
from safetensors import safe_open
from safetensors.torch import load_file

args = json.loads(safe_open("model.safetensors", "pt").metadata()["msit.official_args"])
model = models.make({"name": "amsit", "args": args, "sd": load_file("model.safetensors")},
                    load_sd=True)
```
""" if args is not None and model_cfg.conv == "rim" else "")
    return f"""{CARD_FRONT_MATTER}
# MSIT ({enc}, {layout_name(model_cfg)})

MSIT, the Multi-Scale Implicit Transformer for arbitrary-scale image
super-resolution (Zhu et al., arXiv 2403.06536), exported by msit-jax.

| | |
|---|---|
| encoder | {enc} ({size}) |
| feature width / heads / radius | {model_cfg.dim} / {model_cfg.heads} / {model_cfg.radius} |
| layout | {layout_name(model_cfg)} |
| values | {n:,} |

Files: `model.safetensors` (weights under the official PyTorch parameter names;
the msit-jax model config is in its metadata under `{pretrained.META_CONFIG}`),
`config.json` (the same model config), this card.

## Use

```python
from msit_jax import Upscaler

up = Upscaler.from_pretrained("path/to/this/folder")   # no PyTorch needed
sr = up(image, scale=3.5)                              # PIL image or array, any scale
```
{torch_use}"""


def write_stablehlo(out: str, model_cfg: ml_collections.ConfigDict, variables: Any, *,
                    chunk: int = DEFAULT_CHUNK, platforms: Sequence[str] = DEFAULT_PLATFORMS
                    ) -> list[str]:
    """OUT/encoder.jaxexport, decoder.jaxexport, export.json (see msit_jax.export.stablehlo).

    The decoder program's inputs are flat arrays (the artifact's interface for any
    runner); they are assembled into the model's `QueryGeometry` inside it."""
    # FFT sizes need concrete image sizes and these programs take any size, so the
    # multi-scale convs stay direct convolutions (same function; FFT is a CPU speed-up).
    runtime = RuntimeOptions(fft_min_kernel=0)
    model = build_model(model_cfg, runtime)
    variables = jax.tree_util.tree_map(np.asarray, dict(variables))
    h, w = jax_export.symbolic_shape("h, w")
    dim, k = model_cfg.dim, 2 * model_cfg.radius + 1
    f32 = jnp.float32
    spec = jax.ShapeDtypeStruct
    enc = jax_export.export(jax.jit(lambda inp: model.apply(variables, inp, method=MSIT.encode)),
                        platforms=tuple(platforms))(spec((1, h, w, 3), f32))
    dec = jax_export.export(
        jax.jit(lambda fq, fv, inp, coord, key_idx, rel, rc: model.apply(
            variables, (fq, fv), inp, QueryGeometry(coord, key_idx, rel, rc),
            method=MSIT.decode)),
        platforms=tuple(platforms))(
        spec((1, h, w, dim), f32), spec((1, h, w, dim), f32), spec((1, h, w, 3), f32),
        spec((1, chunk, 2), f32), spec((1, chunk, 2, k), jnp.int32),
        spec((1, chunk, 2, k), f32), spec((1, 2), f32))
    files, digests = [], {}
    for name, prog in ((stablehlo.ENCODER_FILE, enc), (stablehlo.DECODER_FILE, dec)):
        files.append(os.path.join(out, name))
        data = prog.serialize()
        digests[name] = stablehlo.file_record(data)
        with open(files[-1], "wb") as f:
            f.write(data)
    meta = {
        "format": stablehlo.FORMAT, "version": stablehlo.VERSION,
        "files": digests,  # sizes and sha256: the loader detects a truncated or altered program
        "platforms": list(enc.platforms), "chunk": chunk, "radius": model_cfg.radius,
        "dim": dim, "layout": layout_name(model_cfg), "jax_version": jax.__version__,
        "model_config": json.loads(model_dir.config_to_json(model_cfg)),
        "encoder": {"inputs": ["inp float32 (1, h, w, 3) = (lr - 0.5) / 0.5"],
                    "outputs": ["feat_q float32 (1, h, w, dim)", "feat_v float32 (1, h, w, dim)"]},
        "decoder": {"inputs": ["feat_q", "feat_v", "inp", "coord float32 (1, chunk, 2)",
                               "key_idx int32 (1, chunk, 2, 2r+1)",
                               "rel float32 (1, chunk, 2, 2r+1)", "rel_cell float32 (1, 2)"],
                    "outputs": ["pred float32 (1, chunk, 3), normalised: sr = pred * 0.5 + 0.5"],
                    "geometry": "msit_jax.geometry.query_chunks / query_geometry / rel_cell"},
    }
    files.append(os.path.join(out, stablehlo.META_FILE))
    with open(files[-1], "w") as f:
        json.dump(meta, f, indent=2)
    return files


def write_onnx(out: str, model_cfg: ml_collections.ConfigDict, variables: Any, *,
               chunk: int = DEFAULT_CHUNK, opset: Optional[int] = None,
               decoder: str = "auto") -> list[str]:
    """OUT/model.onnx (see msit_jax.export.onnx_graph)."""
    try:  # an optional dependency, imported when used
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the onnx package: "
                          f"{console.install_hint('export')}") from e
    try:
        model = onnx_graph.build_graph(model_cfg, variables, chunk,
                                       opset or onnx_graph.OPSET, decoder=decoder)
    except ValueError as e:
        raise ExportError(f"onnx: {e}") from None
    path = os.path.join(out, ONNX_FILE)
    onnx.save(model, path)
    return [path]


# --- the export ------------------------------------------------------------------------

def export_variables(model_cfg: ml_collections.ConfigDict, variables: Any, out: str, fmt: str,
                     *, fold: Optional[bool] = None, chunk: int = DEFAULT_CHUNK,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS, opset: Optional[int] = None,
                     decoder: str = "auto") -> list[str]:
    """Export (model_cfg, variables) to a new directory `out`; returns the files written.

    fold=None picks the format's default (DEFAULT_FOLD). ExportError names the
    problem: an unknown format, an existing output, a model the format cannot express.
    """
    check_format(fmt)
    out = check_output(out)
    fold = DEFAULT_FOLD[fmt] if fold is None else bool(fold)
    if chunk < 1:
        raise ExportError(f"chunk must be >= 1, got {chunk}")
    unknown = [p for p in platforms if p not in stablehlo.PLATFORMS]
    if fmt == "stablehlo" and (unknown or not platforms):
        raise ExportError(f"unknown platform(s) {unknown or list(platforms)}: choose from "
                          f"{', '.join(stablehlo.PLATFORMS)}")
    if fmt == "pth" and fold:
        raise ExportError("pth cannot express a folded model: the official layout keeps "
                          "BatchNorm (and RIMs, stage 2); drop --fold, or use --format "
                          "safetensors")
    if fmt == "onnx" and not fold:
        raise ExportError("onnx exports the folded model only (RIM and BatchNorm merged into "
                          "the convs, same outputs): drop --nofold")
    if fold:
        model_cfg, variables = reparam.fold(model_cfg, variables)
    # Written in a partial folder beside OUT, then renamed: a failed or killed export
    # leaves no OUT (the next export to OUT removes a dead run's partial folder).
    tmp = partial_dir(out)
    try:
        if fmt == "pth":
            files = write_pth(tmp, model_cfg, variables)
        elif fmt == "safetensors":
            files = write_safetensors(tmp, model_cfg, variables)
        elif fmt == "stablehlo":
            files = write_stablehlo(tmp, model_cfg, variables, chunk=chunk, platforms=platforms)
        else:
            files = write_onnx(tmp, model_cfg, variables, chunk=chunk, opset=opset,
                               decoder=decoder)
        commit_partial(tmp, out)  # OUT is absent or an empty directory (checked above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(out, os.path.basename(f)) for f in files]


def export(src: str, out: str, fmt: str, *, fold: Optional[bool] = None,
           chunk: int = DEFAULT_CHUNK, platforms: Sequence[str] = DEFAULT_PLATFORMS,
           opset: Optional[int] = None, decoder: str = "auto",
           model_cfg: Optional[ml_collections.ConfigDict] = None) -> list[str]:
    """Load `src` (`pretrained.load`) and export it; see `export_variables`."""
    check_format(fmt)
    check_output(out)
    model_cfg, variables = pretrained.load(src, model_cfg)
    return export_variables(model_cfg, variables, out, fmt, fold=fold, chunk=chunk,
                            platforms=platforms, opset=opset, decoder=decoder)


# ---------------------------------------------------------------- command line

PROG = "python -m msit_jax.export"
USAGE = f"usage: {PROG} SRC OUT --format FORMAT [flags]\n\n{__doc__}"


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, on `fv` (a private FlagValues, see `msit_jax.flags_util`)."""
    flags.DEFINE_string("format", None, f"One of {', '.join(FORMATS)}.", flag_values=fv)
    flags.DEFINE_bool("fold", None, "Export the folded model (default: --fold for stablehlo "
                      "and onnx, --nofold for pth and safetensors).", flag_values=fv)
    flags.DEFINE_integer("chunk", DEFAULT_CHUNK, "Queries per decoder call in stablehlo and "
                         "onnx.", flag_values=fv)
    flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "stablehlo: platforms lowered together.",
                      flag_values=fv)
    flags.DEFINE_integer("opset", None, "onnx: opset (default 17).", flag_values=fv)
    flags.DEFINE_enum("decoder", "auto", ["auto", "grid", "query"], "onnx: decoder "
                      "formulation in the graph (auto: grid from x2, chosen in the graph per "
                      "call).", flag_values=fv)
    flags_util.define_verbose(fv)


def _export(fv: flags.FlagValues, positionals: Sequence[str]) -> int:
    """The command on parsed flags: SRC OUT -> the exit status."""
    if len(positionals) != 2:
        return errors.report(errors.UsageError(
            f"give SRC (the weights) and OUT (a new directory), got {len(positionals)} "
            f"argument(s){': ' + ' '.join(positionals) if positionals else ''} (see --help)"))
    src, out = positionals
    console.quiet_logs(fv.verbose)
    if fv.format is None:
        return errors.report(errors.UsageError(f"give --format: one of {', '.join(FORMATS)}"))
    try:
        check_format(fv.format)
        check_output(out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.EXIT_USAGE
    platforms = tuple(s.strip() for s in fv.platforms if s.strip())
    try:
        files = export(src, out, fv.format, fold=fv.fold, chunk=fv.chunk,
                       platforms=platforms, opset=fv.opset, decoder=fv.decoder)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.EXIT_FAILURE
    size = sum(os.path.getsize(f) for f in files)
    print(f"wrote {fv.format} to {os.path.abspath(out)}: "
          f"{', '.join(os.path.basename(f) for f in files)} ({size / 2 ** 20:.1f} MiB)")
    return errors.EXIT_OK


main = flags_util.entry_point(define_flags, _export, USAGE, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
