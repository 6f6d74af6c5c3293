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
from msit_jax.ops.runtime import RuntimeOptions

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
    enc = SwinIREncoder.from_config(cfg, RuntimeOptions(dtype=jnp.dtype(dtype).name))
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


# --- the encoder registry's 'swinir': configs, bounds, the whole model -------------------

from msit_jax import model_config, tiny_model_config  # noqa: E402
from msit_jax.io import config_check, pretrained  # noqa: E402
from msit_jax.io.torch_io import layout, state_dict_to_variables, variables_to_state_dict  # noqa: E402,E501
from msit_jax.models.config import validate_model_config  # noqa: E402
from msit_jax.models.encoders import ENCODERS, stored_family  # noqa: E402
from msit_jax.models.random_init import random_variables  # noqa: E402

# The tiny model's encoder sizes, as the torch reference builds them (LTE's img_size 48).
REF_SIZES = dict(embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, num_feat=8)


def _tiny(conv="rim"):
    cfg = tiny_model_config("swinir", conv)
    cfg.swinir.update(REF_SIZES)
    return cfg


def _names(cfg) -> dict:
    return {e["torch_key"]: config_check.tensor(e["torch_key"], e["torch_shape"], "float32")
            for e in layout(cfg)}


def test_registry_entry_configs_and_official_args():
    spec = ENCODERS["swinir"]
    assert model_config("swinir").swinir.to_dict() == SWINIR_DEFAULTS
    assert model_config("rdn").swinir.to_dict() == SWINIR_DEFAULTS  # every config carries it
    for cfg in (model_config("swinir"), tiny_model_config("swinir"), _tiny("plain")):
        validate_model_config(cfg)
    assert spec.out_features(model_config("swinir").swinir) == 64
    assert spec.radius(model_config("swinir").swinir) is None  # never tiled
    assert "window 8" in spec.describe(model_config("swinir").swinir)
    args = pretrained.official_args(model_config("swinir"))
    assert args["encoder_spec"] == {"name": "swinir", "args": {"no_upsampling": True}}
    back = pretrained.config_from_official_args(args, "rim")
    assert back.encoder == "swinir" and back.swinir.to_dict() == SWINIR_DEFAULTS
    with pytest.raises(ValueError, match="ignores its arguments.*embed_dim=8"):
        pretrained.official_args(_tiny())
    with pytest.raises(ValueError, match="takes only no_upsampling"):
        pretrained.config_from_official_args(
            dict(args, encoder_spec={"name": "swinir", "args": {"no_upsampling": True,
                                                                 "embed_dim": 60}}), "rim")
    cfg = _tiny()
    cfg.swinir.depths = (0,)
    with pytest.raises(ValueError, match="swinir.depths=\\(0,\\)"):
        validate_model_config(cfg)
    cfg = _tiny()
    cfg.swinir.num_heads = (3,)
    with pytest.raises(ValueError, match="divisible"):
        validate_model_config(cfg)
    assert stored_family(_names(_tiny())) == "swinir"
    from msit_jax.inference import tiling

    assert not tiling.tileable(_tiny())  # windows over the padded image: tiles are not exact
    with pytest.raises(ValueError, match="swinir encoder attends within shifted windows"):
        tiling.receptive_radius(_tiny())


def test_hostile_swinir_sizes_are_bounded_by_the_tensors():
    """From names and shapes alone: nothing is built for a hostile config."""
    cfg = _tiny()
    tensors = _names(cfg)
    assert config_check.mismatches(cfg, tensors) == []
    for field, value, needle in [
            ("depths", (100000,), "swinir.depths[0]=100000: the tensors hold 2 block(s)"),
            ("depths", (2, 2), "swinir.depths=(2, 2): the tensors hold 1 stage(s)"),
            ("embed_dim", 10 ** 6, "swinir.embed_dim=1000000: the tensors hold width 8"),
            ("num_heads", (4,), "swinir.num_heads[0]=4: the tensors hold 2 heads"),
            ("window_size", 64, "swinir.window_size=64: the tensors hold window 4"),
            ("mlp_ratio", 1000.0, "MLP width embed_dim * mlp_ratio = 8000"),
            ("num_feat", 10 ** 6, "swinir.num_feat=1000000: the tensors hold width 8"),
            ("resi_connection", "3conv", "the tensors hold the '1conv' layout")]:
        c = cfg.copy_and_resolve_references()
        c.swinir[field] = value
        problems = config_check.mismatches(c, tensors)
        assert problems and needle in problems[0], (field, problems)
    c = cfg.copy_and_resolve_references()
    c.swinir.depths = (100000,)
    with pytest.raises(pretrained.CheckpointError, match="swinir.depths"):
        config_check.check(c, tensors, "hostile.pth")
    # another encoder's config on SwinIR tensors, and back
    assert config_check.mismatches(tiny_model_config("rcan"), tensors)[0] == (
        "encoder='rcan': the tensors hold an 'swinir' encoder")
    assert config_check.mismatches(cfg, _names(tiny_model_config("rcan")))[0] == (
        "encoder='swinir': the tensors hold an 'rcan' encoder")
    # orbax / model-folder names (Flax trees) map to the same official names
    shapes = jax.eval_shape(lambda: random_variables(cfg))
    assert set(config_check.official_names(shapes)) == set(tensors)


