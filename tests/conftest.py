"""Shared test fixtures. Tests run on CPU with tiny model configs."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from msit_jax import tiny_model_config
from msit_jax.models.random_init import random_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def init_variables(model_cfg, seed: int = 0):
    return random_variables(model_cfg, seed)


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
