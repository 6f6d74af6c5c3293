"""Runtime options that change how a train step runs, not what it computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msit_jax import build_model, tiny_model_config
from msit_jax.models.random_init import random_variables
from msit_jax.ops.runtime import RuntimeOptions
from tests.test_gradients import batch


def _loss_and_grads(cfg, variables, runtime):
    model = build_model(cfg, runtime)
    inp, g, gt = batch(cfg)

    def loss_fn(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             inp, g, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.abs(out - gt))

    fn = jax.jit(jax.value_and_grad(loss_fn))
    return fn, fn(variables["params"])


@pytest.mark.slow  # two whole-model gradient compilations
def test_remat_decoder_gives_the_same_loss_and_gradients_and_recomputes():
    """Chunks of 24 of the 64 queries (the last one padded): the loss, the gradients and
    the parameters of the plain decoder; the program scans rematerialised chunks."""
    cfg = tiny_model_config("edsr-baseline", "plain")
    v = random_variables(cfg)
    fn0, (loss, grads) = _loss_and_grads(cfg, v, RuntimeOptions())
    fn, (loss_r, grads_r) = _loss_and_grads(cfg, v, RuntimeOptions(remat_decoder=24))
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(loss_r))
    flat, flat_r = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_r)
    assert len(flat) == len(flat_r)
    for (path, x), y in zip(flat, flat_r):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    # the same parameters (names, shapes) with and without it
    model_r = build_model(cfg, RuntimeOptions(remat_decoder=24))
    shapes = jax.tree_util.tree_map(lambda x: x.shape, v["params"])
    inp, g, _ = batch(cfg)
    init_r = jax.eval_shape(model_r.init, jax.random.PRNGKey(0), inp, g)["params"]
    assert jax.tree_util.tree_map(lambda x: x.shape, init_r) == shapes
    # the backward recomputes the decoder chunks: a loop, and more rematerialised regions
    # (lowered with optimization barriers) than the program without the option
    def count(f, op):
        return f.lower(v["params"]).as_text().count(f"stablehlo.{op}")

    assert count(fn, "while") > count(fn0, "while")
    assert count(fn, "optimization_barrier") > count(fn0, "optimization_barrier")


def test_remat_decoder_is_a_query_count():
    for bad in ("yes", True, -1, 2.5):
        with pytest.raises(ValueError, match="remat_decoder"):
            RuntimeOptions(remat_decoder=bad)
    assert RuntimeOptions.from_config({"remat_decoder": 256}).remat_decoder == 256


@pytest.mark.slow  # two whole-model gradient compilations
def test_bf16_model_gradients_within_stated_distance_of_float32():
    """Training in bf16 (bf16 operands, and with ops.matmul bf16 cotangents in the
    contractions' backward) gives gradients whose median per-tensor relative error
    against the float32 gradients is under 5% (measured 2.9%; 2.7% with float32
    cotangents), every tensor within 25% of the gradient's largest tensor norm."""
    cfg = tiny_model_config("edsr-baseline", "plain")
    v = random_variables(cfg)
    _, (_, g32) = _loss_and_grads(cfg, v, RuntimeOptions())
    _, (_, g16) = _loss_and_grads(cfg, v, RuntimeOptions(dtype="bfloat16"))
    pairs = list(zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)))
    scale = max(float(np.linalg.norm(np.asarray(x))) for x, _ in pairs)
    rel = []
    for x, y in pairs:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err = float(np.linalg.norm(y - x))
        assert err <= 0.25 * scale, (err, scale)
        if np.linalg.norm(x) > 1e-3 * scale:  # biases before a BatchNorm have ~0 gradient
            rel.append(err / float(np.linalg.norm(x)))
    assert 0 < float(np.median(rel)) < 0.05, np.median(rel)


@pytest.mark.slow  # two model compilations; the op-level s2d check is in test_ops (quick)
@pytest.mark.parametrize("conv", ["plain", "rim"])
def test_s2d_multiscale_convs_give_the_same_outputs(conv):
    """runtime.s2d_min_kernel: the multi-scale heads on 4x4 pixel blocks give the model's
    outputs to float32 rounding, with the same parameters; 0 changes nothing."""
    from msit_jax.models.model import dummy_inputs

    cfg = tiny_model_config("edsr-baseline", conv)
    v = random_variables(cfg)
    inp, g, _ = batch(cfg)
    plain = build_model(cfg).apply(v, inp, g)
    blocks = build_model(cfg, RuntimeOptions(s2d_min_kernel=3)).apply(v, inp, g)
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(plain), rtol=0, atol=2e-5)
    shapes = jax.eval_shape(build_model(cfg, RuntimeOptions(s2d_min_kernel=3)).init,
                            jax.random.PRNGKey(0), *dummy_inputs(cfg, (8, 8), 16))
    assert (jax.tree_util.tree_map(lambda x: x.shape, shapes["params"])
            == jax.tree_util.tree_map(lambda x: x.shape, v["params"]))
    with pytest.raises(ValueError, match="s2d_min_kernel"):
        RuntimeOptions(s2d_min_kernel=-1)


