"""Re-parameterisation for deployment: fold RIMs and BatchNorms into plain convs.

    model_cfg, variables = msit_jax.io.pretrained.load("epoch-best.pth")
    model_cfg, variables = msit_jax.models.reparam.fold(model_cfg, variables)

Every RIM conv becomes one conv with its effective kernel
K = W + convmap(W) * (rim_factor * W) and its bias (rim_factor: the RIM's flax
param `scale`); every BatchNorm (eval mode, gamma = its flax param `scale`) is
merged into the 1x1 conv before it. The result is a `conv='plain'`,
`batch_norm=False` model whose outputs equal the unfolded model's in eval mode.
Pure: the inputs are not modified.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from msit_jax.models.layers import FROZEN, rim_effective_kernel
from msit_jax.models.msno import BN_INPUT_CONV


def _subtree(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _rim_paths(frozen: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Module paths of every RIM (each owns a frozen 'kernel')."""
    out = []
    for k, v in frozen.items():
        if isinstance(v, Mapping):
            out.extend(_rim_paths(v, prefix + (k,)))
        elif k == "kernel":
            out.append(prefix)
    return out


def _bn_paths(params: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of modules that contain a 'bn' child."""
    out = []
    for k, v in params.items():
        if isinstance(v, Mapping):
            if k == "bn":
                out.append(prefix)
            else:
                out.extend(_bn_paths(v, prefix + (k,)))
    return out


def fold(model_cfg: ml_collections.ConfigDict, variables: Mapping
         ) -> tuple[ml_collections.ConfigDict, dict]:
    """(model_cfg, variables) -> an equivalent plain-conv, BatchNorm-free model."""
    params = jax.tree_util.tree_map(lambda x: np.array(x, np.float32), dict(variables["params"]))
    frozen = variables.get(FROZEN, {})
    stats = variables.get("batch_stats", {})
    if model_cfg.conv == "rim":
        for path in _rim_paths(frozen):
            p = _subtree(params, path)
            rim_factor = p["scale"]
            kernel = rim_effective_kernel(_subtree(frozen, path)["kernel"], p["convmap"],
                                          rim_factor)
            parent = _subtree(params, path[:-1])
            parent[path[-1]] = {"kernel": np.asarray(kernel, np.float32),
                                "bias": p["bias"]}
    if model_cfg.batch_norm:
        for path in _bn_paths(params):
            mod = _subtree(params, path)
            conv_name = BN_INPUT_CONV[path[-1]]
            bn_p, bn_s = mod.pop("bn"), _subtree(stats, path)["bn"]
            bn_gamma, bn_beta = bn_p["scale"], bn_p["bias"]
            inv = bn_gamma.astype(np.float64) / np.sqrt(
                bn_s["var"].astype(np.float64) + model_cfg.bn_eps)
            conv = mod[conv_name]
            conv["kernel"] = (conv["kernel"] * inv).astype(np.float32)
            conv["bias"] = ((conv["bias"] - bn_s["mean"]) * inv + bn_beta).astype(np.float32)
    cfg = copy.deepcopy(model_cfg)
    cfg.conv = "plain"
    cfg.batch_norm = False
    return cfg, {"params": params}


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays: all collections of a variables dict
    (learnable and frozen), or one collection (e.g. a train state's `params`)."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))
