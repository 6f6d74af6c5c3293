"""Checkpoint import: official .pth layouts, errors that name keys, convert CLI round trip."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the PyTorch reference (requirements-torch.txt)

from msit_jax.io import model_dir, pretrained
from msit_jax import tiny_model_config
from msit_jax.io.torch_io import StateDictError, variables_to_state_dict
from tests.conftest import REPO
from msit_jax.models.random_init import random_variables
from tests.torch_reference import TorchMSIT, randomize_


def official_args(cfg):
    """The `model.args` an official training checkpoint of this architecture carries."""
    if cfg.encoder == "edsr-baseline":
        enc = {"name": "edsr-baseline", "args": {"no_upsampling": True, "n_resblocks":
                                                 cfg.edsr.n_resblocks, "n_feats": cfg.edsr.n_feats}}
    else:
        enc = {"name": "rdn", "args": {"no_upsampling": True, "G0": cfg.rdn.g0, "RDNconfig": "B"}}
    return {"encoder_spec": enc, "base_dim": cfg.dim, "head": cfg.heads, "r": cfg.radius,
            "imnet_num": 1, "conv_num": 1, "is_cell": True, "local_attn": True, "use_lem": True,
            "MsC_heads": cfg.msno_heads, "MsSA_q": cfg.qk_heads,
            "pb_spec": {"name": "posenc", "args": {"posenc_type": "sinusoid",
                                                   "posenc_scale": cfg.posenc_scale,
                                                   "hidden_dims": 64, "enc_dims": cfg.posenc_dims,
                                                   "gamma": 1}},
            "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list":
                                                   list(cfg.mlp_hidden), "act": "gelu"}}}


def trees_equal(a, b):
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture
def edsr_tiny():
    """Tiny config whose RDN-free encoder the official args can describe exactly."""
    return tiny_model_config("edsr-baseline", "rim")


@pytest.mark.parametrize("conv", ["rim", "plain"])
def test_official_training_checkpoint_loads_with_args(tmp_path, conv):
    cfg = tiny_model_config("edsr-baseline", conv)
    torch.manual_seed(0)
    tm = randomize_(TorchMSIT(cfg))
    path = tmp_path / "epoch-last.pth"
    torch.save({"model": {"name": "amsit", "args": official_args(cfg), "sd": tm.state_dict()},
                "optimizer": {"name": "adam", "args": {"lr": 1e-5}}, "epoch": 3}, path)
    got_cfg, variables = pretrained.load(str(path))
    assert got_cfg.conv == conv  # layout detected from the keys
    want = cfg.to_dict()
    del want["rdn"]  # unused by an EDSR model; the official args don't carry it
    assert {k: v for k, v in got_cfg.to_dict().items() if k != "rdn"} == want
    back = variables_to_state_dict(variables, got_cfg)
    sd = tm.state_dict()
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


def test_rdn_args_map_to_presets():
    cfg = pretrained.config_from_official_args(
        official_args(tiny_model_config("rdn")) | {"encoder_spec": {
            "name": "rdn", "args": {"no_upsampling": True, "RDNconfig": "A", "G0": 32}}}, "rim")
    assert (cfg.rdn.n_blocks, cfg.rdn.n_layers, cfg.rdn.growth, cfg.rdn.g0) == (20, 6, 32, 32)


def test_bare_state_dict_needs_config(tmp_path, edsr_tiny):
    v = random_variables(edsr_tiny)
    path = tmp_path / "sd.pth"
    torch.save({k: torch.tensor(x) for k, x in variables_to_state_dict(v, edsr_tiny).items()}, path)
    with pytest.raises(ValueError, match="bare state_dict"):
        pretrained.load(str(path))
    cfg, back = pretrained.load(str(path), edsr_tiny)
    assert trees_equal(back, v)


def test_errors_name_the_keys(edsr_tiny):
    from msit_jax.io.torch_io import state_dict_to_variables

    sd = variables_to_state_dict(random_variables(edsr_tiny), edsr_tiny)
    broken = dict(sd)
    del broken["amsno.Ms_conv_2.convmap.weight"]
    broken["amsno.extra.weight"] = np.zeros(3, np.float32)
    broken["conv_ch.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(StateDictError) as e:
        state_dict_to_variables(broken, edsr_tiny)
    msg = str(e.value)
    assert "missing keys (1): amsno.Ms_conv_2.convmap.weight" in msg
    assert "unexpected keys (1): amsno.extra.weight" in msg
    assert "conv_ch.weight: checkpoint (1, 1, 1, 1)" in msg

    # a RIM checkpoint into a plain config: every RIM tensor is named
    with pytest.raises(StateDictError, match="unexpected keys.*conv_vs.0.convmap.weight"):
        state_dict_to_variables(sd, tiny_model_config("edsr-baseline", "plain"))

    # the fixed LEM mask is checked, not ignored
    bad = dict(sd)
    bad["amsno.lem.mask"] = np.roll(sd["amsno.lem.mask"], 1, axis=0)
    with pytest.raises(StateDictError, match="amsno.lem.mask"):
        state_dict_to_variables(bad, edsr_tiny)


def test_not_msit(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"name": "liif", "args": {}, "sd": {}}}, path)
    with pytest.raises(ValueError, match="not MSIT"):
        pretrained.load(str(path))
    with pytest.raises(FileNotFoundError):
        pretrained.load(str(tmp_path / "missing.pth"))


def test_convert_cli_round_trip(tmp_path, edsr_tiny):
    torch.manual_seed(1)
    tm = randomize_(TorchMSIT(edsr_tiny))
    src = tmp_path / "ckpt.pth"
    torch.save({"model": {"name": "amsit", "args": official_args(edsr_tiny), "sd": tm.state_dict()}},
               src)
    dst = tmp_path / "converted"
    r = subprocess.run([sys.executable, "-m", "msit_jax.convert", str(src), str(dst)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert model_dir.is_model_dir(str(dst))
    # timed stages on stderr (the result on stdout), no third-party log records
    for stage in ("load checkpoint", "write"):
        assert re.search(rf"^{stage} \.\.\. \d+\.\d s$", r.stderr, re.M), r.stderr
    assert "WARNING:absl" not in r.stderr and r.stdout.startswith(f"wrote {dst}")
    cfg_a, var_a = pretrained.load(str(src))
    cfg_b, var_b = pretrained.load(str(dst))
    assert cfg_a.to_dict() == cfg_b.to_dict()
    assert trees_equal(var_a, var_b)

    # refuses to overwrite, with a message and a non-zero exit
    r = subprocess.run([sys.executable, "-m", "msit_jax.convert", str(src), str(dst)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 7 and "already holds" in r.stderr  # errors.EXIT_OUTPUT


def test_convert_flags_are_absl_style(tmp_path, edsr_tiny, capsys):
    """--fold (absl boolean) stores the folded model; argparse spellings and a missing
    argument are one-line usage errors (exit 2) that name the fix."""
    from msit_jax.io import convert
    from msit_jax.models import reparam

    torch.manual_seed(2)
    src = tmp_path / "ckpt.pth"
    torch.save({"model": {"name": "amsit", "args": official_args(edsr_tiny),
                          "sd": randomize_(TorchMSIT(edsr_tiny)).state_dict()}}, src)
    dst = str(tmp_path / "folded")
    assert convert.main([str(src), dst, "--fold", "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out.startswith(f"wrote {dst}")
    want_cfg, want = reparam.fold(*pretrained.load(str(src)))
    got_cfg, got = pretrained.load(dst)
    assert got_cfg.to_dict() == want_cfg.to_dict() and got_cfg.conv == "plain"
    assert trees_equal(jax.tree_util.tree_map(np.asarray, want), got)
    for args, needle in [([str(src), dst + "2", "--no-fold"], "--nofold (or --fold)"),
                         ([str(src)], "give SRC (.pth) and DST (a new directory), got 1")]:
        assert convert.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not os.path.exists(dst + "2")


def test_model_dir_written_before_runtime_options_still_loads(tmp_path, edsr_tiny):
    """model_config.json files written before execution options left the model
    config carry precision/dtype/fft_min_kernel: they load (those fields dropped),
    and new files record only the architecture."""
    import json

    variables = random_variables(edsr_tiny)
    new_dir = model_dir.save_model(str(tmp_path / "new"), edsr_tiny, variables)
    with open(os.path.join(new_dir, model_dir.CONFIG_FILE)) as f:
        written = json.load(f)
    assert not {"precision", "dtype", "fft_min_kernel"} & set(written)
    legacy = dict(written, precision="highest", dtype="float32", fft_min_kernel=17)
    with open(os.path.join(new_dir, model_dir.CONFIG_FILE), "w") as f:
        json.dump(legacy, f)
    cfg, loaded = pretrained.load(new_dir)
    assert cfg.to_dict() == edsr_tiny.to_dict()
    assert trees_equal(jax.tree_util.tree_map(np.asarray, variables), loaded)
    legacy["nosuch"] = 1
    with open(os.path.join(new_dir, model_dir.CONFIG_FILE), "w") as f:
        json.dump(legacy, f)
    with pytest.raises(ValueError, match="nosuch"):
        pretrained.load(new_dir)
