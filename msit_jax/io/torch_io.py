"""Mapping between official PyTorch state_dicts and this project's variables.

Pure numpy: no torch import here. `msit_jax.io.pretrained` reads `.pth` files.

The mapping is derived from the Flax variable tree of the configured model,
so every variable is accounted for: a state_dict loads only when it holds
exactly the expected tensors with the expected shapes (plus the official
model's known constant extras, which are checked, not ignored). The SwinIR encoder's
tensors have LTE's names (`msit_jax.io.swinir_import`); its buffers
(relative_position_index, the shifted blocks' attn_mask) are checked on loading there
and written, recomputed, with the state_dict.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

import ml_collections
import numpy as np

from msit_jax.errors import CheckpointError
from msit_jax.io.swinir_import import swinir_params_from_state_dict
from msit_jax.models.encoders import encoder_spec
from msit_jax.models.model import variable_shapes
from msit_jax.models.msno import lem_mask
from msit_jax.models.swinir import relative_position_index, shift_attention_mask

# Flax-only grouping modules with no counterpart in the official module tree.
_GROUPING = {"msc", "sim", "mix", "query"}
# Flax names "x_N" that are the torch ModuleList/Sequential path "x.N".
_INDEXED = re.compile(
    r"^(head|body|RDBs|convs|conv|conv_du|GFF|conv_vs|multi_conv_qs|layers)_(\d+)$")


# The SwinIR encoder's Flax names (msit_jax.models.swinir) that differ from LTE's
# module tree (msit_jax.io.swinir_import documents the layout).
_SWINIR_INDEXED = re.compile(r"^(conv_after_body|conv_before_upsample)_(\d+)$")
_SWINIR_BLOCK = re.compile(r"^blocks_(\d+)$")
_SWINIR_RENAME = {"patch_embed_norm": ["patch_embed", "norm"], "fc1": ["mlp", "fc1"],
                  "fc2": ["mlp", "fc2"]}
# LTE's SwinIR is built for img_size 48: its shifted blocks store a 48 x 48 map's mask.
SWINIR_MASK_SIZE = 48


class StateDictError(CheckpointError):
    """A state_dict does not match the model config; the message names the keys."""


def flax_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The official state_dict key of the Flax variable `collection`/`path`."""
    *mods, leaf = path
    if mods[:2] == ["decoder", "query"]:
        rest = mods[2:]
        if rest[0] == "pb_proj":
            mods = ["pb_encoder", "proj"] + rest[1:]
        else:  # mlp
            mods = ["imnets", "0"] + rest[1:]
    segs = []
    in_encoder = bool(mods) and mods[0] == "encoder"
    for m in mods:
        if m in _GROUPING:
            continue
        if in_encoder:  # SwinIR's names (no other encoder has them)
            if m in _SWINIR_RENAME:
                segs.extend(_SWINIR_RENAME[m])
                continue
            match = _SWINIR_INDEXED.match(m) or _SWINIR_BLOCK.match(m)
            if match:
                segs.extend([match.group(1), match.group(2)] if match.re is _SWINIR_INDEXED
                            else ["residual_group", "blocks", match.group(1)])
                continue
        match = _INDEXED.match(m)
        segs.extend([match.group(1), match.group(2)] if match else [m])
    parent = mods[-1] if mods else ""
    if collection == "batch_stats":
        name = {"mean": "running_mean", "var": "running_var"}[leaf]
    elif collection == "frozen":
        name = "weight"  # RIM base kernel: a buffer called `weight`
    elif leaf == "kernel":
        name = "weight"
    elif leaf == "convmap":
        name = "convmap.weight"
    elif leaf == "scale":  # BatchNorm, LayerNorm (the SwinIR encoder's) or RIM scale
        name = "weight" if parent == "bn" or in_encoder else "linear.weight"
    else:
        name = leaf
    return ".".join(segs + [name])


