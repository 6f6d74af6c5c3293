"""Shared test fixtures. Tests run on CPU with tiny model configs."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from msit_jax import build_model, geometry, tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def init_variables(model_cfg, seed: int = 0, lr_hw=(9, 11), randomize_stats: bool = True):
    """Variables of a model as numpy; BatchNorm statistics randomised (not 0/1) so
    eval-mode tests exercise them."""
    model = build_model(model_cfg)
    coord = geometry.make_coord((5, 5)).reshape(1, -1, 2)
    g = geometry.query_geometry(coord, lr_hw, model_cfg.radius)
    rc = geometry.rel_cell((5, 5), lr_hw)[None]
    v = model.init(jax.random.PRNGKey(seed), np.zeros((1, *lr_hw, 3), np.float32),
                   g.coord, g.key_idx, g.rel, rc)
    v = jax.tree_util.tree_map(np.asarray, v)
    if randomize_stats and "batch_stats" in v:
        rs = np.random.RandomState(seed + 1)
        v["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda p, x: (rs.uniform(0.5, 2.0, x.shape) if p[-1].key == "var"
                          else rs.normal(0, 0.3, x.shape)).astype(np.float32),
            v["batch_stats"])
    return v


@pytest.fixture(params=["edsr-baseline", "rdn"])
def encoder(request):
    return request.param


@pytest.fixture
def tiny_cfg():
    return tiny_model_config()


@pytest.fixture
def tiny_vars(tiny_cfg):
    return init_variables(tiny_cfg)


def shared_data(*parts):
    """Path under ../shared/data; skips nothing: a missing folder is a test error."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"test data missing: {path}")
    return path