@pytest.mark.slow
def test_state_dict_holds_lte_buffers_and_round_trips():
    cfg = _tiny()
    v = random_variables(cfg, 1)
    sd = variables_to_state_dict(v, cfg)
    b = "encoder.layers.0.residual_group.blocks."
    assert sd[b + "0.attn.relative_position_index"].dtype == np.int64
    assert b + "0.attn_mask" not in sd and sd[b + "1.attn_mask"].shape == (144, 16, 16)
    back = state_dict_to_variables(sd, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, v),
                           back)
    bad = dict(sd, **{b + "1.attn_mask": np.zeros_like(sd[b + "1.attn_mask"])})
    with pytest.raises(pretrained.CheckpointError, match="attn_mask differs"):
        state_dict_to_variables(bad, cfg)
    bad = dict(sd, **{"encoder.extra.weight": np.zeros(1, np.float32)})
    with pytest.raises(pretrained.CheckpointError, match="unexpected keys.*encoder.extra"):
        state_dict_to_variables(bad, cfg)


# --- ONNX (msit_jax.models.swinir_onnx) ------------------------------------------------

def _onnx_session(build, input_shape=(1, 3, "h", "w")):
    """An onnxruntime session of the graph `build(g, "x") -> output name` (float32 input
    x of `input_shape`, symbolic names dynamic) written with onnx_graph's builder."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from msit_jax.export.onnx_graph import OPSET, _Builder, _GraphOps

    b = _Builder()
    out = build(_GraphOps(b), "x")
    b.nodes.append(helper.make_node("Identity", [out], ["y"]))
    graph = helper.make_graph(
        b.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c", "d"])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # as onnx_graph.build_graph: the runtime may predate newer IRs
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def test_onnx_shift_mask_is_computed_from_the_runtime_size():
    """The in-graph mask of one graph (dynamic size) equals shift_attention_mask for
    every padded size and window fed to it."""
    from msit_jax.models.swinir_onnx import _Sizes, shift_mask

    for w in (2, 4, 8):
        run = _onnx_session(lambda g, x: shift_mask(g, _Sizes(g, x, w), w, w // 2))
        for hp, wp in ((w, w), (2 * w, 3 * w), (5 * w, 2 * w)):
            got = run(np.zeros((1, 3, hp, wp), np.float32))
            want = shift_attention_mask(hp, wp, w, w // 2)[:, None]
            assert got.dtype == np.float32 and np.array_equal(got, want), (w, hp, wp)


def _random_params(enc, seed: int):
    """Random values for every parameter of `enc` (shapes by eval_shape: no init compile),
    so that biases, LayerNorm scales and the bias table all matter."""
    shapes = jax.eval_shape(lambda: enc.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    rs = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda a: rs.uniform(-0.5, 0.5, a.shape).astype(np.float32), shapes["params"])


@pytest.mark.parametrize("sizes, hws", [
    (dict(embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, num_feat=8),
     [(8, 12), (9, 7)]),
    pytest.param(dict(embed_dim=12, depths=(3, 2), num_heads=(2, 3), window_size=4, num_feat=6,
                      resi_connection="3conv", qkv_bias=False, patch_norm=False),
                 [(12, 8), (6, 11), (13, 19)], marks=pytest.mark.slow)],
    ids=["tiny", "3conv-nobias-nonorm"])
def test_onnx_encoder_graph_matches_the_flax_module(sizes, hws):
    """One graph with dynamic h, w: sizes that are and are not multiples of the window
    (reflect pad, shifted masks from the padded size, crop), features to 1e-5."""
    enc = SwinIREncoder.from_config(sizes)
    cfg = {**SWINIR_DEFAULTS, **sizes}
    params = _random_params(enc, 1)
    run = _onnx_session(lambda g, x: ENCODERS["swinir"].graph(g, x, cfg, params))
    apply = jax.jit(lambda x: enc.apply({"params": params}, x))
    for i, hw in enumerate(hws):
        x = np.random.RandomState(i).uniform(-1, 1, (1, *hw, 3)).astype(np.float32)
        got = run(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).transpose(0, 2, 3, 1)
        want = np.asarray(apply(x))
        assert got.shape == want.shape == (1, *hw, sizes["num_feat"])
        assert np.abs(got - want).max() <= 1e-5, (hw, np.abs(got - want).max())


@pytest.mark.slow
def test_onnx_graph_agrees_with_jax(tmp_path):
    """The whole folded tiny MSIT-SwinIR: onnx_runner.load vs engine.upscale, to the
    tolerance of tests/test_export.py (non-tie pixels <= 1e-4, no tie pixel off), for LR
    sizes that are (12 x 8) and are not (13 x 11, 10 x 9) multiples of the window 4 and
    scales x3, x3.5 and a non-integer, unequal pair."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from msit_jax import geometry
    from msit_jax.inference import engine
    from msit_jax.export import onnx_graph, onnx_runner
    from msit_jax.models import reparam

    cfg = _tiny()
    variables = random_variables(cfg, seed=4)
    onnx.save(onnx_graph.build_graph(*reparam.fold(cfg, variables), chunk=500, clamp=False),
              str(tmp_path / "m.onnx"))
    up = onnx_runner.load(str(tmp_path / "m.onnx"))
    n_ties = 0
    for i, (lr_hw, hw) in enumerate([((12, 8), (36, 24)), ((10, 9), (35, 31)),
                                     ((13, 11), (30, 41)), ((12, 8), (42, 28))]):
        lr = np.random.RandomState(i).rand(*lr_hw, 3).astype(np.float32)
        got = up.upscale_array(lr, hw, clamp=False)
        want = engine.upscale(cfg, variables, lr, hw, clamp=False)
        err = np.abs(got - want).max(-1)
        ties = geometry.tie_mask(hw, lr_hw)
        n_ties += ties.sum()
        assert err[~ties].max() <= 1e-4, (hw, err[~ties].max())
        assert (err[ties] > 1e-4).sum() == 0, hw
    assert n_ties > 0  # the x3.5 cases hit exact .5 ties


