"""Run an exported ONNX graph (`model.onnx`) with onnxruntime.

    up = msit_jax.export.onnx_runner.load("msit_onnx/")  # by python -m msit_jax.export
    sr = up(image, scale=3.5)                 # PIL / uint8 / float, as msit_jax.Upscaler

The graph interface (written by `msit_jax.export.onnx_graph.build_graph`; opset 17 or
later, batch 1, NCHW):

  input  lr        float32 [1, 3, height, width]   RGB in [0, 1]; height, width dynamic
  input  out_size  int64   [2]                      (out_height, out_width), each >= 1
  output sr        float32 [1, 3, out_height, out_width]  in [0, 1] (clamped, unless the
                   metadata field 'clamp' is 'false': the raw prediction)

Everything (normalisation, encoder, query geometry, decoder) happens in the graph, so
this runner needs numpy, onnxruntime and the image front end alone: it imports none of
the graph builder, `onnx`, JAX, Flax or the model modules (tests/test_export.py blocks
them). onnxruntime is an optional dependency, imported when a runner is made.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from msit_jax import console
from msit_jax.errors import InputError, one_line
from msit_jax.inference import frontend
from msit_jax.inference.frontend import ImageRunner, Progress, artifact_error, check_image

ONNX_FILE = "model.onnx"
ArtifactError = frontend.ArtifactError  # what `load` raises for a bad file (a CheckpointError)
# The graph interface (module docstring): name, element type, shape (None: dynamic).
GRAPH_INPUTS = (("lr", "tensor(float)", (1, 3, None, None)), ("out_size", "tensor(int64)", (2,)))
GRAPH_OUTPUTS = (("sr", "tensor(float)", (1, 3, None, None)),)


def _interface(args) -> tuple:
    return tuple((a.name, a.type, tuple(d if isinstance(d, int) else None for d in a.shape))
                 for a in args)


def check_session(path: str, session: Any) -> dict[str, str]:
    """The graph has this module's interface (GRAPH_INPUTS, GRAPH_OUTPUTS) and its
    metadata (clamp, chunk, radius) is well formed; returns the metadata. ArtifactError
    names the file and the input, output or field at fault."""
    got_in, got_out = _interface(session.get_inputs()), _interface(session.get_outputs())
    if got_in != GRAPH_INPUTS or got_out != GRAPH_OUTPUTS:
        fmt = lambda sig: ", ".join(f"{n} {t} {['?' if d is None else d for d in s]}"
                                    for n, t, s in sig)
        raise artifact_error(path, f"is not an MSIT graph: inputs {fmt(got_in)} -> outputs "
                             f"{fmt(got_out)}; expected {fmt(GRAPH_INPUTS)} -> "
                             f"{fmt(GRAPH_OUTPUTS)}")
    props = dict(session.get_modelmeta().custom_metadata_map)
    if props.get("clamp", "true") not in ("true", "false"):
        raise artifact_error(path, f"metadata field 'clamp' is {props['clamp']!r}, expected "
                             "'true' or 'false'")
    for name, low in (("chunk", 1), ("radius", 0)):
        v = props.get(name)
        if v is not None and not (v.isdigit() and len(v) <= 12 and int(v) >= low):
            raise artifact_error(path, f"metadata field {name!r} is {one_line(repr(v), 80)}, "
                                 f"expected an integer >= {low}")
    return props


class OnnxRunner(ImageRunner):
    """Runs an exported graph with onnxruntime: `up(image, scale=... | size=...)`.

    providers: onnxruntime execution providers (default: CPU). The graph decodes
    every chunk in one call, so there is no per-chunk progress (progress is ignored).
    verbose: onnxruntime's warnings too (the optimiser's notes on the graph, once per
    session); default: only with a command line's --verbose (`console.verbose_logs`).
    A missing, empty, truncated or undecodable file, or a graph without this module's
    interface (`check_session`), is an ArtifactError (a CheckpointError, exit code 5)
    naming the file.
    """

    def __init__(self, path: str, providers: Optional[list] = None,
                 threads: Optional[int] = None, verbose: Optional[bool] = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("running ONNX exports needs onnxruntime: "
                              f"{console.install_hint('export')}") from e
        opts = ort.SessionOptions()
        if verbose is None:
            verbose = console.verbose_logs()
        # 3: errors only; the optimiser warns about the names it leaves, per session.
        opts.log_severity_level = 2 if verbose else 3
        if threads:
            opts.intra_op_num_threads = threads
        if not os.path.isfile(path):
            raise artifact_error(path, "missing: the ONNX export is incomplete")
        if os.path.getsize(path) == 0:
            raise artifact_error(path, "is empty (an interrupted export?)")
        try:
            self.session = ort.InferenceSession(path, opts,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - InvalidProtobuf, Fail, ...: a bad file
            raise artifact_error(path, "cannot be loaded by onnxruntime (truncated or corrupt: "
                                 "re-export it)", e) from e
        props = check_session(path, self.session)
        self.clamped = props.get("clamp", "true") == "true"

    def upscale_array(self, lr: np.ndarray, out_hw: tuple[int, int], *, clamp: bool = True,
                      progress: Progress = False) -> np.ndarray:
        if not clamp and self.clamped:
            raise ValueError("this ONNX graph clamps its output; export with clamp=False "
                             "for the raw prediction")
        lr = check_image(lr)
        nchw = np.ascontiguousarray(lr.transpose(2, 0, 1)[None])
        (sr,) = self.session.run(["sr"], {"lr": nchw,
                                          "out_size": np.asarray(out_hw, np.int64)})
        sr = sr[0].transpose(1, 2, 0)
        return np.clip(sr, 0.0, 1.0) if clamp else sr


def load(path: str, providers: Optional[list] = None, threads: Optional[int] = None,
         verbose: Optional[bool] = None) -> OnnxRunner:
    """An `OnnxRunner` for an exported `model.onnx` (or the export folder holding it).

    InputError when nothing is at `path`; ArtifactError (a CheckpointError) when the
    folder has no model.onnx or the file is bad (see OnnxRunner)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, ONNX_FILE)
    elif not os.path.exists(path):
        raise InputError(f"{path}: no ONNX model there")
    return OnnxRunner(path, providers, threads, verbose)
