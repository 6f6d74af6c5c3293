"""Gradient flow: the frozen RIM base kernel never changes; every parameter learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msit_jax import build_model, geometry, tiny_model_config
from msit_jax.layers import FROZEN
from tests.conftest import init_variables


def batch(cfg, seed=0):
    rs = np.random.RandomState(seed)
    b, h, w, q = 2, 8, 9, 64
    inp = rs.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    coord = rs.uniform(-1, 1, (b, q, 2)).astype(np.float32)
    g = geometry.query_geometry(coord, (h, w), cfg.radius)
    rc = np.tile(geometry.rel_cell((24, 27), (h, w)), (b, 1))
    gt = rs.uniform(-1, 1, (b, q, 3)).astype(np.float32)
    return inp, g, rc, gt


@pytest.mark.parametrize("conv", ["rim", "plain"])
def test_adam_step_updates_params_not_frozen(conv):
    cfg = tiny_model_config("edsr-baseline", conv)
    model = build_model(cfg)
    v = init_variables(cfg)
    inp, g, rc, gt = batch(cfg)

    def loss_fn(params, frozen):
        out, upd = model.apply({"params": params, FROZEN: frozen, "batch_stats": v["batch_stats"]},
                               inp, g.coord, g.key_idx, g.rel, rc, train=True,
                               mutable=["batch_stats"])
        return jnp.mean(jnp.abs(out - gt))

    frozen = v.get(FROZEN, {})
    grads, grads_frozen = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(v["params"], frozen)
    # every learnable tensor receives gradient
    for path, gleaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.abs(gleaf).max() > 0, jax.tree_util.keystr(path)
    if conv == "rim":
        # W does influence the loss: it would move if it were a parameter
        assert all(np.abs(x).max() > 0 for x in jax.tree_util.tree_leaves(grads_frozen))

    opt = optax.adam(1e-3)
    state = opt.init(v["params"])
    assert not any(FROZEN in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(state)[0])
    @jax.jit
    def step(params, grads, state):
        updates, _ = opt.update(grads, state, params)
        return optax.apply_updates(params, updates)

    new_params = step(v["params"], grads, state)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(new_params)[0],
                            jax.tree_util.tree_leaves(v["params"])):
        assert not np.array_equal(a, b), jax.tree_util.keystr(path)
    # the optimiser never sees the frozen collection: W is bit-identical after the step
    new_vars = {"params": new_params, FROZEN: frozen, "batch_stats": v["batch_stats"]}
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_vars[FROZEN], v.get(FROZEN, {}))
