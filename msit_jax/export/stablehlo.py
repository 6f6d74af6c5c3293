"""Run a StableHLO export from its artifacts alone.

    up = msit_jax.export.stablehlo.load("msit_stablehlo/")  # by python -m msit_jax.export
    sr = up(image, scale=3.5)                    # PIL / uint8 / float, as msit_jax.Upscaler

The folder holds two serialised `jax.export` programs and `export.json`:

  encoder.jaxexport  inp (1, h, w, 3) float32, (lr - 0.5) / 0.5; h, w symbolic
                     -> (feat_q, feat_v), each (1, h, w, dim)
  decoder.jaxexport  (feat_q, feat_v, inp, coord (1, C, 2), key_idx (1, C, 2, 2r+1) int32,
                     rel (1, C, 2, 2r+1), rel_cell (1, 2)) -> (1, C, 3), C = the fixed chunk
  export.json        format, version, chunk, radius, dim, platforms, files (each
                     program's size and sha256), the model config

The weights are constants inside the programs. This runner needs JAX, numpy and
the host-side query geometry (`msit_jax.geometry`) only: it imports neither
Flax nor the model. The programs were lowered for several platforms at once
(cpu, cuda, tpu by default), so the same folder runs on any of them.

`load` checks the folder before running anything: export.json's fields (present,
typed, in range) and their agreement with the programs' own shapes (chunk is the
decoder's query dimension, 2 * radius + 1 its key dimension, dim the encoder's
feature width), and each file (missing, empty, truncated, not deserialisable, or
of another size or sha256 than export.json's 'files' records). A
failure is one `ArtifactError` (a `msit_jax.errors.CheckpointError`, exit code 5)
naming the file and the field; ArtifactError is never raised for a folder that
`python -m msit_jax.export` wrote completely. An interrupted export leaves no
folder under the output's name (it is written beside it and renamed when done).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Optional

import jax
import numpy as np
from jax import export

from msit_jax import geometry
from msit_jax.errors import InputError, one_line
from msit_jax.inference import frontend
from msit_jax.inference.frontend import (ImageRunner, Progress, artifact_error, check_image,
                                         denormalize, normalize, track)

FORMAT = "msit-jax-stablehlo"
VERSION = 1
ENCODER_FILE = "encoder.jaxexport"
DECODER_FILE = "decoder.jaxexport"
META_FILE = "export.json"
MAX_META_BYTES = 1 << 20  # export.json is a few KB; a larger one is not ours, not read
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for

ArtifactError = frontend.ArtifactError  # what `load` raises for a bad folder (a CheckpointError)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(meta: dict, path: str, name: str, check, want: str, *, required: bool = True):
    """meta[name] when `check(value)`; ArtifactError naming the file and the field."""
    if name not in meta:
        if required:
            raise artifact_error(path, f"field {name!r} is missing (expected {want})")
        return None
    value = meta[name]
    if not check(value):
        raise artifact_error(path, f"field {name!r} is {one_line(repr(value), 80)}, expected "
                             f"{want}")
    return value


def read_meta(folder: str) -> dict[str, Any]:
    """export.json of a StableHLO export folder, checked field by field: format,
    version, chunk (>= 1), radius (>= 0), and dim and platforms when present.

    Their agreement with the programs is `check_programs`' (chunk, radius, dim and
    platforms are the programs' own shapes and targets). Any problem is an
    ArtifactError (a CheckpointError) naming the file and the field.
    """
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        raise artifact_error(path, f"missing: {folder} is not a complete StableHLO export "
                             f"(expected {META_FILE}, {ENCODER_FILE}, {DECODER_FILE})")
    try:
        size = os.path.getsize(path)
        if size > MAX_META_BYTES:
            raise artifact_error(path, f"{size} bytes, over the {MAX_META_BYTES} an "
                                 "export.json can have")
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise artifact_error(path, "cannot be read", e) from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise artifact_error(path, "is not valid JSON", e) from e
    if not isinstance(meta, dict):
        raise artifact_error(path, f"expected a JSON object, got {type(meta).__name__}")
    _field(meta, path, "format", lambda v: v == FORMAT, repr(FORMAT))
    version = _field(meta, path, "version", lambda v: _is_int(v) and v >= 1,
                     "an integer >= 1")
    if version > VERSION:
        raise artifact_error(path, f"field 'version': export version {version} is newer than "
                             f"this runner's ({VERSION}); upgrade msit-jax")
    _field(meta, path, "chunk", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _field(meta, path, "radius", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _field(meta, path, "dim", lambda v: _is_int(v) and v >= 1, "an integer >= 1",
           required=False)
    _field(meta, path, "platforms", lambda v: isinstance(v, list) and v and all(
        isinstance(p, str) for p in v), "a non-empty list of platform names", required=False)
    files = _field(meta, path, "files", lambda v: isinstance(v, dict), "an object "
                   f"{{{ENCODER_FILE!r}: {{'bytes', 'sha256'}}, {DECODER_FILE!r}: ...}}",
                   required=False)
    for name in (ENCODER_FILE, DECODER_FILE) if files is not None else ():
        _field(files, path, name, lambda v: isinstance(v, dict) and _is_int(v.get("bytes"))
               and v["bytes"] >= 1 and isinstance(v.get("sha256"), str)
               and re.fullmatch("[0-9a-f]{64}", v["sha256"]) is not None,
               "{'bytes': an integer >= 1, 'sha256': 64 hex digits} (field 'files')")
    return meta


def file_record(data: bytes) -> dict[str, Any]:
    """export.json's record of a program file: {'bytes': size, 'sha256': hex digest}."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_program(path: str, record: Optional[dict[str, Any]] = None) -> export.Exported:
    """A serialised `jax.export` program; ArtifactError when missing, empty, truncated
    or not deserialisable (nothing is allocated but the file's own bytes). record:
    export.json's {'bytes', 'sha256'} for the file (exports since it was added): a
    different size (checked before reading) or digest is refused too."""
    if not os.path.isfile(path):
        raise artifact_error(path, "missing: the StableHLO export is incomplete")
    meta_name = f"{META_FILE} 'files'"
    if record is not None and os.path.getsize(path) != record["bytes"]:
        raise artifact_error(path, f"is {os.path.getsize(path)} bytes but {meta_name} says "
                             f"{record['bytes']} (truncated or replaced: re-export it)")
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError as e:
        raise artifact_error(path, "cannot be read", e) from e
    if not data:
        raise artifact_error(path, "is empty (an interrupted export?)")
    if record is not None and hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise artifact_error(path, f"its sha256 is not the one in {meta_name} (corrupt or "
                             "modified: re-export it)")
    try:
        return export.deserialize(data)
    except Exception as e:  # noqa: BLE001 - struct.error, IndexError, ...: a bad file
        raise artifact_error(path, "cannot be deserialised (truncated or corrupt: re-export "
                             "it)", e) from e


