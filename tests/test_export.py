"""Exports: StableHLO, ONNX, official .pth and safetensors round trips on tiny models.

Tolerances (float32 image space, the raw unclamped prediction):
  stablehlo    <= 1e-5 on every pixel (same programs, same host geometry)
  onnx         <= 1e-4 on pixels without an exact .5 tie; tie pixels: none may differ
               (the graph's geometry rounds op by op as the reference)
  pth          exact tensors; the torch reference's forward equals ours to 1e-5
  safetensors  exact tensors (loaded with PyTorch blocked)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the PyTorch reference (requirements-torch.txt)
# requirements-export.txt: the ONNX graph and its runtime, safetensors weights
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

from msit_jax import geometry, tiny_model_config

from msit_jax.inference import engine

from msit_jax.export import cli as export_cli
from msit_jax.export import onnx_graph, onnx_runner, stablehlo
from msit_jax.io import pretrained
from msit_jax.models import reparam
from msit_jax.export.cli import ExportError
from tests.conftest import REPO
from msit_jax.models.random_init import random_variables
from tests.test_convert import official_args, trees_equal
from tests.torch_reference import TorchMSIT, randomize_, torch_make_coord

# (LR size, output size): x3.5 with exact ties, anisotropic non-integer, integer x4,
# downscaling (LR centres without queries); every one leaves the last chunk padded.
CASES = [((24, 20), (84, 70)), ((13, 11), (30, 41)), ((12, 10), (48, 40)), ((9, 7), (5, 4))]
CHUNK = 500


def lr_image(hw, seed=0):
    return np.random.RandomState(seed).rand(*hw, 3).astype(np.float32)


def official_checkpoint(path, cfg, seed=0):
    """An official training checkpoint of the independent torch reference."""
    torch.manual_seed(seed)
    tm = randomize_(TorchMSIT(cfg), seed)
    torch.save({"model": {"name": "amsit", "args": official_args(cfg), "sd": tm.state_dict()},
                "epoch": 1}, path)
    return tm


def run_blocked(code: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing any of `blocked` fails."""
    guard = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked for this test: {{name}}")
        sys.meta_path.insert(0, Block())
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_model_config("edsr-baseline", "rim")
    return cfg, random_variables(cfg, seed=3)


# --- StableHLO -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stablehlo_dir(tmp_path_factory, model):
    out = str(tmp_path_factory.mktemp("exports") / "stablehlo")
    export_cli.export_variables(*model, out, "stablehlo", chunk=CHUNK)
    return out


def test_stablehlo_matches_upscale_on_every_platform_export(stablehlo_dir, model):
    cfg, v = model
    up = stablehlo.load(stablehlo_dir)
    # one file lowered for every backend; it runs here on CPU
    assert up.platforms == ("cpu", "cuda", "tpu") and up.chunk == CHUNK
    assert up.decoder.platforms == ("cpu", "cuda", "tpu")
    for i, (lr_hw, hw) in enumerate(CASES):
        lr = lr_image(lr_hw, i)
        got = up.upscale_array(lr, hw, clamp=False)
        want = engine.upscale(cfg, v, lr, hw, clamp=False)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=str(hw))
    # symbolic LR size: the encoder program is one for every input size
    assert "h" in str(up.encoder.in_avals[0].shape[1])


def test_stablehlo_runner_needs_no_model_code(stablehlo_dir, model, tmp_path):
    """The runner upscales from the artifacts alone: Flax and the model modules are
    blocked from importing, and the result equals the model's."""
    cfg, v = model
    lr = lr_image((24, 20))
    np.save(tmp_path / "lr.npy", lr)
    r = run_blocked(f"""
        import numpy as np
        from msit_jax.export import stablehlo
        up = stablehlo.load({stablehlo_dir!r})
        lr = np.load({str(tmp_path / 'lr.npy')!r})
        np.save({str(tmp_path / 'sr.npy')!r}, up(lr, size=(84, 70), clamp=False))
        import sys
        assert not [m for m in sys.modules if m.startswith("flax")]
        print("ok")
    """, ("flax", "torch", "ml_collections", "msit_jax.models.model", "msit_jax.models.decoder",
          "msit_jax.models.encoders", "msit_jax.models.msno", "msit_jax.models.layers",
          "msit_jax.inference.engine", "msit_jax.models.grid_decoder", "msit_jax.io.pretrained",
          "msit_jax.models.config"))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    want = engine.upscale(cfg, v, lr, (84, 70), clamp=False)
    np.testing.assert_allclose(np.load(tmp_path / "sr.npy"), want, atol=1e-5, rtol=0)