def _reference_msit_state_dict(cfg, seed=0):
    """An official-layout MSIT state dict: the encoder from the independent torch
    reference (LTE's names and buffers), the rest from our own mapping."""
    ref = randomize_(TorchSwinIR(**REF_SIZES, img_size=48).eval(), seed)
    enc = {"encoder." + k: v.numpy().copy() for k, v in ref.state_dict().items()}
    rest = {k: a for k, a in variables_to_state_dict(random_variables(cfg, seed + 1), cfg).items()
            if not k.startswith("encoder.")}
    return ref, enc, rest


@pytest.mark.slow
def test_official_layout_pth_loads_and_writes_back(tmp_path):
    from msit_jax.inference import engine
    from msit_jax.models.reparam import fold

    cfg = _tiny()
    ref, enc, rest = _reference_msit_state_dict(cfg)
    assert set(enc) <= set(variables_to_state_dict(random_variables(cfg), cfg))
    path = tmp_path / "epoch-best.pth"
    args = pretrained.official_args(model_config("swinir"))
    torch.save({"model": {"name": "amsit", "args": args,
                          "sd": {k: torch.from_numpy(a) for k, a in {**enc, **rest}.items()}},
                "epoch": 1}, path)
    # its args say LTE's paper size: the tiny tensors are refused before anything is built
    with pytest.raises(pretrained.CheckpointError, match="swinir.embed_dim=180"):
        pretrained.load(str(path))
    got_cfg, variables = pretrained.load(str(path), _tiny())
    x = np.random.RandomState(3).uniform(-1, 1, (1, 13, 10, 3)).astype(np.float32)
    ours = SwinIREncoder.from_config(got_cfg.swinir.to_dict()).apply(
        {"params": variables["params"]["encoder"]}, x)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-5, rtol=0)
    # written back in the same layout, buffers included: the reference loads it strictly
    sd = variables_to_state_dict(variables, got_cfg)
    assert set(sd) == set(enc) | set(rest)
    fresh = TorchSwinIR(**REF_SIZES, img_size=48)
    fresh.load_state_dict({k[len("encoder."):]: torch.from_numpy(np.asarray(a))
                           for k, a in sd.items() if k.startswith("encoder.")}, strict=True)
    for k in enc:
        np.testing.assert_array_equal(sd[k], enc[k])
    # the whole model: upscale, and RIM folding leaves the encoder untouched
    lr = np.random.RandomState(4).rand(9, 11, 3).astype(np.float32)
    out = engine.upscale(got_cfg, variables, lr, (27, 33), clamp=False)
    fcfg, fvars = fold(got_cfg, variables)
    assert fcfg.conv == "plain" and fcfg.encoder == "swinir"
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"]["encoder"],
                           jax.tree_util.tree_map(np.asarray, fvars["params"]["encoder"]))
    folded = engine.upscale(fcfg, fvars, lr, (27, 33), clamp=False)
    assert out.shape == (27, 33, 3) and np.abs(folded - out).max() <= 1e-5