def _dims(aval) -> tuple:
    return tuple(d if _is_int(d) or isinstance(d, np.integer) else None for d in aval.shape)


def _sig(avals) -> str:
    return ", ".join(f"{a.dtype}{list(a.shape)}" for a in avals)


def check_programs(folder: str, meta: dict[str, Any], encoder: export.Exported,
                   decoder: export.Exported) -> None:
    """The programs have the interface of the module docstring, and export.json's
    chunk, radius, dim and platforms are theirs; ArtifactError names the file and
    the field (or the program input) that disagrees."""
    enc_path = os.path.join(folder, ENCODER_FILE)
    dec_path = os.path.join(folder, DECODER_FILE)
    meta_path = os.path.join(folder, META_FILE)

    def expect(ok: bool, path: str, what: str, prog: export.Exported) -> None:
        if not ok:
            raise artifact_error(path, f"{what} (its inputs: {_sig(prog.in_avals)}; outputs: "
                                 f"{_sig(prog.out_avals)})")

    ei, eo = encoder.in_avals, encoder.out_avals
    expect(len(ei) == 1 and len(eo) == 2, enc_path, "is not an MSIT encoder program: expected "
           "1 input (inp) and 2 outputs (feat_q, feat_v)", encoder)
    expect(all(len(a.shape) == 4 and str(a.dtype) == "float32" for a in (*ei, *eo)),
           enc_path, "expected float32 (1, h, w, c) inputs and outputs", encoder)
    dim = _dims(eo[0])[3]
    expect(_dims(ei[0])[::3] == (1, 3) and dim is not None and dim >= 1
           and _dims(eo[1])[3] == dim, enc_path, "expected inp (1, h, w, 3) -> feat_q, "
           "feat_v (1, h, w, dim)", encoder)

    di, do = decoder.in_avals, decoder.out_avals
    expect(len(di) == 7 and len(do) == 1, dec_path, "is not an MSIT decoder program: "
           "expected 7 inputs (feat_q, feat_v, inp, coord, key_idx, rel, rel_cell) and "
           "1 output (pred)", decoder)
    shapes = [_dims(a) for a in (*di, *do)]
    dtypes = [str(a.dtype) for a in (*di, *do)]
    chunk = shapes[3][1] if len(shapes[3]) == 3 else None
    k = shapes[4][3] if len(shapes[4]) == 4 else None
    ok = (chunk is not None and chunk >= 1 and k is not None and k >= 1 and k % 2 == 1
          and [len(s) for s in shapes] == [4, 4, 4, 3, 4, 4, 2, 3]
          and shapes[0][3] == dim and shapes[1][3] == dim and shapes[2][3] == 3
          and shapes[3] == (1, chunk, 2) and shapes[4] == (1, chunk, 2, k)
          and shapes[5] == (1, chunk, 2, k) and shapes[6] == (1, 2) and shapes[7] == (1, chunk, 3)
          and dtypes == ["float32"] * 4 + ["int32"] + ["float32"] * 3)
    expect(ok, dec_path, f"expected feat_q, feat_v (1, h, w, {dim}) float32 (the encoder's "
           "features), inp (1, h, w, 3), coord (1, C, 2), key_idx (1, C, 2, 2r+1) int32, rel "
           "(1, C, 2, 2r+1), rel_cell (1, 2) -> pred (1, C, 3)", decoder)

    if meta["chunk"] != chunk:
        raise artifact_error(meta_path, f"field 'chunk' is {meta['chunk']} but {DECODER_FILE} "
                             f"decodes {chunk} queries per call (its coord input is "
                             f"(1, {chunk}, 2))")
    if 2 * meta["radius"] + 1 != k:
        raise artifact_error(meta_path, f"field 'radius' is {meta['radius']} but "
                             f"{DECODER_FILE} gathers {k} = 2r+1 keys per axis (radius "
                             f"{(k - 1) // 2})")
    if meta.get("dim", dim) != dim:
        raise artifact_error(meta_path, f"field 'dim' is {meta['dim']} but {ENCODER_FILE} "
                             f"outputs {dim} features")
    if "platforms" in meta and tuple(meta["platforms"]) != tuple(encoder.platforms):
        raise artifact_error(meta_path, f"field 'platforms' is {meta['platforms']} but "
                             f"{ENCODER_FILE} was lowered for {list(encoder.platforms)}")
    if tuple(decoder.platforms) != tuple(encoder.platforms):
        raise artifact_error(dec_path, f"lowered for {list(decoder.platforms)}, "
                             f"{ENCODER_FILE} for {list(encoder.platforms)}: the files are "
                             "from different exports")