@pytest.mark.slow  # quick tier under 90 s
def test_stablehlo_unfolded_export(tmp_path, model):
    cfg, v = model
    out = str(tmp_path / "unfolded")
    export_cli.export_variables(cfg, v, out, "stablehlo", fold=False, chunk=256,
                                platforms=("cpu",))
    meta = stablehlo.read_meta(out)
    assert meta["layout"] == "rim (stage 2)" and meta["platforms"] == ["cpu"]
    lr = lr_image((10, 9), 5)
    np.testing.assert_allclose(stablehlo.load(out).upscale_array(lr, (25, 31), clamp=False),
                               engine.upscale(cfg, v, lr, (25, 31), clamp=False),
                               atol=1e-5, rtol=0)


# --- ONNX --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("edsr-baseline", "query"), ("edsr-baseline", "grid"),
                                        ("rdn", "auto")], ids=lambda p: "-".join(p))
def onnx_model(request, tmp_path_factory):
    encoder, decoder = request.param
    cfg = tiny_model_config(encoder, "rim")
    v = random_variables(cfg, seed=4)
    fcfg, fv = reparam.fold(cfg, v)
    import onnx

    path = str(tmp_path_factory.mktemp("onnx") / f"{encoder}-{decoder}.onnx")
    onnx.save(onnx_graph.build_graph(fcfg, fv, chunk=CHUNK, clamp=False, decoder=decoder),
              path)
    return cfg, v, path


@pytest.mark.slow  # quick tier under 90 s
def test_onnx_agrees_with_jax(onnx_model):
    """Non-tie pixels to 1e-4 (measured ~1e-6); exact-tie pixels all agree."""
    cfg, v, path = onnx_model
    up = onnx_runner.load(path)
    n_ties = 0
    for i, (lr_hw, hw) in enumerate(CASES):
        lr = lr_image(lr_hw, i)
        got = up.upscale_array(lr, hw, clamp=False)
        want = engine.upscale(cfg, v, lr, hw, clamp=False)
        err = np.abs(got - want).max(-1)
        ties = geometry.tie_mask(hw, lr_hw)
        n_ties += ties.sum()
        assert err[~ties].max() <= 1e-4, (hw, err[~ties].max())
        assert (err[ties] > 1e-4).sum() == 0, (hw, (err[ties] > 1e-4).mean())
    assert n_ties > 1000  # the x3.5 case really has ties


def test_onnx_graph_interface(tmp_path, model):
    import onnx

    cfg, v = model
    files = export_cli.export_variables(cfg, v, str(tmp_path / "o"), "onnx", chunk=CHUNK)
    m = onnx.load(files[0])
    assert [o.version for o in m.opset_import if o.domain == ""] == [onnx_graph.OPSET]
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    assert [(i.name, dims(i)) for i in m.graph.input] == [
        ("lr", [1, 3, "height", "width"]), ("out_size", [2])]
    assert [(o.name, dims(o)) for o in m.graph.output] == [
        ("sr", [1, 3, "out_height", "out_width"])]
    # 'auto': an If picks the grid or the per-query decoder (each a Loop over chunks)
    (node,) = [n for n in m.graph.node if n.op_type == "If"]
    assert [[n.op_type for n in a.g.node].count("Loop") for a in node.attribute] == [1, 1]
    # raw onnxruntime call, NCHW in [0, 1] -> clamped NCHW
    import onnxruntime as ort

    lr = lr_image((13, 11), 1)
    sess = ort.InferenceSession(files[0], providers=["CPUExecutionProvider"])
    (sr,) = sess.run(None, {"lr": lr.transpose(2, 0, 1)[None].copy(),
                            "out_size": np.array([30, 41], np.int64)})
    want = engine.upscale(*reparam.fold(cfg, v), lr, (30, 41))
    assert sr.shape == (1, 3, 30, 41) and sr.min() >= 0 and sr.max() <= 1
    np.testing.assert_allclose(sr[0].transpose(1, 2, 0), want, atol=1e-4, rtol=0)
    # the one-call runner: uint8 in, uint8 out
    up = onnx_runner.load(str(tmp_path / "o"))
    u8 = up((lr * 255).round().astype(np.uint8), scale=2)
    assert u8.dtype == np.uint8 and u8.shape == (26, 22, 3)


# The graph builder and everything it stands on: the ONNX runner must load none of it
# (not even JAX: numpy and onnxruntime are a whole deployment).
BUILDER_MODULES = ("jax", "jaxlib", "flax", "torch", "ml_collections", "onnx", "msit_jax.models",
                   "msit_jax.export.onnx_graph", "msit_jax.export.cli",
                   "msit_jax.export.stablehlo", "msit_jax.inference.engine",
                   "msit_jax.io.pretrained")


