"""SwinIR encoder (msit_jax.models.swinir) and its LTE-layout weight import.

Parity is against tests/torch_swinir_reference.py, an independent PyTorch
formulation (global attention with a window mask); the check against LTE's own
code at paper size is benchmarks/swinir_parity.py (BENCHMARKS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msit_jax.io.swinir_import import infer_swinir_config, swinir_params_from_state_dict
from msit_jax.models.swinir import (SWINIR_DEFAULTS, SwinIREncoder, relative_position_index,
                                    shift_attention_mask)

torch = pytest.importorskip("torch")  # the PyTorch reference (requirements-torch.txt)

from tests.torch_swinir_reference import (TorchSwinIR, randomize_,  # noqa: E402
                                          square_mask_buffer, window_index_buffer)

TINY = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 3), num_feat=16)


def _pair(window: int, resi_connection: str = "1conv", seed: int = 0):
    cfg = dict(TINY, window_size=window, resi_connection=resi_connection)
    ref = randomize_(TorchSwinIR(**cfg, img_size=3 * window).eval(), seed)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    return cfg, ref, state


def _compare(cfg, ref, state, hw, dtype=jnp.float32):
    params = swinir_params_from_state_dict(state, config=cfg)
    enc = SwinIREncoder.from_config(cfg, dtype=dtype)
    x = np.random.RandomState(1).uniform(-1, 1, (1, *hw, 3)).astype(np.float32)
    out = np.asarray(jax.jit(lambda p, x: enc.apply({"params": p}, x))(params, x))
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert out.shape == (1, *hw, cfg["num_feat"]) == want.shape
    return float(np.max(np.abs(out - want)))


@pytest.mark.parametrize("window,hw", [(8, (16, 16)), (4, (13, 19))])
def test_matches_the_torch_reference(window, hw):
    """Aligned at window 8 (2 x 2 windows, shifted masks), unaligned at window 4
    (13 x 19 reflect-padded to 16 x 20: 4 x 5 windows) and cropped back."""
    assert _compare(*_pair(window), hw) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("window,hw,resi", [(8, (13, 19), "1conv"), (4, (16, 16), "1conv"),
                                            (4, (9, 6), "3conv"), (8, (5, 7), "1conv")])
def test_matches_the_torch_reference_more_sizes(window, hw, resi):
    assert _compare(*_pair(window, resi, seed=2), hw) <= 1e-5


@pytest.mark.slow
def test_bfloat16_compute_stays_close():
    cfg, ref, state = _pair(4)
    assert _compare(cfg, ref, state, (13, 19), jnp.bfloat16) <= 0.1


def test_index_and_mask_match_the_reference_formulation():
    for w in (2, 4, 8):
        assert np.array_equal(relative_position_index(w), window_index_buffer(w).numpy())
        for side in (w, 3 * w):
            assert np.array_equal(shift_attention_mask(side, side, w, w // 2),
                                  square_mask_buffer(side, w).numpy())
    m = shift_attention_mask(8, 12, 4, 2)
    assert m.shape == (6, 16, 16) and set(np.unique(m)) == {0.0, -100.0}
    assert not m[0].any()  # an interior window holds one region


def test_import_infers_the_config_and_checks_buffers():
    cfg, _, state = _pair(4, "3conv")
    assert infer_swinir_config(state) == {**SWINIR_DEFAULTS, **cfg}
    prefixed = {"encoder." + k: v for k, v in state.items()}
    prefixed["imnet.layers.0.weight"] = np.zeros((2, 2), np.float32)  # ignored: other prefix
    params = swinir_params_from_state_dict(prefixed, prefix="encoder.")
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
    want = jax.eval_shape(lambda: SwinIREncoder.from_config(cfg).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))["params"]
    assert shapes == jax.tree_util.tree_map(lambda a: a.shape, want)
    assert params["conv_first"]["kernel"].shape == (3, 3, 3, 24)  # OIHW -> HWIO
    np.testing.assert_array_equal(params["layers_0"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                  state["layers.0.residual_group.blocks.1.attn.qkv.weight"].T)

    key = "layers.1.residual_group.blocks.0.attn.relative_position_index"
    bad = dict(state, **{key: state[key][::-1].copy()})
    with pytest.raises(ValueError, match="relative_position_index differs"):
        swinir_params_from_state_dict(bad)
    key = "layers.0.residual_group.blocks.1.attn_mask"
    bad = dict(state, **{key: np.zeros_like(state[key])})
    with pytest.raises(ValueError, match="attn_mask differs"):
        swinir_params_from_state_dict(bad)
    with pytest.raises(ValueError, match="does not use.*extra"):
        swinir_params_from_state_dict(dict(state, extra=np.zeros(1)))
    missing = {k: v for k, v in state.items() if not k.startswith("norm.")}
    with pytest.raises(ValueError, match="lacks 'norm.weight'"):
        swinir_params_from_state_dict(missing)
    with pytest.raises(ValueError, match="embed_dim=24, the config says 32"):
        swinir_params_from_state_dict(state, config=dict(cfg, embed_dim=32))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown SwinIR config keys \\['upscale'\\]"):
        SwinIREncoder.from_config(dict(upscale=4))
    with pytest.raises(ValueError, match="num_heads"):
        SwinIREncoder.from_config(dict(TINY, num_heads=(5, 3)))
    with pytest.raises(ValueError, match="resi_connection"):
        SwinIREncoder.from_config(dict(TINY, resi_connection="2conv"))
    enc = SwinIREncoder.from_config({}, name="encoder")
    assert (enc.embed_dim, enc.depths, enc.window_size, enc.num_feat) == (180, (6,) * 6, 8, 64)


@pytest.mark.slow
def test_paper_size_parameter_count():
    shapes = jax.eval_shape(lambda: SwinIREncoder.from_config({}).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == 11_603_044


@pytest.mark.slow
def test_drop_path_only_in_training():
    cfg = dict(TINY, depths=(2,), num_heads=(2,), window_size=4)
    enc = SwinIREncoder.from_config(dict(cfg, drop_path_rate=0.5))
    x = np.random.RandomState(0).randn(4, 8, 8, 3).astype(np.float32)
    v = jax.jit(enc.init)(jax.random.PRNGKey(0), x)
    run = jax.jit(lambda m, v, x, train, key: m.apply(v, x, train=train, rngs={"dropout": key}),
                  static_argnums=(0, 3))
    ev = run(enc, v, x, False, jax.random.PRNGKey(1))
    tr = run(enc, v, x, True, jax.random.PRNGKey(1))
    assert not np.allclose(ev, tr)
    plain = SwinIREncoder.from_config(dict(cfg, drop_path_rate=0.0))
    np.testing.assert_allclose(run(plain, v, x, True, jax.random.PRNGKey(1)), ev,
                               rtol=0, atol=1e-6)