def variable_kind(collection: str, leaf: str, ndim: int) -> str:
    """How a variable's layout differs from the official tensor's (see `to_torch_array`)."""
    if leaf == "kernel":
        return "conv" if ndim == 4 else "linear"
    if leaf == "convmap":
        return "convmap"
    if leaf == "scale" and collection == "params" and ndim == 2:
        return "rim_scale"
    return "same"


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The official tensor's shape for a variable of this kind and shape (no array made)."""
    shape = tuple(shape)
    if kind == "conv":  # HWIO -> OIHW
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if kind == "linear":
        return shape[::-1]
    if kind == "convmap":
        kh, kw, i, o = shape
        return (o * i, 1, kh, kw)
    if kind == "rim_scale":
        i, o = shape
        return (o * i, 1, 1, 1)
    return shape


def to_torch_array(kind: str, x: np.ndarray) -> np.ndarray:
    """A Flax variable in the official tensor layout."""
    if kind == "conv":  # HWIO -> OIHW
        return np.transpose(x, (3, 2, 0, 1))
    if kind == "linear":  # (in, out) -> (out, in)
        return x.T
    if kind == "convmap":  # (3, 3, I, O) -> (O * I, 1, 3, 3)
        kh, kw, i, o = x.shape
        return np.transpose(x, (3, 2, 0, 1)).reshape(o * i, 1, kh, kw)
    if kind == "rim_scale":  # (I, O) -> (O * I, 1, 1, 1)
        return x.T.reshape(-1, 1, 1, 1)
    return x