@pytest.mark.slow  # a subprocess
def test_onnx_runner_needs_no_builder_or_model_code(tmp_path, model):
    """An exported graph runs through `msit_jax.export.load_onnx` (the package's lazy
    face, = onnx_runner.load) in an interpreter where the builder, `onnx`, JAX, Flax and
    every model module are blocked from importing; the result equals the in-process
    runner's and the folded model's."""
    cfg, v = model
    export_cli.export_variables(cfg, v, str(tmp_path / "o"), "onnx", chunk=CHUNK)
    lr = lr_image((13, 11), 1)
    np.save(tmp_path / "lr.npy", lr)
    r = run_blocked(f"""
        import sys
        import numpy as np
        import msit_jax.export
        from msit_jax.export import onnx_runner
        assert msit_jax.export.load_onnx is onnx_runner.load
        up = msit_jax.export.load_onnx({str(tmp_path / 'o')!r})
        lr = np.load({str(tmp_path / 'lr.npy')!r})
        np.save({str(tmp_path / 'sr.npy')!r}, up.upscale_array(lr, (30, 41)))
        blocked = {BUILDER_MODULES!r}
        loaded = [m for m in sys.modules if any(m == b or m.startswith(b + ".")
                                                for b in blocked)]
        assert not loaded, loaded
        print("ok")
    """, BUILDER_MODULES)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    got = np.load(tmp_path / "sr.npy")
    np.testing.assert_array_equal(
        got, onnx_runner.load(str(tmp_path / "o")).upscale_array(lr, (30, 41)))
    np.testing.assert_allclose(got, engine.upscale(*reparam.fold(cfg, v), lr, (30, 41)),
                               atol=1e-4, rtol=0)


# --- pth ---------------------------------------------------------------------------------

@pytest.mark.parametrize("conv", ["rim", "plain"])
def test_pth_round_trip_official_to_official(tmp_path, conv):
    """official .pth -> msit-jax -> official .pth: the same tensors, loadable strictly
    into the (independent) torch model, whose forward equals msit-jax's upscale."""
    cfg = tiny_model_config("edsr-baseline", conv)
    src = tmp_path / "official.pth"
    tm = official_checkpoint(src, cfg)
    files = export_cli.export(str(src), str(tmp_path / "out"), "pth")
    ckpt = torch.load(files[0], map_location="cpu", weights_only=True)
    spec = ckpt["model"]
    assert spec["name"] == "amsit" and spec["args"] == pretrained.official_args(cfg)
    orig = tm.state_dict()
    assert set(spec["sd"]) == set(orig)
    for k, t in orig.items():
        assert torch.equal(spec["sd"][k], t), k

    back = TorchMSIT(cfg)
    back.load_state_dict(spec["sd"], strict=True)
    back.eval()
    lr = lr_image((24, 20))
    hw = (84, 70)
    inp = (torch.from_numpy(lr).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        ref = back(inp, torch_make_coord(*hw).reshape(1, -1, 2),
                   torch.tensor([[2 / hw[0], 2 / hw[1]]]))
    ref = (ref * 0.5 + 0.5)[0].reshape(*hw, 3).numpy()
    ours = engine.upscale(*pretrained.load(str(src)), lr, hw, clamp=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # and the export reads back into msit-jax unchanged
    assert trees_equal(pretrained.load(files[0])[1], pretrained.load(str(src))[1])


def test_pth_refuses_what_it_cannot_express(tmp_path, model):
    cfg, v = model
    with pytest.raises(ExportError, match="pth cannot express a folded model"):
        export_cli.export_variables(cfg, v, str(tmp_path / "a"), "pth", fold=True)
    fcfg, fv = reparam.fold(cfg, v)
    with pytest.raises(ExportError, match="pth cannot express a folded model"):
        export_cli.export_variables(fcfg, fv, str(tmp_path / "b"), "pth")
    rdn = tiny_model_config("rdn")  # 2 blocks x 2 layers: no official RDNconfig preset
    with pytest.raises(ExportError, match=r"RDN blocks/layers/growth \(2, 2, 8\) match no "
                                          "RDNconfig preset"):
        export_cli.export_variables(rdn, random_variables(rdn), str(tmp_path / "c"), "pth")
    assert not os.listdir(tmp_path)  # nothing half-written


def test_official_args_invert_config_from_official_args():
    for enc in ("edsr-baseline", "rdn"):
        for conv in ("rim", "plain"):
            cfg = tiny_model_config(enc, conv)
            if enc == "rdn":
                cfg.rdn.update(n_blocks=20, n_layers=6, growth=32)  # preset 'A'
            back = pretrained.config_from_official_args(pretrained.official_args(cfg), conv)
            unused = "rdn" if enc == "edsr-baseline" else "edsr"
            a, b = cfg.to_dict(), back.to_dict()
            del a[unused], b[unused]
            assert a == b


# --- safetensors -------------------------------------------------------------------------

def test_safetensors_hub_folder_loads_without_torch(tmp_path):
    cfg = tiny_model_config("edsr-baseline", "rim")
    src = tmp_path / "official.pth"
    official_checkpoint(src, cfg, seed=2)
    out = tmp_path / "hub"
    files = export_cli.export(str(src), str(out), "safetensors")
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    sd, meta = pretrained.read_safetensors(files[0])
    official = torch.load(src, weights_only=True)["model"]["sd"]
    assert set(sd) == set(official)  # the official parameter names
    for k, t in official.items():
        np.testing.assert_array_equal(sd[k], t.numpy(), err_msg=k)
    with open(out / "config.json") as f:
        assert json.load(f) == json.loads(meta[pretrained.META_CONFIG])
    assert json.loads(meta[pretrained.META_ARGS]) == pretrained.official_args(cfg)
    assert "Upscaler.from_pretrained" in (out / "README.md").read_text()

    lr = lr_image((13, 11))
    np.save(tmp_path / "lr.npy", lr)
    r = run_blocked(f"""
        import numpy as np
        from msit_jax.inference import engine
        from msit_jax.io import pretrained
        lr = np.load({str(tmp_path / 'lr.npy')!r})
        for i, path in enumerate([{str(out)!r}, {files[0]!r}]):
            cfg, v = pretrained.load(path)
            np.save({str(tmp_path)!r} + f"/sr{{i}}.npy",
                    engine.upscale(cfg, v, lr, (30, 41), clamp=False))
        import sys
        assert "torch" not in sys.modules
        print("ok")
    """, ("torch",))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    want = engine.upscale(*pretrained.load(str(src)), lr, (30, 41), clamp=False)
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"sr{i}.npy"), want)