class StableHLORunner(ImageRunner):
    """Upscales with a StableHLO export: the encoder once per image, then the
    decoder over fixed-size chunks of queries (geometry on the host, one compiled
    decoder per LR size). `up(image, scale=... | size=...)`; see
    msit_jax.inference.frontend.

    The folder is checked when loaded (`read_meta`, `read_program`,
    `check_programs`): a missing, truncated or tampered file is an ArtifactError
    (a CheckpointError) naming the file and the field, before anything is run or
    allocated from its numbers."""

    def __init__(self, folder: str):
        self.folder = folder
        self.meta = read_meta(folder)
        files = self.meta.get("files", {})
        self.encoder = read_program(os.path.join(folder, ENCODER_FILE), files.get(ENCODER_FILE))
        self.decoder = read_program(os.path.join(folder, DECODER_FILE), files.get(DECODER_FILE))
        check_programs(folder, self.meta, self.encoder, self.decoder)
        self.chunk = int(self.meta["chunk"])
        self.radius = int(self.meta["radius"])
        self.platforms = tuple(self.encoder.platforms)
        self._encode = jax.jit(self.encoder.call)
        self._decode = jax.jit(self.decoder.call)

    def upscale_array(self, lr: np.ndarray, out_hw: tuple[int, int], *, clamp: bool = True,
                      progress: Progress = False) -> np.ndarray:
        lr = check_image(lr)
        lr_hw = lr.shape[:2]
        inp = normalize(lr)[None]
        feat_q, feat_v = self._encode(inp)
        out = np.empty((out_hw[0] * out_hw[1], 3), np.float32)
        chunks = geometry.query_chunks(out_hw, lr_hw, self.radius, self.chunk)
        pending = None  # one chunk in flight while the host prepares the next
        for start, count, g in track(chunks, -(-out.shape[0] // self.chunk), progress):
            g = g.add_batch_axis()  # the program's inputs are the flat fields, batch of 1
            pred = self._decode(feat_q, feat_v, inp, g.coord, g.key_idx, g.rel, g.rel_cell)
            if pending is not None:
                out[pending[0]:pending[0] + pending[1]] = np.asarray(pending[2][0, :pending[1]])
            pending = (start, count, pred)
        out[pending[0]:pending[0] + pending[1]] = np.asarray(pending[2][0, :pending[1]])
        out = denormalize(out).reshape(out_hw[0], out_hw[1], 3)
        return np.clip(out, 0.0, 1.0) if clamp else out


def load(folder: str) -> StableHLORunner:
    """The runner for a StableHLO export folder: InputError when there is no folder,
    ArtifactError (a CheckpointError, exit code 5) when it is incomplete or corrupt."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no StableHLO export folder there")
    return StableHLORunner(folder)