# --- the one `runtime` field of the Flax modules ----------------------------------------

@pytest.mark.parametrize("name,want", [("highest", jax.lax.Precision.HIGHEST),
                                       ("high", jax.lax.Precision.HIGH),
                                       ("default", jax.lax.Precision.DEFAULT)])
def test_lax_precision_is_the_precision_the_modules_used(name, want):
    assert RuntimeOptions(precision=name).lax_precision is want


@pytest.mark.parametrize("name,want", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_compute_dtype_is_the_dtype_the_modules_used(name, want):
    assert RuntimeOptions(dtype=name).compute_dtype == jnp.dtype(want)


def test_direct_convs_turns_off_only_the_conv_thresholds():
    rt = RuntimeOptions("high", "bfloat16", fft_min_kernel=3, conv_impl="xla", s2d_min_kernel=5,
                        remat_decoder=8)
    assert rt.direct_convs() == RuntimeOptions("high", "bfloat16", fft_min_kernel=0,
                                               conv_impl="xla", s2d_min_kernel=0,
                                               remat_decoder=8)
    assert hash(rt) != hash(rt.direct_convs())  # distinct static attributes for jit


def test_no_model_module_keeps_a_loose_runtime_field():
    """Every Flax module of msit_jax.models takes its execution options as `runtime`."""
    import dataclasses
    import inspect

    import flax.linen as nn

    from msit_jax.models import decoder, encoders, layers, model, msno, swinir

    loose = {"precision", "dtype", "impl", "fft_min_kernel", "s2d_min_kernel", "remat_chunk"}
    seen = 0
    for mod in (decoder, encoders, layers, model, msno, swinir):
        for cls in vars(mod).values():
            if inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == mod.__name__:
                names = {f.name for f in dataclasses.fields(cls)}
                assert not names & loose, (cls.__name__, names & loose)
                if "runtime" in names:
                    seen += 1
                    assert cls.__dataclass_fields__["runtime"].default == RuntimeOptions()
    assert seen >= 20  # Conv, RIMConv, the MSNO parts, decoder, encoders, SwinIR parts, MSIT


def test_a_conv_built_with_bfloat16_runtime_computes_in_bfloat16():
    from msit_jax import ops
    from msit_jax.models.layers import Conv

    x = jnp.asarray(np.random.RandomState(0).randn(1, 6, 5, 4).astype(np.float32))
    rs = np.random.RandomState(1)
    p = {"kernel": rs.randn(3, 3, 4, 3).astype(np.float32), "bias": rs.randn(3).astype(np.float32)}
    outs = {}
    for dt in ("float32", "bfloat16"):
        outs[dt] = Conv(3, 3, runtime=RuntimeOptions(dtype=dt)).apply({"params": p}, x)
        want = ops.conv2d(x.astype(dt), p["kernel"], p["bias"], precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_array_equal(np.asarray(outs[dt]), np.asarray(want))
    assert outs["float32"].dtype == jnp.float32 and outs["bfloat16"].dtype == jnp.bfloat16


def test_only_the_multiscale_convs_get_the_thresholds():
    """MSIT hands its runtime as given to the multi-scale convs of MSNO and the Q/K branch
    and `runtime.direct_convs()` to every other conv (encoder, conv_ch, conv_vs_0, the 1x1
    projections and mix heads), so thresholds of 1 never turn a 1x1 or 3x3 into an FFT."""
    import flax.linen as nn

    from msit_jax.models.layers import Conv, RIMConv
    from msit_jax.models.model import dummy_inputs

    rt = RuntimeOptions("high", "bfloat16", fft_min_kernel=1, conv_impl="xla", s2d_min_kernel=1,
                        remat_decoder=4)
    cfg = tiny_model_config("edsr-baseline", "rim")  # Conv and RIMConv (multi-scale) both
    model = build_model(cfg, rt)
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, (Conv, RIMConv)) and context.method_name == "__call__":
            seen["/".join(context.module.path)] = context.module.runtime
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), *dummy_inputs(cfg, (8, 8), 16))
    multi = {p for p in seen if "/msc/" in p}
    assert len(multi) == cfg.msno_heads + cfg.qk_heads, sorted(seen)
    assert any(p.startswith("encoder/") for p in seen) and "conv_vs_0" in seen
    for path, got in seen.items():
        assert got == (rt if path in multi else rt.direct_convs()), path
