"""Tampered, truncated and interrupted export artifacts: one typed error each.

The StableHLO checks run on stand-in programs with the export's interface (tiny
jax.export functions, milliseconds to lower): `msit_jax.export.stablehlo.load` checks the
files and export.json against the programs' own shapes before anything runs, so a
real model is not needed. The ONNX checks run on a one-node graph with the graph
interface. The slow tests start processes: peak memory with "chunk": 1e9, and
SIGKILL in the middle of `python -m msit_jax.export` / `python -m msit_jax.convert`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

from msit_jax import errors

from msit_jax.export import stablehlo
from msit_jax.errors import CheckpointError, InputError
from msit_jax.inference.frontend import ArtifactError
from tests.conftest import REPO

CHUNK, RADIUS, DIM = 8, 1, 4


def fake_stablehlo(folder: str, chunk: int = CHUNK, radius: int = RADIUS, dim: int = DIM) -> str:
    """A StableHLO export folder whose programs have the real interface (module doc of
    msit_jax.export.stablehlo) but compute nothing of interest."""
    os.makedirs(folder, exist_ok=True)
    h, w = jax_export.symbolic_shape("h, w")
    spec, f32, k = jax.ShapeDtypeStruct, jnp.float32, 2 * radius + 1
    enc = jax_export.export(jax.jit(lambda inp: (jnp.repeat(inp[..., :1], dim, -1),) * 2),
                            platforms=("cpu",))(spec((1, h, w, 3), f32))
    dec = jax_export.export(
        jax.jit(lambda fq, fv, inp, coord, key_idx, rel, rc:
                jnp.repeat(coord[..., :1], 3, -1) + fq.mean()),
        platforms=("cpu",))(spec((1, h, w, dim), f32), spec((1, h, w, dim), f32),
                            spec((1, h, w, 3), f32), spec((1, chunk, 2), f32),
                            spec((1, chunk, 2, k), jnp.int32), spec((1, chunk, 2, k), f32),
                            spec((1, 2), f32))
    files = {}
    for name, prog in ((stablehlo.ENCODER_FILE, enc), (stablehlo.DECODER_FILE, dec)):
        data = prog.serialize()
        files[name] = stablehlo.file_record(data)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    with open(os.path.join(folder, stablehlo.META_FILE), "w") as f:
        json.dump({"format": stablehlo.FORMAT, "version": stablehlo.VERSION, "platforms": ["cpu"],
                   "chunk": chunk, "radius": radius, "dim": dim, "files": files}, f)
    return folder


@pytest.fixture(scope="module")
def good_export(tmp_path_factory):
    return fake_stablehlo(str(tmp_path_factory.mktemp("exports") / "stablehlo"))


@pytest.fixture
def export_copy(good_export, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(good_export, out)
    return out


def edit_meta(folder: str, **fields) -> None:
    """Set (or with None, remove) export.json fields."""
    path = os.path.join(folder, stablehlo.META_FILE)
    with open(path) as f:
        meta = json.load(f)
    for k, v in fields.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    with open(path, "w") as f:
        json.dump(meta, f)


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "rb") as f:
        data = f.read()
    write(path, data[:int(len(data) * keep)])


def refused(folder: str, file: str, *needles: str) -> ArtifactError:
    """stablehlo.load(folder) raises one ArtifactError (exit code 5) naming `file`."""
    with pytest.raises(ArtifactError) as info:
        stablehlo.load(folder)
    e = info.value
    msg = str(e)
    assert isinstance(e, CheckpointError) and errors.exit_code_for(e) == errors.EXIT_CHECKPOINT
    assert os.path.join(folder, file) in msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return e


def test_good_export_loads(good_export):
    up = stablehlo.load(good_export)
    assert (up.chunk, up.radius, up.platforms) == (CHUNK, RADIUS, ("cpu",))


@pytest.mark.parametrize("fields, needles", [
    ({"chunk": 0}, ["field 'chunk' is 0", "integer >= 1"]),
    ({"chunk": -3}, ["field 'chunk' is -3"]),
    ({"chunk": 10 ** 9}, ["field 'chunk' is 1000000000", f"decodes {CHUNK} queries"]),
    ({"chunk": CHUNK + 1}, [f"field 'chunk' is {CHUNK + 1}", f"(1, {CHUNK}, 2)"]),
    ({"chunk": None}, ["field 'chunk' is missing"]),
    ({"chunk": str(CHUNK)}, [f"field 'chunk' is '{CHUNK}'"]),
    ({"chunk": 8.0}, ["field 'chunk' is 8.0"]),
    ({"chunk": True}, ["field 'chunk' is True"]),
    ({"chunk": [8]}, ["field 'chunk' is [8]"]),
    ({"radius": None}, ["field 'radius' is missing"]),
    ({"radius": -1}, ["field 'radius' is -1"]),
    ({"radius": 2}, ["field 'radius' is 2", "radius 1"]),
    ({"radius": "1"}, ["field 'radius' is '1'"]),
    ({"format": None}, ["field 'format' is missing"]),
    ({"format": "msit-jax-onnx"}, ["field 'format' is 'msit-jax-onnx'"]),
    ({"version": None}, ["field 'version' is missing"]),
    ({"version": "1"}, ["field 'version' is '1'"]),
    ({"version": 99}, ["export version 99 is newer"]),
    ({"dim": 5}, ["field 'dim' is 5", f"outputs {DIM} features"]),
    ({"dim": "4"}, ["field 'dim' is '4'"]),
    ({"platforms": "cpu"}, ["field 'platforms' is 'cpu'"]),
    ({"platforms": ["tpu"]}, ["field 'platforms' is ['tpu']", "lowered for ['cpu']"]),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "")
def test_tampered_export_json_is_one_typed_error(export_copy, fields, needles):
    edit_meta(export_copy, **fields)
    refused(export_copy, stablehlo.META_FILE, *needles)


@pytest.mark.parametrize("text, needle", [
    (b'{"format": "msit-jax-stablehlo", "chunk": ', "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b"\xff\xfe garbage", "is not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"null", "expected a JSON object, got NoneType"),
    (b"[" * 100000, "is not valid JSON"),
])
def test_unreadable_export_json_is_one_typed_error(export_copy, text, needle):
    write(os.path.join(export_copy, stablehlo.META_FILE), text)
    refused(export_copy, stablehlo.META_FILE, needle)


def test_oversized_export_json_is_refused_unread(export_copy):
    write(os.path.join(export_copy, stablehlo.META_FILE), b" " * (stablehlo.MAX_META_BYTES + 1))
    refused(export_copy, stablehlo.META_FILE, "bytes, over the")


@pytest.mark.parametrize("records", [True, False], ids=["with-files", "without-files"])
@pytest.mark.parametrize("file", [stablehlo.ENCODER_FILE, stablehlo.DECODER_FILE])
@pytest.mark.parametrize("damage", ["half", "head", "empty", "missing", "garbage"])
def test_damaged_program_is_one_typed_error(export_copy, file, damage, records):
    """With export.json's 'files' records (sizes, sha256) the size is checked before the
    file is read; without them (a hand-made folder) deserialisation fails alone."""
    if not records:
        edit_meta(export_copy, files=None)
    path = os.path.join(export_copy, file)
    if damage == "half":
        truncate(path, 0.5)
    elif damage == "head":
        truncate(path, 0.01)
    elif damage == "empty":
        write(path, b"")
    elif damage == "missing":
        os.remove(path)
    else:
        write(path, os.urandom(4096))
    needle = {"empty": "is empty", "missing": "missing"}.get(damage, "cannot be deserialised")
    if records and damage != "missing":
        needle = "bytes but export.json 'files' says"
    refused(export_copy, file, needle)


@pytest.mark.parametrize("file", [stablehlo.ENCODER_FILE, stablehlo.DECODER_FILE])
def test_recorded_size_and_digest_catch_what_deserialises(good_export, export_copy, file):
    """Cutting a program's last bytes (its trailing name string) or flipping bytes in its
    constants still deserialises and runs: export.json's 'files' catches both."""
    path = os.path.join(export_copy, file)
    with open(path, "rb") as f:
        data = f.read()
    write(path, data[:-10])
    edit_meta(export_copy, files=None)
    stablehlo.load(export_copy)  # no record: nothing to tell
    with open(os.path.join(good_export, stablehlo.META_FILE)) as f:
        edit_meta(export_copy, files=json.load(f)["files"])  # the records of the whole files
    refused(export_copy, file, f"is {len(data) - 10} bytes but export.json 'files' says "
            f"{len(data)}")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    write(path, bytes(flipped))
    refused(export_copy, file, "its sha256 is not the one in export.json 'files'")


