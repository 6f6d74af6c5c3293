"""Run a StableHLO export from its artifacts alone.

    up = msit_jax.exported.load("msit_stablehlo/")   # written by python -m msit_jax.export
    sr = up(image, scale=3.5)                         # PIL / uint8 / float, as msit_jax.Upscaler

The folder holds two serialised `jax.export` programs and `export.json`:

  encoder.jaxexport  inp (1, h, w, 3) float32, (lr - 0.5) / 0.5; h, w symbolic
                     -> (feat_q, feat_v), each (1, h, w, dim)
  decoder.jaxexport  (feat_q, feat_v, inp, coord (1, C, 2), key_idx (1, C, 2, 2r+1) int32,
                     rel (1, C, 2, 2r+1), rel_cell (1, 2)) -> (1, C, 3), C = the fixed chunk
  export.json        format, chunk, radius, platforms, the model config

The weights are constants inside the programs. This runner needs JAX, numpy and
the host-side query geometry (`msit_jax.geometry`) only: it imports neither
Flax nor the model. The programs were lowered for several platforms at once
(cpu, cuda, tpu by default), so the same folder runs on any of them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax import export

from msit_jax import geometry
from msit_jax.serving import ImageUpscaler, Progress, check_image, denormalize, normalize, track

FORMAT = "msit-jax-stablehlo"
VERSION = 1
ENCODER_FILE = "encoder.jaxexport"
DECODER_FILE = "decoder.jaxexport"
META_FILE = "export.json"


def read_meta(folder: str) -> dict[str, Any]:
    """export.json of a StableHLO export folder, checked."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a StableHLO export (no {META_FILE})")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path}: export version {meta['version']} is newer than this "
                         f"runner's ({VERSION}); upgrade msit-jax")
    return meta


class ExportedUpscaler(ImageUpscaler):
    """Upscales with a StableHLO export: the encoder once per image, then the
    decoder over fixed-size chunks of queries (geometry on the host, one compiled
    decoder per LR size). `up(image, scale=... | size=...)`; see msit_jax.serving."""

    def __init__(self, folder: str):
        self.folder = folder
        self.meta = read_meta(folder)
        with open(os.path.join(folder, ENCODER_FILE), "rb") as f:
            self.encoder = export.deserialize(bytearray(f.read()))
        with open(os.path.join(folder, DECODER_FILE), "rb") as f:
            self.decoder = export.deserialize(bytearray(f.read()))
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


def load(folder: str) -> ExportedUpscaler:
    """The runner for a StableHLO export folder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no StableHLO export folder at {folder}")
    return ExportedUpscaler(folder)
