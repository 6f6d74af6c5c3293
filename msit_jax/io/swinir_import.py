"""LTE/SwinIR-layout state dicts -> `msit_jax.models.swinir.SwinIREncoder` params. Pure numpy.

The PyTorch layout (SwinIR, upsampler 'none', as LTE's `models/swinir.py`), under
an optional prefix (e.g. 'encoder.' inside a whole-model checkpoint):

    conv_first.{weight,bias}                     -> conv_first/{kernel,bias}
    patch_embed.norm.{weight,bias}               -> patch_embed_norm/{scale,bias}
    layers.i.residual_group.blocks.j.
        norm1 / norm2.{weight,bias}              -> layers_i/blocks_j/norm1|norm2/{scale,bias}
        attn.qkv / attn.proj.{weight,bias}       -> .../attn/qkv|proj/{kernel,bias}
        attn.relative_position_bias_table        -> .../attn/relative_position_bias_table
        mlp.fc1 / mlp.fc2.{weight,bias}          -> .../fc1|fc2/{kernel,bias}
        attn.relative_position_index, attn_mask  buffers: recomputed, checked equal
    layers.i.conv.{weight,bias}                  -> layers_i/conv ('1conv'; '3conv': conv.0/.2/.4 -> conv_0/_2/_4)
    norm.{weight,bias}                           -> norm/{scale,bias}
    conv_after_body.{weight,bias}                -> conv_after_body (or .0/.2/.4 -> _0/_2/_4)
    conv_before_upsample.0.{weight,bias}         -> conv_before_upsample_0

Conv kernels go OIHW -> HWIO, Linear weights (out, in) -> (in, out). Every key
under the prefix must be used; anything else is an error naming the keys.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from msit_jax.models.swinir import (SWINIR_DEFAULTS, relative_position_index,
                                    shift_attention_mask)

_CONV_IDX = ("0", "2", "4")  # torch Sequential indices of '3conv'


def _strip(state: Mapping[str, Any], prefix: str) -> dict:
    return {k[len(prefix):]: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}


def infer_swinir_config(state: Mapping[str, Any], prefix: str = "") -> dict:
    """The SwinIR config (SWINIR_DEFAULTS' keys) a state dict was built with.

    drop_path_rate cannot be read from weights and is LTE's default (0.1).
    """
    s = _strip(state, prefix)
    if "conv_first.weight" not in s:
        raise ValueError(f"no SwinIR weights under prefix {prefix!r} (no conv_first.weight)")
    embed = int(s["conv_first.weight"].shape[0])
    blocks: dict[int, set] = {}
    for k in s:
        m = re.match(r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"SwinIR stages under {prefix!r} are not layers.0..n-1: {sorted(blocks)}")
    depths = tuple(max(blocks[i]) + 1 for i in range(len(blocks)))
    first = "layers.0.residual_group.blocks.0."
    table = s[first + "attn.relative_position_bias_table"]
    window = (math.isqrt(int(table.shape[0])) + 1) // 2
    heads = tuple(int(s[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"]
                      .shape[1]) for i in range(len(depths)))
    hidden = int(s[first + "mlp.fc1.weight"].shape[0])
    return dict(
        SWINIR_DEFAULTS,
        embed_dim=embed, depths=depths, num_heads=heads, window_size=window,
        mlp_ratio=hidden / embed,
        qkv_bias=first + "attn.qkv.bias" in s,
        patch_norm="patch_embed.norm.weight" in s,
        resi_connection="3conv" if "conv_after_body.0.weight" in s else "1conv",
        num_feat=int(s["conv_before_upsample.0.weight"].shape[0]),
    )


def swinir_params_from_state_dict(state: Mapping[str, Any], prefix: str = "",
                                  config: Mapping[str, Any] | None = None) -> dict:
    """The SwinIREncoder params tree (the contents of 'params') of a state dict.

    state: name -> array (numpy, or anything np.asarray reads, e.g. CPU torch
    tensors); prefix: the encoder's key prefix; config: checked against the
    config inferred from the weights when given (SWINIR_DEFAULTS keys).
    """
    s = _strip(state, prefix)
    cfg = infer_swinir_config(state, prefix)
    if config is not None:
        want = {**SWINIR_DEFAULTS, **dict(config)}
        for key in ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio",
                    "qkv_bias", "patch_norm", "resi_connection", "num_feat"):
            a, b = want[key], cfg[key]
            same = tuple(a) == tuple(b) if isinstance(b, tuple) else (
                math.isclose(float(a), float(b)) if key == "mlp_ratio" else a == b)
            if not same:
                raise ValueError(f"SwinIR weights under {prefix!r} have {key}={b!r}, "
                                 f"the config says {a!r}")
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in s:
            raise ValueError(f"SwinIR state dict lacks {prefix + key!r}")
        used.add(key)
        return s[key]

    def conv(key: str) -> dict:
        return {"kernel": np.ascontiguousarray(take(key + ".weight").transpose(2, 3, 1, 0)),
                "bias": take(key + ".bias")}

    def linear(key: str, bias: bool = True) -> dict:
        p = {"kernel": np.ascontiguousarray(take(key + ".weight").T)}
        if bias:
            p["bias"] = take(key + ".bias")
        return p

    def norm(key: str) -> dict:
        return {"scale": take(key + ".weight"), "bias": take(key + ".bias")}

    def res_conv(key: str, name: str) -> dict:
        if cfg["resi_connection"] == "1conv":
            return {name: conv(key)}
        return {f"{name}_{i}": conv(f"{key}.{i}") for i in _CONV_IDX}

    w = cfg["window_size"]
    index = relative_position_index(w)
    params: dict = {"conv_first": conv("conv_first")}
    if cfg["patch_norm"]:
        params["patch_embed_norm"] = norm("patch_embed.norm")
    for i, depth in enumerate(cfg["depths"]):
        layer: dict = {}
        for j in range(depth):
            b = f"layers.{i}.residual_group.blocks.{j}."
            if b + "attn.relative_position_index" in s:
                got = take(b + "attn.relative_position_index")
                if got.shape != index.shape or not np.array_equal(got, index):
                    raise ValueError(f"{prefix + b}attn.relative_position_index differs from "
                                     f"SwinIR's for window {w}")
            if b + "attn_mask" in s:
                _check_mask(take(b + "attn_mask"), w, j, prefix + b + "attn_mask")
            layer[f"blocks_{j}"] = {
                "norm1": norm(b + "norm1"),
                "attn": {"qkv": linear(b + "attn.qkv", cfg["qkv_bias"]),
                         "proj": linear(b + "attn.proj"),
                         "relative_position_bias_table":
                             take(b + "attn.relative_position_bias_table")},
                "norm2": norm(b + "norm2"),
                "fc1": linear(b + "mlp.fc1"),
                "fc2": linear(b + "mlp.fc2"),
            }
        layer.update(res_conv(f"layers.{i}.conv", "conv"))
        params[f"layers_{i}"] = layer
    params["norm"] = norm("norm")
    params.update(res_conv("conv_after_body", "conv_after_body"))
    params["conv_before_upsample_0"] = conv("conv_before_upsample.0")
    left = sorted(set(s) - used)
    if left:
        raise ValueError(f"SwinIR state dict has keys the encoder does not use: "
                         f"{[prefix + k for k in left]}")
    return _as_numpy_tree(params)


def _check_mask(mask: np.ndarray, window: int, block: int, name: str) -> None:
    """A stored shifted-window mask (built for SwinIR's img_size, square) must be ours."""
    if block % 2 == 0:
        raise ValueError(f"{name}: SwinIR stores masks only for shifted (odd) blocks")
    nw = int(mask.shape[0])
    side = math.isqrt(nw)
    if mask.ndim != 3 or side * side != nw:
        raise ValueError(f"{name}: shape {mask.shape} is not a square img_size's mask")
    ref = shift_attention_mask(side * window, side * window, window, window // 2)
    if mask.shape != ref.shape or not np.array_equal(mask.astype(np.float32), ref):
        raise ValueError(f"{name} differs from SwinIR's shifted-window mask")


def _as_numpy_tree(tree: Any) -> Any:
    """The tree with every leaf a float32 numpy array (integer tables stay as they are)."""
    if isinstance(tree, dict):
        return {k: _as_numpy_tree(v) for k, v in tree.items()}
    a = np.asarray(tree)
    return a.astype(np.float32) if a.dtype.kind == "f" else a
