"""This project's model checkpoint: a directory with the model config and an Orbax tree.

Layout:
  DIR/model_config.json   the model config (ml_collections, as JSON)
  DIR/variables/          Orbax StandardCheckpointer tree {'params', 'frozen', 'batch_stats'}
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


def config_to_json(model_cfg: ml_collections.ConfigDict) -> str:
    return model_cfg.to_json(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A model config from model_config.json. Files written before execution
    options left the model config still carry precision/dtype/fft_min_kernel:
    those are ignored (they never changed the function, only how it ran)."""
    from msit_jax.config import LEGACY_RUNTIME_FIELDS, model_config

    data = json.loads(text)
    for k in LEGACY_RUNTIME_FIELDS:
        data.pop(k, None)
    cfg = model_config()
    unknown = set(data) - set(cfg.keys())
    if unknown:
        raise ValueError(f"unknown model config fields {sorted(unknown)}")
    for k, v in data.items():
        if isinstance(v, list):
            v = tuple(v)
        if isinstance(v, dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


def to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(x), tree)


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
        os.path.join(path, VARIABLES_DIR))


def save_model(path: str, model_cfg: ml_collections.ConfigDict, variables: Any) -> str:
    """Write a model checkpoint directory (created; must not already hold one)."""
    path = os.path.abspath(path)
    if is_model_dir(path):
        raise FileExistsError(f"{path} already holds a model checkpoint")
    os.makedirs(path, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, VARIABLES_DIR), to_numpy(dict(variables)))
    ckptr.wait_until_finished()
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(config_to_json(model_cfg))
    return path


def load_model(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """Read a model checkpoint directory written by `save_model`."""
    path = os.path.abspath(path)
    if not is_model_dir(path):
        raise FileNotFoundError(
            f"{path} is not a msit-jax model checkpoint (expected {CONFIG_FILE} and "
            f"{VARIABLES_DIR}/ inside)")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        cfg = config_from_json(f.read())
    variables = ocp.StandardCheckpointer().restore(os.path.join(path, VARIABLES_DIR))
    return cfg, to_numpy(variables)
