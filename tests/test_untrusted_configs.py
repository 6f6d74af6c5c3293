"""Untrusted model configs are checked against the stored tensors before anything is built.

A model config read from a file (safetensors metadata, a model folder's
model_config.json, an official .pth's `args`) that asks for more than the file holds
(`edsr.n_resblocks=100000` hung the loader for minutes; `radius=10000`,
`mlp_hidden=(10**9,)`, `dim=10**6` asked for hundreds of GiB to TiB) fails at once
with CheckpointError (exit 5) naming the file and the field, before any Flax module
is built, any `init`/`eval_shape` traced or any array allocated for it
(`msit_jax.io.config_check`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from msit_jax import errors, tiny_model_config
from msit_jax.inference.api import Upscaler
from msit_jax.io import model_dir as mdir, pretrained
from msit_jax.io.torch_io import layout, variables_to_state_dict
from msit_jax.models import model as model_module
from tests.conftest import REPO

BUNDLED = pretrained.resolve("msit-lite")

# field -> (the edit of a model config dict, the edit of official args, the message
# needles: the field, and what the bundled weights' tensors hold instead)
HOSTILE = {
    "n_resblocks": (lambda c: c["edsr"].update(n_resblocks=100000),
                    lambda a: a["encoder_spec"]["args"].update(n_resblocks=100000),
                    ("edsr.n_resblocks=100000", "4 residual block")),
    "radius": (lambda c: c.update(radius=10000), lambda a: a.update(r=10000),
               ("radius=10000", "which is radius 1")),
    "mlp_hidden": (lambda c: c.update(mlp_hidden=[10 ** 9]),
                   lambda a: a["imnet_spec"]["args"].update(hidden_list=[10 ** 9]),
                   ("mlp_hidden=(1000000000,)", "(128, 128)")),
    "dim": (lambda c: c.update(dim=10 ** 6), lambda a: a.update(base_dim=10 ** 6),
            ("dim=1000000", "width 64")),
}
# The bounds for refusing a hostile file from the command line.
MAX_SECONDS, MAX_RSS_BYTES = 20.0, 2 ** 30


def read_raw_safetensors(path: str) -> tuple[dict, bytes]:
    """(header JSON with __metadata__, the tensor bytes) of a .safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw_safetensors(path, header: dict, body: bytes) -> str:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + body)
    return str(path)


def hostile_safetensors(dst, field: str, source: str = "config") -> str:
    """The bundled weights with `field` of their embedded config made hostile: in the
    project's config (source 'config'), or with only the official args ('args')."""
    header, body = read_raw_safetensors(BUNDLED)
    meta = header["__metadata__"]
    edit_cfg, edit_args, _ = HOSTILE[field]
    cfg, args = json.loads(meta[pretrained.META_CONFIG]), json.loads(meta[pretrained.META_ARGS])
    edit_cfg(cfg)
    edit_args(args)
    meta[pretrained.META_CONFIG], meta[pretrained.META_ARGS] = json.dumps(cfg), json.dumps(args)
    if source == "args":
        del meta[pretrained.META_CONFIG]
    return write_raw_safetensors(dst, header, body)


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if a model is built or any function traced for shapes."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built / traced for an unchecked config")

    monkeypatch.setattr(model_module, "build_model", refuse)
    monkeypatch.setattr(jax, "eval_shape", refuse)


