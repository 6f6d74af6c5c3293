"""fold(): RIM and BatchNorm folding leaves eval-mode outputs unchanged."""

import copy

import jax
import numpy as np
import pytest

from msit_jax import tiny_model_config

from msit_jax.inference import engine
from msit_jax.models import reparam
from msit_jax.models.random_init import random_variables


@pytest.mark.parametrize("conv", ["rim", "plain"])
def test_fold_equivalence(encoder, conv):
    cfg = tiny_model_config(encoder, conv)
    variables = random_variables(cfg, seed=3)
    before = copy.deepcopy(variables)
    lr = np.random.RandomState(0).rand(10, 9, 3).astype(np.float32)
    ref = engine.upscale(cfg, variables, lr, (27, 31), clamp=False)

    fcfg, fvars = reparam.fold(cfg, variables)
    out = engine.upscale(fcfg, fvars, lr, (27, 31), clamp=False)
    assert np.abs(out - ref).max() <= 1e-5

    assert fcfg.conv == "plain" and not fcfg.batch_norm
    assert set(fvars) == {"params"}  # no frozen kernels, no BatchNorm statistics
    assert reparam.count_params(fvars) < reparam.count_params(variables)
    assert cfg.conv == conv and cfg.batch_norm  # inputs untouched
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)


def test_fold_is_idempotent_on_folded_models():
    cfg = tiny_model_config()
    fcfg, fvars = reparam.fold(cfg, random_variables(cfg))
    fcfg2, fvars2 = reparam.fold(fcfg, fvars)
    assert fcfg2.to_dict() == fcfg.to_dict()
    jax.tree_util.tree_map(np.testing.assert_array_equal, fvars2, fvars)


def test_fold_kernel_shapes_match_plain_model():
    """A folded RIM model has exactly the variable tree of a plain, BatchNorm-free model."""
    from msit_jax.models.model import variable_shapes

    cfg = tiny_model_config("rdn", "rim")
    fcfg, fvars = reparam.fold(cfg, random_variables(cfg))
    want = variable_shapes(fcfg)
    got = jax.tree_util.tree_map(np.shape, fvars)
    assert got == want