def test_safetensors_folded(tmp_path, model):
    cfg, v = model
    export_cli.export_variables(cfg, v, str(tmp_path / "f"), "safetensors", fold=True)
    fcfg, fv = pretrained.load(str(tmp_path / "f"))
    assert (fcfg.conv, fcfg.batch_norm) == ("plain", False)
    assert trees_equal(fv, reparam.fold(cfg, v)[1])
    _, meta = pretrained.read_safetensors(str(tmp_path / "f" / "model.safetensors"))
    assert meta["msit.layout"] == "folded" and pretrained.META_ARGS not in meta


# --- CLI and errors ----------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "msit_jax.export", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def test_cli_and_its_errors(tmp_path):
    cfg = tiny_model_config()
    src = tmp_path / "official.pth"
    official_checkpoint(src, cfg)
    r = cli(src, tmp_path / "x", "--format", "tflite")
    assert r.returncode == 2 and "unknown format 'tflite'" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    r = cli(src, tmp_path / "full", "--format", "onnx")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    r = cli(src, tmp_path / "p", "--format", "pth", "--fold")
    assert r.returncode == 1 and "pth cannot express a folded model" in r.stderr
    r = cli(src, tmp_path / "o", "--format", "onnx", "--nofold")
    assert r.returncode == 1 and "onnx exports the folded model only" in r.stderr
    r = cli(tmp_path / "missing.pth", tmp_path / "m", "--format", "pth")
    assert r.returncode == 1 and "no checkpoint at" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["full", "official.pth"]

    (tmp_path / "empty").mkdir()  # an empty directory is a fine target
    r = cli(src, tmp_path / "empty", "--format", "onnx", "--chunk", "300")
    assert r.returncode == 0, r.stderr
    assert "wrote onnx" in r.stdout and os.listdir(tmp_path / "empty") == ["model.onnx"]


def test_cli_flags_are_absl_style(tmp_path, capsys):
    """--fold / --nofold are absl booleans: argparse's --no-fold and a missing SRC/OUT or
    --format are one-line usage errors (exit 2) naming the fix; --help shows the flags."""
    src = str(tmp_path / "official.pth")
    for args, needle in [([src, str(tmp_path / "o"), "--format", "pth", "--no-fold"],
                          "--no-fold is argparse style; this command takes absl flags: "
                          "--nofold (or --fold)"),
                         ([src, "--format", "pth"], "give SRC (the weights) and OUT"),
                         ([src, str(tmp_path / "o")], "give --format: one of stablehlo")]:
        assert export_cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert export_cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: python -m msit_jax.export SRC OUT --format FORMAT")
    assert "--[no]fold: Export the folded model" in out and "--format: One of stablehlo" in out
    assert not os.listdir(tmp_path)


def test_export_api_errors(tmp_path, model):
    cfg, v = model
    with pytest.raises(ExportError, match="unknown format 'tflite'"):
        export_cli.export_variables(cfg, v, str(tmp_path / "a"), "tflite")
    with pytest.raises(ExportError, match=r"unknown platform\(s\) \['nosuchchip'\]"):
        export_cli.export_variables(cfg, v, str(tmp_path / "b"), "stablehlo",
                                    platforms=("cpu", "nosuchchip"))
    assert not os.listdir(tmp_path)
