"""Gradient flow: the frozen RIM base kernel never changes; every parameter learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msit_jax import build_model, geometry, tiny_model_config
from msit_jax.models.layers import FROZEN
from msit_jax.ops.runtime import RuntimeOptions
from msit_jax.models.random_init import random_variables

# Each test compiles gradients of the whole model (5-30 s). The quick tier keeps a
# training run (test_train_loop) and each CPU conv method's gradients (test_ops).
pytestmark = pytest.mark.slow


def batch(cfg, seed=0):
    rs = np.random.RandomState(seed)
    b, h, w, q = 2, 8, 9, 64
    inp = rs.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    coord = rs.uniform(-1, 1, (b, q, 2)).astype(np.float32)
    g = geometry.query_geometry(coord, (h, w), cfg.radius,
                                np.tile(geometry.rel_cell((24, 27), (h, w)), (b, 1)))
    gt = rs.uniform(-1, 1, (b, q, 3)).astype(np.float32)
    return inp, g, gt


@pytest.mark.parametrize("conv", ["rim", "plain"])
def test_adam_step_updates_params_not_frozen(conv):
    cfg = tiny_model_config("edsr-baseline", conv)
    model = build_model(cfg)
    v = random_variables(cfg)
    inp, g, gt = batch(cfg)

    def loss_fn(params, frozen):
        out, upd = model.apply({"params": params, FROZEN: frozen, "batch_stats": v["batch_stats"]},
                               inp, g, train=True, mutable=["batch_stats"])
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


def _loss(model, v, inp, g, gt):
    def loss_fn(params, inp):
        out, _ = model.apply({**v, "params": params}, inp, g, train=True,
                             mutable=["batch_stats"])
        return jnp.mean(jnp.abs(out - gt))
    return loss_fn


@pytest.mark.parametrize("encoder", ["edsr-baseline", "rdn"])
def test_cpu_kernels_match_the_accelerator_program(encoder):
    """The CPU conv methods (conv_impl 'auto' on CPU) give the train-step gradients
    of XLA's own rules (conv_impl 'xla': the program GPUs and TPUs run, i.e.
    reference autodiff), for the whole RIM model in train mode."""
    cfg = tiny_model_config(encoder, "rim")
    v = random_variables(cfg)
    inp, g, gt = batch(cfg)
    grads = {}
    for impl in ("auto", "xla"):
        model = build_model(cfg, RuntimeOptions(conv_impl=impl))
        grads[impl] = jax.jit(jax.grad(_loss(model, v, inp, g, gt)))(v["params"], inp)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads["auto"])[0],
                            jax.tree_util.tree_leaves(grads["xla"])):
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))


def test_forward_mode_through_the_model():
    """jax.jvp (inputs and parameters) and jax.jacfwd through the whole model work,
    and agree with reverse mode: <J u, w> == <u, J^T w> (the dot-product test)."""
    cfg = tiny_model_config("edsr-baseline", "rim")
    model = build_model(cfg)
    v = random_variables(cfg)
    inp, g, gt = batch(cfg)
    rs = np.random.RandomState(3)

    def f(params, inp):
        return model.apply({**v, "params": params}, inp, g)

    u_p = jax.tree_util.tree_map(lambda x: jnp.asarray(rs.randn(*x.shape), jnp.float32),
                                 v["params"])
    u_i = jnp.asarray(rs.randn(*inp.shape), jnp.float32)
    out, jvp = jax.jit(lambda p, i: jax.jvp(f, (p, i), (u_p, u_i)))(v["params"], inp)
    w = jnp.asarray(rs.randn(*out.shape), jnp.float32)
    _, vjp = jax.vjp(f, v["params"], inp)
    ct_p, ct_i = jax.jit(vjp)(w)
    lhs = float(jnp.vdot(jvp, w))
    rhs = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(u_p),
                                                    jax.tree_util.tree_leaves(ct_p)))
                + jnp.vdot(u_i, ct_i))
    assert abs(lhs - rhs) <= 1e-4 * max(abs(lhs), 1.0), (lhs, rhs)
    # jacfwd of the mean output along a 3-parameter family of inputs
    dirs = jnp.asarray(rs.randn(3, *inp.shape), jnp.float32)
    jac = jax.jacfwd(lambda c: jnp.mean(f(v["params"], inp + jnp.tensordot(c, dirs, 1))))(
        jnp.zeros(3))
    fd = [(jnp.mean(f(v["params"], inp + 1e-2 * d)) - jnp.mean(f(v["params"], inp - 1e-2 * d)))
          / 2e-2 for d in dirs]
    np.testing.assert_allclose(np.asarray(jac), np.asarray(fd), rtol=2e-2, atol=2e-4)