def assert_refused(fn, path: str, *needles: str) -> str:
    t0 = time.monotonic()
    with pytest.raises(errors.CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert path in msg and all(n in msg for n in needles) and "\n" not in msg, msg
    assert errors.exit_code_for(e.value) == errors.EXIT_CHECKPOINT
    assert time.monotonic() - t0 < 2.0
    return msg


# --------------------------------------------------------------------- quick: in-process

@pytest.mark.parametrize("source", ["config", "args"])
@pytest.mark.parametrize("field", list(HOSTILE))
def test_hostile_safetensors_config_is_refused_before_anything_is_built(
        tmp_path, nothing_built, field, source):
    path = hostile_safetensors(tmp_path / f"{field}.safetensors", field, source)
    needles = HOSTILE[field][2]
    msg = assert_refused(lambda: pretrained.load(path), path, *needles)
    assert "the tensors do not match" in msg
    assert_refused(lambda: Upscaler.from_pretrained(path), path, *needles)
    import msit_jax.pretrained  # the README's public name

    assert_refused(lambda: msit_jax.pretrained.load(path), path, *needles)
    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copy(path, hub / pretrained.SAFETENSORS_FILE)  # a model-hub folder
    assert_refused(lambda: pretrained.load(str(hub)), str(hub), *needles)


def test_stored_sizes_bound_every_size_field():
    """Each field that sets a variable's count or size is compared with the tensors."""
    from msit_jax.io import config_check

    header = pretrained.read_safetensors_header(BUNDLED)
    tensors = pretrained.safetensors_tensors(header)
    cfg = mdir.config_from_json(header.metadata[pretrained.META_CONFIG])
    assert config_check.mismatches(cfg, tensors) == []
    cases = {"edsr.n_feats": ("edsr", "n_feats", 64), "edsr.res_scale": None,
             "heads": (None, "heads", 8), "posenc_dims": (None, "posenc_dims", 32),
             "msno_heads": (None, "msno_heads", 8), "qk_heads": (None, "qk_heads", 4),
             "use_cell": (None, "use_cell", False), "conv": (None, "conv", "rim"),
             "batch_norm": (None, "batch_norm", False), "encoder": (None, "encoder", "rdn"),
             "mlp_hidden": (None, "mlp_hidden", (128, 128, 128)), "radius": (None, "radius", 2),
             "edsr.n_resblocks": ("edsr", "n_resblocks", 3)}
    for field, edit in cases.items():
        c = cfg.copy_and_resolve_references()
        if edit is None:  # not a size: any value passes
            c.edsr.res_scale = 0.5
            assert config_check.mismatches(c, tensors) == []
            continue
        sub, k, v = edit
        (c[sub] if sub else c)[k] = v
        problems = config_check.mismatches(c, tensors)
        assert problems and problems[0].startswith(f"{field}="), (field, problems)
    # a stored tensor missing: the field it sizes is refused, not assumed
    missing = {k: t for k, t in tensors.items() if k != "conv_ch.weight"}
    assert any(p.startswith("dim=64: the tensors hold no conv_ch.weight")
               for p in config_check.mismatches(cfg, missing))


def test_weights_must_be_floating_point(tmp_path):
    header, body = read_raw_safetensors(BUNDLED)
    header["conv_ch.weight"]["dtype"] = "I32"  # same size: the file is well formed
    path = write_raw_safetensors(tmp_path / "ints.safetensors", header, body)
    assert_refused(lambda: pretrained.load(path), path, "conv_ch.weight (64, 32, 1, 1) has "
                   "dtype int, expected a floating-point tensor")


def test_a_malformed_safetensors_header_is_a_checkpoint_error(tmp_path):
    """A shape the data cannot hold is refused from the header, before any read."""
    header, body = read_raw_safetensors(BUNDLED)
    header["conv_ch.weight"]["shape"] = [10 ** 12, 32, 1, 1]
    path = write_raw_safetensors(tmp_path / "huge.safetensors", header, body)
    assert_refused(lambda: pretrained.load(path), path, "do not hold F32 [1000000000000, 32")


def test_empty_tensors_bound_nothing(tmp_path, nothing_built):
    """A (10**9, 0, 1, 1) conv_ch.weight holds no bytes: its width cannot vouch for
    dim=10**9 (the LEM mask alone would be 36 GB)."""
    sd, meta = pretrained.read_safetensors(BUNDLED)
    cfg = json.loads(meta[pretrained.META_CONFIG])
    cfg["dim"] = 10 ** 9
    meta[pretrained.META_CONFIG] = json.dumps(cfg)
    sd["conv_ch.weight"] = np.zeros((10 ** 9, 0, 1, 1), np.float32)
    header, chunks, pos = {"__metadata__": meta}, [], 0
    for k, a in sd.items():
        b = np.ascontiguousarray(a).tobytes()
        code = {"float32": "F32", "int64": "I64"}[str(a.dtype)]
        header[k] = {"dtype": code, "shape": list(a.shape), "data_offsets": [pos, pos + len(b)]}
        chunks.append(b)
        pos += len(b)
    path = write_raw_safetensors(tmp_path / "empty.safetensors", header, b"".join(chunks))
    assert_refused(lambda: pretrained.load(path), path,
                   "conv_ch.weight (1000000000, 0, 1, 1) is empty")


# --------------------------------------------------------------------- slow: files, CLIs

@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    """{(kind, field): path} for kind in safetensors / dir / pth, and the valid dir and pth."""
    root = tmp_path_factory.mktemp("hostile")
    cfg, variables = pretrained.load(BUNDLED)
    files = {}
    for field in HOSTILE:
        files["safetensors", field] = hostile_safetensors(root / f"{field}.safetensors", field)
    good = mdir.save_model(str(root / "dir_ok"), cfg, variables)
    files["dir", None] = good
    for field, (edit_cfg, _, _) in HOSTILE.items():
        d = str(root / f"dir_{field}")
        shutil.copytree(good, d)
        c = json.loads(mdir.config_to_json(cfg))
        edit_cfg(c)
        with open(os.path.join(d, mdir.CONFIG_FILE), "w") as f:
            json.dump(c, f)
        files["dir", field] = d
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in
          variables_to_state_dict(variables, cfg).items()}
    args = pretrained.official_args(cfg)
    files["pth", None] = str(root / "ok.pth")
    torch.save({"model": {"name": "amsit", "args": args, "sd": sd}}, files["pth", None])
    for field, (_, edit_args, _) in HOSTILE.items():
        a = json.loads(json.dumps(args))
        edit_args(a)
        files["pth", field] = str(root / f"{field}.pth")
        torch.save({"model": {"name": "amsit", "args": a, "sd": sd}}, files["pth", field])
    img = root / "in.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (10, 10, 3), np.uint8)).save(img)
    files["image", None] = str(img)
    return files