@pytest.mark.parametrize("files, needle", [
    ("all", "field 'files' is 'all'"),
    ({}, "field 'encoder.jaxexport' is missing"),
    ({"encoder.jaxexport": {"bytes": 1, "sha256": "0" * 64}, "decoder.jaxexport": {"bytes": 0,
      "sha256": "0" * 64}}, "field 'decoder.jaxexport' is {'bytes': 0"),
    ({"encoder.jaxexport": {"bytes": 1, "sha256": "xyz"}}, "field 'encoder.jaxexport' is"),
])
def test_malformed_file_records_are_refused(export_copy, files, needle):
    edit_meta(export_copy, files=files)
    refused(export_copy, stablehlo.META_FILE, needle)


def test_missing_export_json_and_missing_folder(export_copy, tmp_path):
    os.remove(os.path.join(export_copy, stablehlo.META_FILE))
    refused(export_copy, stablehlo.META_FILE, "missing", "not a complete StableHLO export")
    with pytest.raises(InputError, match="no StableHLO export folder"):
        stablehlo.load(str(tmp_path / "nothing"))


def test_swapped_or_foreign_programs_are_refused(good_export, export_copy, tmp_path):
    enc, dec = (os.path.join(export_copy, f) for f in (stablehlo.ENCODER_FILE,
                                                        stablehlo.DECODER_FILE))
    os.rename(enc, enc + ".x")
    os.rename(dec, enc)
    os.rename(enc + ".x", dec)
    refused(export_copy, stablehlo.ENCODER_FILE, "bytes but export.json 'files' says")
    edit_meta(export_copy, files=None)  # without the records: the programs' interfaces
    refused(export_copy, stablehlo.ENCODER_FILE, "is not an MSIT encoder program")
    # this encoder (dim 4) with the decoder of another export (dim 6)
    other = fake_stablehlo(str(tmp_path / "other"), dim=6)
    shutil.copy(os.path.join(good_export, stablehlo.ENCODER_FILE), enc)
    shutil.copy(os.path.join(other, stablehlo.DECODER_FILE), dec)
    refused(export_copy, stablehlo.DECODER_FILE, "expected feat_q, feat_v (1, h, w, 4)")


