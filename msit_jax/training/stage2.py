"""Cumulative training: initialise a model from an earlier stage's weights.

Stage 2 (docs/design.md#4-rim-and-folding) builds the RIM model and takes from stage 1
(plain convs where the RIMs sit):
  * every plain conv kernel at a RIM position -> the RIM's frozen base kernel W,
    and its bias -> the RIM's bias;
  * every other parameter and the BatchNorm statistics -> copied unchanged;
  * RIM `convmap` and `scale` (the RIM factor, torch `linear`) -> kept fresh from
    `model.init`.
This is what the reference's `pre_train` does (`model_dict.update(stage1_sd)`).

The source may be this project's training workdir or model directory, or an
official `.pth` (stage-1 layout), anything `msit_jax.pretrained.load` reads. A
source with the same conv kind as the target is copied whole (fine-tuning).
"""

from __future__ import annotations

from typing import Any

import flax.traverse_util as tu
import ml_collections
import numpy as np

from msit_jax.io import pretrained
from msit_jax.models.encoders import encoder_spec

# Model fields that define the architecture apart from the conv kind; they must
# agree between the two stages.
ARCH_FIELDS = ("encoder", "dim", "heads", "radius", "msno_heads", "qk_heads", "use_lem",
               "mlp_hidden", "posenc_scale", "posenc_dims", "use_cell")


def architecture_mismatch(src: ml_collections.ConfigDict, dst: ml_collections.ConfigDict
                          ) -> list[str]:
    """Fields whose values differ, as 'field: src != dst' lines."""
    fields = list(ARCH_FIELDS) + [encoder_spec(dst.encoder).sub_config]
    out = []
    for f in fields:
        a, b = src.get(f), dst.get(f)
        if isinstance(a, ml_collections.ConfigDict):
            a, b = a.to_dict(), b.to_dict()
        if isinstance(a, (list, tuple)):
            a, b = tuple(a), tuple(b)
        if a != b:
            out.append(f"{f}: {a!r} (source) != {b!r} (this config)")
    return out


def plain_to_rim(src: dict, fresh: dict) -> dict:
    """Map stage-1 (plain) variables onto a fresh RIM model's variables (numpy trees)."""
    sp = tu.flatten_dict(src["params"])
    rim_modules = {path[:-1] for path in tu.flatten_dict(fresh.get("frozen", {}))}
    out_params, used = {}, set()
    for path, value in tu.flatten_dict(fresh["params"]).items():
        module, leaf = path[:-1], path[-1]
        if module in rim_modules and leaf in ("convmap", "scale"):
            out_params[path] = np.asarray(value)  # fresh, as the reference
            continue
        if path not in sp:
            raise ValueError(f"stage-1 weights lack {'/'.join(path)}")
        out_params[path] = _checked(sp[path], value, path)
        used.add(path)
    out_frozen = {}
    for path, value in tu.flatten_dict(fresh.get("frozen", {})).items():
        src_path = path[:-1] + ("kernel",)
        if src_path not in sp:
            raise ValueError(f"stage-1 weights lack the conv kernel {'/'.join(src_path)} "
                             f"for the RIM at {'/'.join(path[:-1])}")
        out_frozen[path] = _checked(sp[src_path], value, path)
        used.add(src_path)
    unused = sorted("/".join(p) for p in set(sp) - used)
    if unused:
        raise ValueError(f"stage-1 weights have parameters the RIM model lacks: {unused[:5]}")
    out = {"params": tu.unflatten_dict(out_params), "frozen": tu.unflatten_dict(out_frozen)}
    if "batch_stats" in fresh:
        out["batch_stats"] = _copy_tree(src.get("batch_stats", {}), fresh["batch_stats"],
                                        "batch_stats")
    return out


def _checked(value: Any, like: Any, path: tuple) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if value.shape != np.shape(like):
        raise ValueError(f"shape mismatch at {'/'.join(path)}: source {value.shape}, "
                         f"model {np.shape(like)}")
    return value


def _copy_tree(src: dict, like: dict, name: str) -> dict:
    fs, fl = tu.flatten_dict(src), tu.flatten_dict(like)
    if set(fs) != set(fl):
        raise ValueError(f"{name} trees differ: {sorted(set(fs) ^ set(fl))[:5]}")
    return tu.unflatten_dict({p: _checked(fs[p], v, p) for p, v in fl.items()})


def init_from(path: str, model_cfg: ml_collections.ConfigDict, fresh: dict) -> dict:
    """Variables for `model_cfg` initialised from the checkpoint at `path`.

    fresh: the new model's own initial variables (numpy), whose RIM
    convmap and factor (`scale`) are kept.
    """
    src_cfg, src = pretrained.load(path)
    bad = architecture_mismatch(src_cfg, model_cfg)
    if bad:
        raise ValueError(f"init_from={path}: architecture differs from the config:\n  "
                         + "\n  ".join(bad))
    if not src_cfg.batch_norm and model_cfg.batch_norm:
        raise ValueError(f"init_from={path}: a folded (BatchNorm-merged) model cannot seed "
                         "training; use the unfolded checkpoint")
    fresh = {k: dict(v) for k, v in fresh.items()}
    if src_cfg.conv == "plain" and model_cfg.conv == "rim":
        return plain_to_rim(src, fresh)
    if src_cfg.conv == model_cfg.conv:
        return {k: _copy_tree(src.get(k, {}), v, k) for k, v in fresh.items()}
    raise ValueError(f"init_from={path}: cannot initialise a conv={model_cfg.conv!r} model "
                     f"from a conv={src_cfg.conv!r} one (fold it with msit_jax.models.reparam, or "
                     "train stage 2 from the stage-1 checkpoint)")