@pytest.mark.slow
def test_stablehlo_export_and_onnx_cli_agree(tmp_path):
    """The export CLI writes a swinir model.onnx that onnx_runner.load runs (10 x 9 LR: not a
    multiple of the window, reflect-padded in the graph), equal to the clamped upscale
    to 1e-4."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from msit_jax.export import cli as export_cli
    from msit_jax.export import onnx_runner, stablehlo
    from msit_jax.inference import engine
    from msit_jax.io import model_dir
    from tests.conftest import run_python

    cfg = _tiny()
    variables = random_variables(cfg, seed=4)
    lr = np.random.RandomState(5).rand(10, 9, 3).astype(np.float32)
    want = engine.upscale(cfg, variables, lr, (30, 27), clamp=False)
    export_cli.export_variables(cfg, variables, str(tmp_path / "hlo"), "stablehlo", chunk=256,
                                platforms=("cpu",))
    got = stablehlo.load(str(tmp_path / "hlo")).upscale_array(lr, (30, 27), clamp=False)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    src = model_dir.save_model(str(tmp_path / "model"), cfg, variables)
    proc = run_python(["-m", "msit_jax.export", src, str(tmp_path / "onnx"), "--format", "onnx",
                       "--chunk", "256"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote onnx" in proc.stdout
    got = onnx_runner.load(str(tmp_path / "onnx")).upscale_array(lr, (30, 27))  # clamped
    assert np.abs(got - np.clip(want, 0.0, 1.0)).max() <= 1e-4


@pytest.mark.slow
def test_few_training_steps_and_bit_exact_resume(tmp_path):
    from msit_jax.training import train_and_evaluate
    from tests.conftest import assert_trees_equal, load_config

    cfg = load_config("tiny")
    cfg.model = tiny_model_config("swinir", "plain")
    cfg.model.update(dim=16, heads=2, msno_heads=2, qk_heads=1, mlp_hidden=(8,), posenc_dims=8)
    cfg.model.swinir.drop_path_rate = 0.5  # stochastic depth: the rng is the step's
    cfg.total_steps = 3
    full = train_and_evaluate(cfg, str(tmp_path / "full"))
    assert full.step == 3
    part = train_and_evaluate(cfg, str(tmp_path / "part"), stop_after_step=3)  # killed at 3
    res = train_and_evaluate(cfg, str(tmp_path / "part"))  # resumes from step 2
    assert part.step == res.step == 3
    assert_trees_equal(res.state, full.state)
    mcfg, v = pretrained.load(str(tmp_path / "full"))
    assert mcfg.encoder == "swinir" and mcfg.swinir.to_dict() == cfg.model.swinir.to_dict()


@pytest.mark.slow
def test_paper_configs_and_stage_two_init():
    """configs/msit_swinir_stage1.py / _stage2_rim.py: the paper recipe with LTE's
    SwinIR; stage-1 variables initialise the stage-2 RIM model (encoder copied)."""
    import os
    import runpy

    from msit_jax.training import stage2
    from msit_jax.training.config import validate_config
    from tests.conftest import REPO

    for suffix, conv, scale_max in (("stage1", "plain", 4.0), ("stage2_rim", "rim", 8.0)):
        c = runpy.run_path(os.path.join(REPO, "configs", f"msit_swinir_{suffix}.py"))[
            "get_config"]()
        validate_config(c)
        assert c.model.to_dict() == model_config("swinir", conv).to_dict()
        assert c.data.scale_max == scale_max
    src, dst = _tiny("plain"), _tiny("rim")
    assert stage2.architecture_mismatch(src, dst) == []
    plain = random_variables(src, 0)
    mapped = stage2.plain_to_rim(plain, random_variables(dst, 1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain["params"]["encoder"],
                           jax.tree_util.tree_map(np.asarray, mapped["params"]["encoder"]))


@pytest.mark.slow
@pytest.mark.parametrize("field, value, needle", [
    ("depths", [100000], "swinir.depths[0]=100000: the tensors hold 2 block(s)"),
    ("embed_dim", 10 ** 6, "swinir.embed_dim=1000000: the tensors hold width 8")])
def test_hostile_swinir_file_config_is_refused_before_anything_is_built(
        tmp_path, monkeypatch, field, value, needle):
    import json
    import time

    from msit_jax.export import cli as export_cli
    from msit_jax.models import model as model_module
    from tests.test_untrusted_configs import read_raw_safetensors, write_raw_safetensors

    cfg = _tiny()
    files = export_cli.export_variables(cfg, random_variables(cfg), str(tmp_path / "st"),
                                        "safetensors")
    header, body = read_raw_safetensors(next(f for f in files if f.endswith(".safetensors")))
    meta = header["__metadata__"]
    c = json.loads(meta[pretrained.META_CONFIG])
    c["swinir"][field] = value
    meta[pretrained.META_CONFIG] = json.dumps(c)
    path = write_raw_safetensors(tmp_path / "hostile.safetensors", header, body)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built / traced for an unchecked config")

    monkeypatch.setattr(model_module, "build_model", refuse)
    monkeypatch.setattr(jax, "eval_shape", refuse)
    t0 = time.monotonic()
    with pytest.raises(pretrained.CheckpointError) as e:
        pretrained.load(path)
    assert needle in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
    assert time.monotonic() - t0 < 2.0


def test_memory_estimate_counts_swinir_attention():
    """SwinIR's encoder estimate is 4 bytes x (11 C + 2 h N + N) per LR pixel (C embed_dim,
    h heads, N = window^2; see encoders._swinir_bytes_per_pixel), the larger of it and the
    64 x dim rule; every other encoder keeps the 64 x dim rule (the measured figures are in
    that function's docstring)."""
    from msit_jax.inference.budget import memory_estimate

    spec = ENCODERS["swinir"]
    paper = model_config("swinir")
    per_px = lambda c, h, w: 4.0 * (11 * c + 2 * h * w * w + w * w)
    assert spec.bytes_per_pixel(paper.swinir) == per_px(180, 6, 8) == 11248.0
    grown = paper.swinir.copy_and_resolve_references()
    grown.embed_dim = 240
    assert spec.bytes_per_pixel(grown) - per_px(180, 6, 8) == 4.0 * 11 * 60
    grown.embed_dim, grown.window_size = 180, 16
    assert spec.bytes_per_pixel(grown) == per_px(180, 6, 16)
    grown.window_size, grown.num_heads = 8, (6, 6, 6, 6, 6, 12)  # the widest stage counts
    assert spec.bytes_per_pixel(grown) == per_px(180, 12, 8)
    est = lambda cfg: memory_estimate(cfg, (100, 50), (200, 100), 1024, 0)["encoder"]
    # the paper MSIT (dim 256): its 64 x dim feature path outweighs the window-8 attention
    assert est(paper) == 5000 * 64.0 * paper.dim > 5000 * 11248.0
    wide = paper.copy_and_resolve_references()
    wide.swinir.window_size = 16  # 4 x (1980 + 3072 + 256) = 21232 > 64 x 256
    assert est(wide) == 5000 * per_px(180, 6, 16) > 5000 * 64.0 * paper.dim
    tiny = tiny_model_config("swinir")  # 64 x dim exceeds its tiny attention: the max
    assert spec.bytes_per_pixel(tiny.swinir) < 64 * tiny.dim and est(tiny) == 5000 * 64.0 * tiny.dim
    for name, other in ENCODERS.items():
        if name != "swinir":
            cfg = model_config(name)
            assert other.bytes_per_pixel is None and est(cfg) == 5000 * 64.0 * cfg.dim, name