# Runs the command in the child and, at exit, writes the child's own peak RSS (VmHWM:
# per address space, reset by exec; ru_maxrss is not: Linux carries the forked pytest
# image's high-water mark across exec, gigabytes late in a full run).
_MEASURED = """
import atexit, os, runpy, sys

def _peak():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["MSIT_TEST_PEAK_FILE"], "w") as f:
        f.write(kib)

atexit.register(_peak)
if sys.argv[1] == "-m":
    sys.argv = [sys.argv[2]] + sys.argv[3:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_measured(args: list[str], timeout: float = 30.0) -> tuple[int, float, int, str]:
    """(exit code, seconds, peak RSS in bytes, stderr) of `python ARGS` in a child
    process, killed after `timeout` s; the RSS is the child's own VmHWM."""
    tag = "%d-%d" % (os.getpid(), time.monotonic_ns())
    err_path = os.path.join(tempfile.gettempdir(), f"msit-untrusted-stderr-{tag}.txt")
    peak_path = os.path.join(tempfile.gettempdir(), f"msit-untrusted-peak-{tag}.txt")
    env = dict(os.environ, MSIT_TEST_PEAK_FILE=peak_path)
    t0 = time.monotonic()
    with open(err_path, "w+") as err:
        p = subprocess.Popen([sys.executable, "-c", _MEASURED] + args, cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            p.wait()
        finally:
            timer.cancel()
        seconds = time.monotonic() - t0
        err.seek(0)
        stderr = err.read()
    os.remove(err_path)
    try:
        with open(peak_path) as f:
            rss = int(f.read()) * 1024
        os.remove(peak_path)
    except FileNotFoundError:
        rss = -1  # killed before exiting normally: the rc check reports it
    return p.returncode, seconds, rss, stderr


def assert_cli_refused(args: list[str], path: str, needles: tuple[str, ...]) -> None:
    rc, seconds, rss, stderr = run_measured(args)
    assert rc == errors.EXIT_CHECKPOINT, (rc, seconds, stderr[-2000:])
    assert seconds < MAX_SECONDS and 0 < rss < MAX_RSS_BYTES, (seconds, rss)
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and path in lines[0] and all(n in lines[0] for n in needles), \
        stderr[-2000:]


# Each child costs 3-10 s (most of it imports, torch's for a .pth): every field for
# safetensors, the hang for the others; test_hostile_model_dir_and_pth_refused_in_process
# has every field of those in-process.
CLI_CASES = [("safetensors", f) for f in HOSTILE] + [("dir", "n_resblocks"),
                                                     ("pth", "n_resblocks")]


@pytest.mark.slow
@pytest.mark.parametrize("kind, field", CLI_CASES, ids=[f"{k}-{f}" for k, f in CLI_CASES])
def test_upscale_cli_refuses_hostile_configs_fast_in_bounded_memory(
        hostile_files, tmp_path, kind, field):
    path = hostile_files[kind, field]
    assert_cli_refused(["-m", "msit_jax.inference", hostile_files["image", None], "--checkpoint",
                        path, "--scale", "2", "-o", str(tmp_path / "out.png"), "--noprogress"],
                       path, HOSTILE[field][2])
    assert not os.path.exists(tmp_path / "out.png")


@pytest.mark.slow
def test_evaluate_cli_refuses_a_hostile_config(hostile_files, tmp_path):
    data = tmp_path / "Mini"
    data.mkdir()
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(data / "a.png")
    path = hostile_files["safetensors", "n_resblocks"]
    assert_cli_refused(["evaluate.py", "--checkpoint", path, "--data", str(data),
                        "--scales", "2", "--json", str(tmp_path / "r.json")],
                       path, HOSTILE["n_resblocks"][2])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dir", "pth"])
def test_hostile_model_dir_and_pth_refused_in_process(hostile_files, kind, monkeypatch):
    pytest.importorskip("torch")
    cfg, _ = pretrained.load(hostile_files[kind, None])  # the valid one still loads
    assert cfg.edsr.n_resblocks == 4
    with monkeypatch.context() as m:
        m.setattr(model_module, "build_model", lambda *a, **k: pytest.fail("model built"))
        m.setattr(jax, "eval_shape", lambda *a, **k: pytest.fail("shapes traced"))
        for field in HOSTILE:
            path = hostile_files[kind, field]
            assert_refused(lambda: pretrained.load(path), path, *HOSTILE[field][2])
            assert_refused(lambda: Upscaler.from_pretrained(path), path, *HOSTILE[field][2])


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["edsr-baseline", "rdn"])
def test_real_layouts_pass_the_check_and_rdn_fields_are_bounded(encoder):
    """Every layout the models have passes, in both namings (official tensors and
    Flax variables, as a model folder's metadata names them)."""
    from msit_jax.io import config_check
    from msit_jax.models.model import variable_shapes

    for conv in ("rim", "plain"):
        for batch_norm, use_cell in ((True, True), (False, False)):
            cfg = tiny_model_config(encoder, conv)
            cfg.batch_norm, cfg.use_cell = batch_norm, use_cell
            shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, np.float32),
                                            variable_shapes(cfg),
                                            is_leaf=lambda x: isinstance(x, tuple))
            assert config_check.mismatches(cfg, config_check.official_names(shapes)) == []
            official = {e["torch_key"]: config_check.tensor(e["torch_key"], e["torch_shape"],
                                                            "float32") for e in layout(cfg)}
            assert config_check.mismatches(cfg, official) == [], (conv, batch_norm)
    if encoder == "rdn":
        for k, v in dict(g0=16, kernel_size=5, n_blocks=100000, n_layers=3, growth=4).items():
            c = cfg.copy_and_resolve_references()
            c.rdn[k] = v
            problems = config_check.mismatches(c, official)
            assert problems and problems[0].startswith(f"rdn.{k}={v}"), (k, problems)