def from_torch_array(kind: str, t: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    """An official tensor in this project's layout (inverse of `to_torch_array`)."""
    if kind == "conv":
        return np.transpose(t, (2, 3, 1, 0))
    if kind == "linear":
        return t.T
    if kind == "convmap":
        kh, kw, i, o = flax_shape
        return np.transpose(t.reshape(o, i, kh, kw), (2, 3, 1, 0))
    if kind == "rim_scale":
        i, o = flax_shape
        return t.reshape(o, i).T
    return t


def _leaves(tree: Mapping, prefix=()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def layout(model_cfg: ml_collections.ConfigDict) -> list[dict]:
    """One entry per variable: torch key, collection, flax path, kind, both shapes."""
    entries = []
    for (collection, *path), shape in _leaves(variable_shapes(model_cfg)):
        path = tuple(path)
        kind = variable_kind(collection, path[-1], len(shape))
        entries.append(dict(torch_key=flax_to_torch_key(collection, path), collection=collection,
                            path=path, kind=kind, shape=tuple(shape),
                            torch_shape=torch_shape(kind, shape)))
    return entries


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


# EDSR's and RCAN's MeanShift layers (rgb_range 1, std 1): in the official
# state_dict, never used by its forward.
_RGB_MEAN = np.array([0.4488, 0.4371, 0.4040], np.float32)


def _swinir_buffers(model_cfg, values: bool = True) -> dict[str, Any]:
    """The SwinIR encoder's buffers, as LTE's module stores them (names -> arrays, or
    None when not `values`): relative_position_index in every block, attn_mask in every
    shifted (odd) block, built for img_size SWINIR_MASK_SIZE (rounded up to the window).
    Loading checks stored ones in `msit_jax.io.swinir_import` (any square img_size)."""
    if model_cfg.encoder != "swinir":
        return {}
    e = model_cfg[encoder_spec(model_cfg.encoder).sub_config]
    w = int(e.window_size)
    side = -(-SWINIR_MASK_SIZE // w) * w
    index = relative_position_index(w) if values else None
    mask = shift_attention_mask(side, side, w, w // 2) if values else None
    out = {}
    for i, depth in enumerate(e.depths):
        for j in range(int(depth)):
            b = f"encoder.layers.{i}.residual_group.blocks.{j}."
            out[b + "attn.relative_position_index"] = index
            if j % 2:
                out[b + "attn_mask"] = mask
    return out


def _extra_keys(model_cfg) -> set[str]:
    """The names of `_known_extras` and of the SwinIR buffers (without building values)."""
    keys = {"amsno.lem.mask", "amsno.lem.mix_margin"} | set(_swinir_buffers(model_cfg, False))
    if encoder_spec(model_cfg.encoder).mean_shift:
        keys |= {f"encoder.{m}.{p}" for m in ("sub_mean", "add_mean") for p in ("weight", "bias")}
    return keys


def _known_extras(model_cfg) -> dict[str, np.ndarray]:
    """Official constant tensors with no variable here; a checkpoint must hold these values."""
    extras = {"amsno.lem.mask": lem_mask(model_cfg.dim)[:, None],
              "amsno.lem.mix_margin": np.array(1.0, np.float32)}
    if encoder_spec(model_cfg.encoder).mean_shift:
        eye = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
        extras.update({"encoder.sub_mean.weight": eye, "encoder.sub_mean.bias": -_RGB_MEAN,
                       "encoder.add_mean.weight": eye, "encoder.add_mean.bias": _RGB_MEAN})
    return extras


def detect_conv_kind(state_dict: Mapping[str, Any]) -> str:
    """'rim' if the state_dict has RIM tensors (stage 2), else 'plain' (stage 1)."""
    return "rim" if any(k.endswith(".convmap.weight") for k in state_dict) else "plain"


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a DataParallel 'module.' prefix carried by every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray],
                            model_cfg: ml_collections.ConfigDict) -> dict:
    """Official state_dict (numpy arrays) -> Flax variables for `model_cfg`.

    Raises StateDictError naming every missing, unexpected or mis-shaped key.
    """
    sd = strip_prefix(state_dict)
    entries = layout(model_cfg)
    expected = {e["torch_key"] for e in entries}
    missing = sorted(expected - sd.keys())
    extra = _extra_keys(model_cfg)
    unexpected = sorted(k for k in sd.keys() - expected
                        if k not in extra
                        and not k.endswith(".num_batches_tracked"))
    bad_shape = [f"{e['torch_key']}: checkpoint {tuple(np.shape(sd[e['torch_key']]))}, "
                 f"model {e['torch_shape']}"
                 for e in entries if e["torch_key"] in sd
                 and tuple(np.shape(sd[e["torch_key"]])) != e["torch_shape"]]
    bad_value = []
    if not missing and not bad_shape:  # dim is the stored tensors': the constants are that big
        bad_value = [k for k, want in _known_extras(model_cfg).items()
                     if k in sd and (np.shape(sd[k]) != want.shape
                                     or not np.allclose(sd[k], want, rtol=0, atol=1e-6))]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatches ({len(bad_shape)}): {'; '.join(bad_shape)}")
    if bad_value:
        problems.append("constant tensors differ from the MSIT definition "
                        f"(this is not an MSIT checkpoint?): {', '.join(bad_value)}")
    if problems:
        raise StateDictError(
            f"state_dict does not match the model config (encoder={model_cfg.encoder}, "
            f"conv={model_cfg.conv}, dim={model_cfg.dim}):\n  " + "\n  ".join(problems))
    variables: dict = {}
    for e in entries:
        t = np.asarray(sd[e["torch_key"]], np.float32)
        # Copy: the input may alias live torch tensors (Tensor.numpy() shares memory).
        _set(variables, (e["collection"],) + e["path"],
             np.array(from_torch_array(e["kind"], t, e["shape"]), np.float32, order="C"))
    if model_cfg.encoder == "swinir":  # its own import: checks the buffers, the sizes
        spec = encoder_spec(model_cfg.encoder)
        try:
            enc = swinir_params_from_state_dict(
                {k: v for k, v in sd.items() if k.startswith("encoder.")}, "encoder.",
                dict(model_cfg[spec.sub_config]))
        except ValueError as err:
            raise StateDictError(
                f"state_dict does not match the model config (encoder=swinir): {err}") from None
        variables["params"]["encoder"] = _copy_tree(enc)
    return variables


def _copy_tree(tree: Any) -> Any:
    """A nested dict of numpy arrays, every array copied float32 C-contiguous."""
    if isinstance(tree, Mapping):
        return {k: _copy_tree(v) for k, v in tree.items()}
    return np.array(tree, np.float32, order="C")


def variables_to_state_dict(variables: Mapping, model_cfg: ml_collections.ConfigDict
                            ) -> dict[str, np.ndarray]:
    """Flax variables -> an official-layout state_dict (numpy), extras included."""
    sd = {}
    for e in layout(model_cfg):
        x = np.asarray(_get(variables, (e["collection"],) + e["path"]), np.float32)
        sd[e["torch_key"]] = np.ascontiguousarray(to_torch_array(e["kind"], x))
    sd.update(_known_extras(model_cfg))
    sd.update(_swinir_buffers(model_cfg))
    return sd
