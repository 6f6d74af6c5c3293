"""Shared test fixtures and test-only compile settings. Tests run on CPU with tiny
model configs.

Compile time is most of a test's time on CPU, so `pytest_configure` sets, for this
pytest process only (the library keeps no caches or settings for the tests' sake):
  * jax_disable_most_optimizations: XLA:CPU compiles without backend optimisation,
    3-4x faster for gradient programs of the whole model, with values that pass
    the same tolerances (the torch parity tests compare to 1e-6). The programs
    run slower, which tiny configs do not notice;
  * XLA's persistent compilation cache in a directory for this session: tests
    compile the same programs again (each training run builds its train step
    afresh, as a real run does once), and now each compiles once per session.
Subprocesses (the CLI, script and multi-process tests) inherit neither: they run
the optimised programs a user runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

from msit_jax import tiny_model_config
from msit_jax.models.random_init import random_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
# Programs that compile faster than this are not worth a cache file (reading and
# checking an entry costs a few ms).
CACHE_MIN_COMPILE_S = 0.2
_TEST_OPTIONS = ("jax_disable_most_optimizations", "jax_compilation_cache_dir",
                 "jax_persistent_cache_min_compile_time_secs")
_SAVED_OPTIONS = pytest.StashKey[dict]()


def pytest_configure(config):
    # Before collection, so both hold from the first compilation on (JAX decides
    # once per process whether to use the cache).
    config.stash[_SAVED_OPTIONS] = {k: jax.config.values[k] for k in _TEST_OPTIONS}
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="msit-jax-xla-"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)


def pytest_unconfigure(config):
    saved = config.stash.get(_SAVED_OPTIONS, None)
    if saved is not None:
        cache_dir = jax.config.values["jax_compilation_cache_dir"]
        for k, v in saved.items():
            jax.config.update(k, v)
        shutil.rmtree(cache_dir, ignore_errors=True)


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
