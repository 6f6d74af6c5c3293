"""Shared test fixtures. Tests run on CPU with tiny model configs."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from msit_jax import tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def init_variables(model_cfg, seed: int = 0):
    """Random variables for a model config, as numpy.

    Shapes come from `jax.eval_shape` of the model's init; values from numpy.
    (Flax's own init compiles one random-number program per tensor shape, which
    costs XLA:CPU seconds each; tests need random weights, not that init.)
    BatchNorm statistics and biases are non-trivial so every term matters.
    """
    from msit_jax.torch_io import variable_shapes

    rs = np.random.RandomState(seed)

    def fill(path, shape):
        names = [getattr(p, "key", "") for p in path]
        leaf, parent = names[-1], names[-2] if len(names) > 1 else ""
        if names[0] == "batch_stats":
            return rs.uniform(0.5, 2.0, shape) if leaf == "var" else rs.normal(0, 0.3, shape)
        if parent == "bn":
            return rs.uniform(0.5, 1.5, shape) if leaf == "scale" else rs.normal(0, 0.1, shape)
        if leaf == "bias":
            return rs.normal(0, 0.1, shape)
        if leaf == "convmap":
            return rs.normal(0, 0.3, shape)
        if leaf == "scale":  # RIM per-2-D-kernel factor
            return rs.normal(0, 0.5, shape)
        fan_in = int(np.prod(shape[:-1]))
        return rs.normal(0, 1 / np.sqrt(fan_in), shape)

    shapes = variable_shapes(model_cfg)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: fill(p, s).astype(np.float32), shapes,
        is_leaf=lambda x: isinstance(x, tuple))


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