# --- ONNX ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_bytes():
    """A one-node graph with the export's interface (sr = lr, whatever out_size)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    def graph(in_name="lr", clamp="true"):
        g = helper.make_graph(
            [helper.make_node("Identity", [in_name], ["sr"])], "fake",
            [helper.make_tensor_value_info(in_name, TensorProto.FLOAT,
                                           [1, 3, "height", "width"]),
             helper.make_tensor_value_info("out_size", TensorProto.INT64, [2])],
            [helper.make_tensor_value_info("sr", TensorProto.FLOAT,
                                           [1, 3, "out_height", "out_width"])],
            initializer=[helper.make_tensor("pad", TensorProto.FLOAT, [256],
                                            np.zeros(256, np.float32))])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        helper.set_model_props(m, {"clamp": clamp, "chunk": "64", "radius": "1"})
        return m.SerializeToString()

    return {"good": graph(), "renamed": graph(in_name="image"), "clamp": graph(clamp="maybe")}


def onnx_refused(path: str, *needles: str) -> None:
    from msit_jax.export import onnx_runner

    with pytest.raises(ArtifactError) as info:
        onnx_runner.load(path)
    msg = str(info.value)
    assert errors.exit_code_for(info.value) == errors.EXIT_CHECKPOINT
    assert "model.onnx" in msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_damaged_onnx_is_one_typed_error(onnx_bytes, tmp_path):
    from msit_jax.export import onnx_runner

    path = str(tmp_path / "model.onnx")
    write(path, onnx_bytes["good"])
    assert onnx_runner.load(str(tmp_path)).clamped
    for data, needle in [(onnx_bytes["good"][:len(onnx_bytes["good"]) // 2],
                          "cannot be loaded by onnxruntime"),
                         (onnx_bytes["good"][:7], "cannot be loaded by onnxruntime"),
                         (os.urandom(2048), "cannot be loaded by onnxruntime"),
                         (b"", "is empty"),
                         (onnx_bytes["renamed"], "is not an MSIT graph: inputs image"),
                         (onnx_bytes["clamp"], "metadata field 'clamp' is 'maybe'")]:
        write(path, data)
        onnx_refused(path, needle)
        onnx_refused(str(tmp_path), needle)
    os.remove(path)
    onnx_refused(str(tmp_path), "missing")
    with pytest.raises(InputError, match="no ONNX model there"):
        onnx_runner.load(str(tmp_path / "nothing.onnx"))


# --- processes ---------------------------------------------------------------------------

def env():
    return dict(os.environ, PYTHONPATH=REPO)


@pytest.mark.slow
def test_huge_chunk_allocates_nothing(export_copy, tmp_path):
    """"chunk": 1e9 in export.json: the run stops at load with the typed error, its
    peak RSS that of an idle JAX process (before the check: 7.45 GiB for the first
    chunk's query indices). The address space is capped at 4 GiB so that a
    regression fails with MemoryError instead of taking the machine's memory."""
    edit_meta(export_copy, chunk=10 ** 9)
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        import numpy as np
        from msit_jax.export import stablehlo
        try:
            up = stablehlo.load({export_copy!r})
            up(np.zeros((5, 4, 3), np.float32), scale=2)
            print("ran")
        except Exception as e:
            print(type(e).__name__, str(e))
        # VmHWM, not ru_maxrss: Linux carries the forked pytest image's peak across exec.
        with open("/proc/self/status") as f:
            print(int(next(ln.split()[1] for ln in f if ln.startswith("VmHWM:"))) // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env(), cwd=REPO, timeout=120)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stderr[-3000:]
    assert lines[0].startswith("ArtifactError ") and "field 'chunk' is 1000000000" in lines[0]
    peak_mib = int(lines[1])
    assert peak_mib < 1024, peak_mib


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (rc {proc.returncode}) before the point to kill "
                        f"it at: {err[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the partial output")
        time.sleep(0.02)


def partials(parent, name: str) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}.") and "partial" in n)


