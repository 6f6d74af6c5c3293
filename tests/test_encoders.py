"""EDSR (full) and RCAN encoders, as the official MSIT defines them, and the encoder
registry (`msit_jax.models.encoders.ENCODERS`).

Parity is against the independent PyTorch reference (tests/torch_reference.py,
written from the EDSR and RCAN papers with the official module names). The
full-size check against the official code itself is benchmarks/encoder_parity.py
(figures in BENCHMARKS.md); the paper-size parameter counts pinned here were
counted on the official models built from the official code.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from msit_jax import model_config, tiny_model_config

from msit_jax.inference import engine
from msit_jax.io import config_check, pretrained
from msit_jax.io.torch_io import layout, state_dict_to_variables, variables_to_state_dict
from msit_jax.models import reparam
from msit_jax.models.config import ENCODERS, validate_model_config
from msit_jax.models.encoders import ENCODERS as SPECS
from msit_jax.models.encoders import encoder_sizes
from msit_jax.models.model import variable_shapes
from msit_jax.models.random_init import random_variables

NEW = ("edsr", "rcan")

# Counted on the official models (models.make of the amsit spec that
# pretrained.official_args writes for model_config(name, 'rim'), i.e. base_dim 256,
# 8 heads, r 3, MLP 4 x 256, the encoder at its official defaults):
# sum(p.numel() for p in model.encoder.parameters()) and for the whole model.
# Both include the official MeanShift layers (24 scalars, unused by the forward);
# the whole model also the LEM mask and margin, and not the RIM base kernels
# (buffers there) nor the BatchNorm statistics.
OFFICIAL_PARAMS = {"edsr": {"encoder": 38_362_392, "model": 43_240_740},
                   "rcan": {"encoder": 15_295_224, "model": 20_124_420}}


def used(cfg) -> dict:
    """The config without the sub-dicts of the encoders it does not use."""
    subs = {spec.sub_config for spec in SPECS.values()} - {SPECS[cfg.encoder].sub_config}
    return {k: v for k, v in cfg.to_dict().items() if k not in subs}


def official_names_of(cfg) -> dict:
    return {e["torch_key"]: config_check.tensor(e["torch_key"], e["torch_shape"], "float32")
            for e in layout(cfg)}


# --- registry and configs (quick) --------------------------------------------------------

def test_registry_lists_the_official_encoders_with_their_defaults():
    assert ENCODERS == tuple(SPECS) == ("edsr-baseline", "edsr", "rdn", "rcan", "swinir")
    # the official make_edsr / make_rcan defaults (models/edsr.py, models/rcan.py)
    assert model_config("edsr").edsr.to_dict() == dict(n_resblocks=32, n_feats=256,
                                                       res_scale=0.1)
    assert model_config("edsr-baseline").edsr.to_dict() == dict(n_resblocks=16, n_feats=64,
                                                                res_scale=1.0)
    assert model_config("rcan").rcan.to_dict() == dict(n_resgroups=10, n_resblocks=20,
                                                       n_feats=64, reduction=16)
    for name in ENCODERS:
        for cfg in (model_config(name), tiny_model_config(name)):
            validate_model_config(cfg)
            assert encoder_sizes(cfg) is cfg[SPECS[name].sub_config]
    # every config carries every sub-dict; the unused ones at their defaults
    assert set(model_config("rdn")) >= {"edsr", "rdn", "rcan"}
    assert model_config("edsr-baseline").rcan.to_dict() == model_config("rcan").rcan.to_dict()


@pytest.mark.parametrize("field, value, needle", [
    ("n_resgroups", 0, "rcan.n_resgroups=0 must be a positive integer"),
    ("n_resblocks", -1, "rcan.n_resblocks=-1 must be a positive integer"),
    ("reduction", 9, "rcan.reduction=9 leaves no channel-attention width"),
])
def test_rcan_config_validation(field, value, needle):
    cfg = tiny_model_config("rcan")
    cfg.rcan[field] = value
    with pytest.raises(ValueError, match=needle):
        validate_model_config(cfg)


def test_official_args_round_trip_with_non_default_sizes():
    for name, sizes in (("edsr", dict(n_resblocks=3, n_feats=16, res_scale=0.25)),
                        ("rcan", dict(n_resgroups=3, n_resblocks=2, n_feats=16, reduction=8))):
        cfg = tiny_model_config(name, "rim")
        cfg[SPECS[name].sub_config].update(sizes)
        args = pretrained.official_args(cfg)
        assert args["encoder_spec"] == {"name": name, "args": dict(no_upsampling=True, **sizes)}
        back = pretrained.config_from_official_args(args, "rim")
        assert back.encoder == name and used(back) == used(cfg)
    # absent args take the official defaults; an upsampling encoder is refused
    rcan = pretrained.config_from_official_args(
        pretrained.official_args(tiny_model_config("rcan")) | {
            "encoder_spec": {"name": "rcan", "args": {"no_upsampling": True}}}, "rim")
    assert rcan.rcan.to_dict() == model_config("rcan").rcan.to_dict()
    with pytest.raises(ValueError, match="no_upsampling=True"):
        pretrained.config_from_official_args({"encoder_spec": {"name": "edsr", "args": {}}},
                                             "rim")
    with pytest.raises(ValueError, match="encoder 'swin'.*'rcan'"):
        pretrained.config_from_official_args({"encoder_spec": {"name": "swin", "args": {}}},
                                             "rim")


def test_untrusted_rcan_and_edsr_sizes_are_bounded_by_the_tensors():
    """Hostile sizes are refused from names and shapes alone (nothing traced)."""
    rcan = tiny_model_config("rcan")
    tensors = official_names_of(rcan)
    assert config_check.mismatches(rcan, tensors) == []
    for field, value, held in [("n_resgroups", 10 ** 6, "2 residual group(s)"),
                               ("n_resblocks", 10 ** 6, "2 blocks in group 0"),
                               ("n_feats", 10 ** 6, "width 8"),
                               ("reduction", 1, "the tensors hold width 2")]:
        c = rcan.copy_and_resolve_references()
        c.rcan[field] = value
        problems = config_check.mismatches(c, tensors)
        assert problems and problems[0].startswith(f"rcan.{field}={value}"), problems
        assert held in problems[0], problems
    # an EDSR config on RCAN tensors (and back) names both
    edsr = tiny_model_config("edsr")
    assert config_check.mismatches(edsr, tensors)[0] == (
        "encoder='edsr': the tensors hold an 'rcan' encoder")
    assert config_check.mismatches(rcan, official_names_of(edsr))[0] == (
        "encoder='rcan': the tensors hold an 'edsr-baseline' / 'edsr' encoder")
    c = edsr.copy_and_resolve_references()
    c.edsr.n_resblocks = 10 ** 5
    assert config_check.mismatches(c, official_names_of(edsr))[0].startswith(
        "edsr.n_resblocks=100000: the tensors hold 1 residual block")


@pytest.mark.parametrize("name, config", [("edsr", "msit_edsr_full"), ("rcan", "msit_rcan")])
def test_paper_configs_and_stage_two_init(name, config):
    """configs/<config>_stage1.py / _stage2_rim.py: the paper recipe with the official
    encoder at its defaults; stage-1 variables initialise the stage-2 RIM model."""
    import os
    import runpy

    from msit_jax.training import stage2
    from msit_jax.training.config import validate_config
    from tests.conftest import REPO

    stages = [runpy.run_path(os.path.join(REPO, "configs", f"{config}_{suffix}.py"))[
        "get_config"]() for suffix in ("stage1", "stage2_rim")]
    for stage, (c, conv, scale_max) in enumerate(zip(stages, ("plain", "rim"), (4.0, 8.0)), 1):
        validate_config(c)
        assert c.model.to_dict() == model_config(name, conv).to_dict(), stage
        assert c.data.scale_max == scale_max
    src, dst = tiny_model_config(name, "plain"), tiny_model_config(name, "rim")
    assert stage2.architecture_mismatch(src, dst) == []
    fresh = random_variables(dst, 1)
    mapped = stage2.plain_to_rim(random_variables(src, 0), fresh)
    assert jax.tree_util.tree_structure(mapped["params"]) == \
        jax.tree_util.tree_structure(fresh["params"])


@pytest.mark.slow
def test_paper_size_parameter_counts_match_the_official_models():
    for name in NEW:
        cfg = model_config(name, "rim")
        shapes = variable_shapes(cfg)
        count = lambda tree: int(sum(np.prod(s) for s in jax.tree_util.tree_leaves(
            tree, is_leaf=lambda x: isinstance(x, tuple))))
        mean_shift = 2 * (9 + 3)
        assert count(shapes["params"]["encoder"]) + mean_shift == \
            OFFICIAL_PARAMS[name]["encoder"], name
        lem = cfg.dim * 9 + 1  # the official LEM mask and mix_margin are parameters
        assert count(shapes["params"]) + mean_shift + lem == OFFICIAL_PARAMS[name]["model"], name


# --- parity with the PyTorch reference (slow) --------------------------------------------

# PyTorch (requirements-torch.txt) is needed from here on; each test asks for it, so
# the tests above run without it.

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def sd_numpy(module) -> dict:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def reference(cfg, seed=0):
    import torch

    from tests.torch_reference import TorchMSIT, randomize_

    torch.manual_seed(seed)
    return randomize_(TorchMSIT(cfg), seed)


def torch_upscale(tm, lr, out_hw):
    import torch

    from tests.torch_reference import torch_make_coord

    tm.eval()
    with torch.no_grad():
        inp = (torch.from_numpy(lr).permute(2, 0, 1)[None] - 0.5) / 0.5
        coord = torch_make_coord(*out_hw).reshape(1, -1, 2)
        cell = torch.tensor([[2 / out_hw[0], 2 / out_hw[1]]])
        return (tm(inp, coord, cell) * 0.5 + 0.5)[0].reshape(*out_hw, 3).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_official_checkpoint_loads_and_matches_the_reference(tmp_path, name, torch):
    """An official training checkpoint (non-default sizes in its args) loads with
    pretrained.load, reproduces the reference at x3 and x4, folds, and goes back to
    the official layout so that the reference loads it strictly."""
    cfg = tiny_model_config(name, "rim")
    if name == "rcan":
        cfg.rcan.update(n_resgroups=3, n_resblocks=1)  # fewer groups / blocks than default
    tm = reference(cfg)
    path = tmp_path / "epoch-best.pth"
    torch.save({"model": {"name": "amsit", "args": pretrained.official_args(cfg),
                          "sd": tm.state_dict()}, "epoch": 2}, path)
    got_cfg, variables = pretrained.load(str(path))
    assert used(got_cfg) == used(cfg)
    fcfg, fvars = reparam.fold(got_cfg, variables)
    lr = np.random.RandomState(1).rand(9, 8, 3).astype(np.float32)
    for s in (3, 4):
        out_hw = (9 * s, 8 * s)
        ref = torch_upscale(tm, lr, out_hw)
        ours = engine.upscale(got_cfg, variables, lr, out_hw, clamp=False)
        np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
        folded = engine.upscale(fcfg, fvars, lr, out_hw, clamp=False)
        assert np.abs(folded - ours).max() <= 1e-5
    from tests.torch_reference import TorchMSIT

    back = TorchMSIT(cfg)  # the official layout, loaded strictly
    sd = {k: torch.from_numpy(v) for k, v in variables_to_state_dict(variables, got_cfg).items()}
    sd |= {k: v for k, v in back.state_dict().items() if k.endswith("num_batches_tracked")}
    back.load_state_dict(sd, strict=True)
    np.testing.assert_array_equal(torch_upscale(back, lr, (27, 24)),
                                  torch_upscale(tm, lr, (27, 24)))


@pytest.mark.slow
@pytest.mark.parametrize("name, conv", [("edsr", "plain"), ("rcan", "plain")])
def test_training_path_matches_the_reference(name, conv, torch):
    """Random continuous queries, a batch of 2, BatchNorm in train mode (statistics
    updated as torch does): the encoder's gradients' path, stage 1 layout."""
    from msit_jax import build_model, geometry

    cfg = tiny_model_config(name, conv)
    tm = reference(cfg, seed=3)
    variables = state_dict_to_variables(sd_numpy(tm), cfg)
    rs = np.random.RandomState(2)
    b, h, w, q = 2, 9, 11, 200
    inp = rs.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    coord = rs.uniform(-1, 1, (b, q, 2)).astype(np.float32)
    cell = np.array([[2 / 40, 2 / 30], [2 / 20, 2 / 25]], np.float32)
    tm.train(True)
    with torch.no_grad():
        ref = tm(torch.from_numpy(inp).permute(0, 3, 1, 2), torch.from_numpy(coord),
                 torch.from_numpy(cell)).numpy()
    g = geometry.query_geometry(coord, (h, w), cfg.radius, cell * np.array([h, w], np.float32))
    out, upd = build_model(cfg).apply(variables, inp, g, train=True, mutable=("batch_stats",))
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0)
    jax.tree_util.tree_map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5),
                           upd["batch_stats"], state_dict_to_variables(sd_numpy(tm),
                                                                       cfg)["batch_stats"])


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_exports_agree_with_upscale(tmp_path, name, torch):
    """Every export format agrees with upscale (ONNX: EDSR's res_scale as a Mul, RCAN's
    channel-attention pooling as GlobalAveragePool); .pth round-trips exactly."""
    pytest.importorskip("onnxruntime")
    import onnx

    from msit_jax.export import cli as export_cli
    from msit_jax.export import onnx_graph, onnx_runner, stablehlo

    cfg = tiny_model_config(name, "rim")
    variables = random_variables(cfg, seed=4)
    lr = np.random.RandomState(5).rand(10, 9, 3).astype(np.float32)
    want = engine.upscale(cfg, variables, lr, (30, 27), clamp=False)
    path = str(tmp_path / f"{name}.onnx")
    onnx.save(onnx_graph.build_graph(*reparam.fold(cfg, variables), chunk=256, clamp=False),
              path)
    got = onnx_runner.load(path).upscale_array(lr, (30, 27), clamp=False)
    assert np.abs(got - want).max() <= 1e-4
    export_cli.export_variables(cfg, variables, str(tmp_path / "hlo"), "stablehlo", chunk=256,
                                platforms=("cpu",))
    got = stablehlo.load(str(tmp_path / "hlo")).upscale_array(lr, (30, 27), clamp=False)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    files = export_cli.export_variables(cfg, variables, str(tmp_path / "pth"), "pth")
    got_cfg, back = pretrained.load(next(f for f in files if f.endswith(".pth")))
    assert used(got_cfg) == used(cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           jax.tree_util.tree_map(np.asarray, variables), back)
