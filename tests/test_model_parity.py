"""Whole-model parity: a PyTorch MSIT module -> state_dict -> load -> same outputs.

The PyTorch side (tests/torch_reference.py) is an independent implementation of
docs/design.md (section 2) with the official module names; its decoder samples with
F.grid_sample in float32 as the reference does, so exact-tie queries are
included in the comparison.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the PyTorch reference (requirements-torch.txt)

from msit_jax import build_model, geometry, tiny_model_config

from msit_jax.inference import engine
from msit_jax.io.torch_io import state_dict_to_variables
from tests.torch_reference import TorchMSIT, randomize_, torch_make_coord


def torch_model(cfg, seed=0):
    torch.manual_seed(seed)
    return randomize_(TorchMSIT(cfg), seed)


def sd_numpy(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.fixture(params=[("edsr-baseline", "rim"), ("edsr-baseline", "plain"), ("rdn", "rim"),
                        ("rdn", "plain")], ids=lambda p: "-".join(p))
def pair(request):
    cfg = tiny_model_config(*request.param)
    tm = torch_model(cfg)
    return cfg, tm, state_dict_to_variables(sd_numpy(tm), cfg)


def test_full_grid_upscale_matches_torch(pair):
    """x3.5 on 12 x 10 (anisotropic rounding, exact ties) through `upscale`."""
    cfg, tm, variables = pair
    rs = np.random.RandomState(1)
    lr = rs.rand(12, 10, 3).astype(np.float32)
    out_hw = (42, 35)
    tm.eval()
    with torch.no_grad():
        inp = (torch.from_numpy(lr).permute(2, 0, 1)[None] - 0.5) / 0.5
        coord = torch_make_coord(*out_hw).reshape(1, -1, 2)
        cell = torch.tensor([[2 / out_hw[0], 2 / out_hw[1]]])
        ref = (tm(inp, coord, cell) * 0.5 + 0.5)[0].reshape(*out_hw, 3).numpy()
    ours = engine.upscale(cfg, variables, lr, out_hw, clamp=False, chunk=500)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("train", [False, True])
def test_random_queries_match_torch(pair, train):
    """The training path: a batch of 2, random continuous queries, BN in train or eval mode."""
    cfg, tm, variables = pair
    rs = np.random.RandomState(2)
    b, h, w, q = 2, 9, 11, 300
    inp = rs.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    coord = rs.uniform(-1, 1, (b, q, 2)).astype(np.float32)
    cell = np.array([[2 / 40, 2 / 30], [2 / 20, 2 / 25]], np.float32)
    tm.train(train)
    with torch.no_grad():
        ref = tm(torch.from_numpy(inp).permute(0, 3, 1, 2), torch.from_numpy(coord),
                 torch.from_numpy(cell)).numpy()
    g = geometry.query_geometry(coord, (h, w), cfg.radius, cell * np.array([h, w], np.float32))
    model = build_model(cfg)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    if train:
        out, upd = apply(variables, inp, g, train=True, mutable=("batch_stats",))
        # running statistics after one step: torch momentum, unbiased variance
        updated_ref = state_dict_to_variables(sd_numpy(tm), cfg)["batch_stats"]
        jax.tree_util.tree_map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5),
                               upd["batch_stats"], updated_ref)
    else:
        out = apply(variables, inp, g)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0)