@pytest.mark.slow
def test_export_killed_mid_write_leaves_no_output(tmp_path, tiny_cfg, tiny_vars):
    """SIGKILL while the export writes (onnx.save stalled half-way by the test): OUT does
    not exist, the partial folder beside it is refused by the loader with the typed
    error, and a re-run writes OUT and removes the dead run's partial folder."""
    from msit_jax.io import model_dir

    src = model_dir.save_model(str(tmp_path / "src"), tiny_cfg, tiny_vars)
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys, time, onnx
        save = onnx.save
        def stalled(model, path, *a, **k):
            data = model.SerializeToString()
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2]); f.flush()
            time.sleep(600)
        onnx.save = stalled
        from msit_jax.export import cli as export_cli
        sys.exit(export_cli.main([{src!r}, {str(out)!r}, "--format", "onnx", "--chunk", "64"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def half_written() -> bool:
        return any(os.path.isfile(os.path.join(tmp_path, p, "model.onnx")) and
                   os.path.getsize(os.path.join(tmp_path, p, "model.onnx")) > 0
                   for p in partials(tmp_path, "out"))

    wait_for(half_written, proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not out.exists()
    (partial,) = partials(tmp_path, "out")
    onnx_refused(str(tmp_path / partial), "cannot be loaded by onnxruntime")

    r = subprocess.run([sys.executable, "-m", "msit_jax.export", src, str(out), "--format",
                        "onnx", "--chunk", "64"], env=env(), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(out) == ["model.onnx"] and partials(tmp_path, "out") == []
    from msit_jax.export import onnx_runner

    assert onnx_runner.load(str(out)).clamped


@pytest.mark.slow
def test_convert_killed_mid_write_leaves_no_output(tmp_path, tiny_cfg):
    """SIGKILL after the converted variables are written and before the config (the
    config write stalled by the test): DST does not exist, the loader refuses the
    partial folder with the typed error, and a re-run writes DST."""
    pytest.importorskip("torch")
    from tests.test_export import official_checkpoint

    src = str(tmp_path / "official.pth")
    official_checkpoint(src, tiny_cfg)
    dst = tmp_path / "dst"
    code = textwrap.dedent(f"""
        import sys, time
        from msit_jax.io import model_dir
        orig = model_dir.config_to_json
        def stalled(cfg):
            text = orig(cfg)
            if sys._getframe(1).f_code.co_name == "save_model":
                print("variables written", flush=True)
                time.sleep(600)
            return text
        model_dir.config_to_json = stalled
        from msit_jax.io import convert
        sys.exit(convert.main([{src!r}, {str(dst)!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "variables written" not in line:
        proc.kill()
        pytest.fail(f"no stall: {line!r} {proc.communicate()[1][-3000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not dst.exists()
    (partial,) = partials(tmp_path, "dst")
    from msit_jax.io import pretrained

    with pytest.raises((CheckpointError, FileNotFoundError)):
        pretrained.load(str(tmp_path / partial))

    r = subprocess.run([sys.executable, "-m", "msit_jax.convert", src, str(dst), "--quiet"],
                       env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert partials(tmp_path, "dst") == []
    cfg, _ = pretrained.load(str(dst))
    assert cfg.encoder == tiny_cfg.encoder
