"""Lower MSIT programs for any platform from any host, and read the result.

    exported = lower_program("train_stage1", "tpu", model_cfg, RuntimeOptions())
    report = analyse(exported.mlir_module())

`jax.export` lowers without the target hardware, so a laptop can check what a
TPU or GPU would run: which ops, which precision on every contraction, whether
anything falls back to float64 or a host callback. The programs are the ones
this project runs: the folded model's encoder, the per-query and grid
decoders (`msit_jax.inference`), and the data-parallel train step
(`msit_jax.training.step`) sharded over a mesh of every device of this host.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from msit_jax import geometry, hlo
from msit_jax.export.stablehlo import PLATFORMS
from msit_jax.data.protocol import Batch
from msit_jax.models import grid_decoder
from msit_jax.models.model import MSIT, build_model, variable_shapes
from msit_jax.ops.runtime import RuntimeOptions
from msit_jax.training.state import create_state
from msit_jax.training.step import batch_sharding, make_mesh, replicated, train_step

PROGRAMS = ("encode", "decode", "grid", "train_stage1", "train_stage2")
# A platform_dependent branch lowered for one platform stays wrapped in a
# one-branch `case` (XLA inlines it: compiled programs have no conditional).
WRAPPERS = ("case", "return")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sizes of the lowered programs (the reference training protocol by default).

    batch: global batch (train steps, encoder, per-query decoder); lr_size: LR
    side; sample_q: queries per image; grid_scale: the grid decoder's scale;
    chunk: queries per grid-decoder call.
    """

    batch: int = 32
    lr_size: int = 48
    sample_q: int = 2304
    grid_scale: int = 4
    chunk: int = 4096


def abstract_variables(model_cfg: ml_collections.ConfigDict) -> dict:
    """The model's variables as ShapeDtypeStructs (no values computed)."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                                  variable_shapes(model_cfg),
                                  is_leaf=lambda x: isinstance(x, tuple))


def _query_batch(model_cfg, shapes: Shapes, batch: int) -> Batch:
    """A training-like batch of x2 queries (the values only set shapes and dtypes)."""
    n, q = shapes.lr_size, shapes.sample_q
    coord = np.resize(geometry.make_coord((2 * n, 2 * n)).reshape(-1, 2), (q, 2))
    g = geometry.query_geometry(coord, (n, n), model_cfg.radius,
                                geometry.rel_cell((2 * n, 2 * n), (n, n)))
    geom = jax.tree_util.tree_map(lambda a: np.broadcast_to(a[None], (batch,) + a.shape), g)
    return Batch(np.zeros((batch, n, n, 3), np.float32), geom,
                 np.zeros((batch, q, 3), np.float32))


def _spec(x: Any, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype")
                                else x.dtype, sharding=sharding)


def stage_config(model_cfg: ml_collections.ConfigDict, program: str) -> ml_collections.ConfigDict:
    """The model config a program runs: folded for inference, plain (stage 1) or
    RIM (stage 2) with BatchNorm for training."""
    c = model_cfg.copy_and_resolve_references()
    if program == "train_stage1":
        c.conv, c.batch_norm = "plain", True
    elif program == "train_stage2":
        c.conv, c.batch_norm = "rim", True
    else:
        c.conv, c.batch_norm = "plain", False  # what reparam.fold produces
    return c


def program_and_args(program: str, model_cfg: ml_collections.ConfigDict,
                     runtime: RuntimeOptions, shapes: Shapes = Shapes(),
                     devices: Optional[Sequence[jax.Device]] = None
                     ) -> tuple[Callable, tuple]:
    """(jitted function, abstract arguments) of one program."""
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}, expected one of {PROGRAMS}")
    cfg = stage_config(model_cfg, program)
    model = build_model(cfg, runtime)
    variables = abstract_variables(cfg)
    if program.startswith("train"):
        return _train_program(model, cfg, variables, shapes, devices)
    batch = _query_batch(cfg, shapes, shapes.batch)
    if program == "encode":
        fn = jax.jit(lambda v, inp: model.apply(v, inp, method=MSIT.encode))
        return fn, (variables, _spec(batch.inp))
    feat = jax.ShapeDtypeStruct((shapes.batch, shapes.lr_size, shapes.lr_size, cfg.dim),
                                runtime.compute_dtype)
    if program == "decode":
        fn = jax.jit(lambda v, feats, inp, geom: model.apply(v, feats, inp, geom,
                                                             method=MSIT.decode))
        return fn, (variables, (feat, feat), _spec(batch.inp),
                    jax.tree_util.tree_map(_spec, batch.geometry))
    return _grid_program(cfg, runtime, variables, shapes)


def _grid_program(cfg, runtime, variables, shapes: Shapes) -> tuple[Callable, tuple]:
    n, s = shapes.lr_size, shapes.grid_scale
    py = grid_decoder.plan_axis(n * s, n, cfg.radius)
    dec = jax.eval_shape(lambda p: grid_decoder.split_decoder_params(p, cfg), variables["params"])
    frozen = ml_collections.FrozenConfigDict(cfg)
    per_call = max(1, shapes.chunk // (py.groups.shape[1] ** 2))
    feat = jax.ShapeDtypeStruct((n, n, cfg.dim), runtime.compute_dtype)
    axis = (_spec(py.coord), _spec(py.groups))
    pb = jax.ShapeDtypeStruct((n * s, 2 * cfg.radius + 1, cfg.heads), jnp.float32)

    def fn(dec, feat_q, feat_v, inp, rows, cols, pb_rows, pb_cols, rel_cell, centres):
        return grid_decoder.decode_centres(frozen, runtime, dec, feat_q, feat_v, inp, rows,
                                           cols, pb_rows, pb_cols, rel_cell, centres)

    return jax.jit(fn), (dec, feat, feat, jax.ShapeDtypeStruct((n, n, 3), jnp.float32), axis,
                         axis, pb, pb, jax.ShapeDtypeStruct((2,), jnp.float32),
                         jax.ShapeDtypeStruct((per_call,), jnp.int32))


def _train_program(model, cfg, variables, shapes: Shapes, devices) -> tuple[Callable, tuple]:
    mesh = make_mesh(devices)
    if shapes.batch % mesh.size:
        raise ValueError(f"global batch {shapes.batch} is not a multiple of the {mesh.size} "
                         "devices")
    schedule = optax.constant_schedule(1e-4)
    tx = optax.adam(schedule)
    rep, data = replicated(mesh), batch_sharding(mesh)
    state = jax.eval_shape(lambda v: create_state(v, tx), variables)
    state = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                                   state)
    batch = jax.tree_util.tree_map(lambda a: _spec(a, data),
                                   _query_batch(cfg, shapes, shapes.batch))
    fn = jax.jit(lambda st, b: train_step(model, tx, schedule, st, b),
                 in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))
    return fn, (state, batch)


@contextlib.contextmanager
def default_backend_reporting(platform: str) -> Iterator[None]:
    """While tracing in this block, `jax.default_backend()` reports `platform`, as
    on a host of that platform: lowering inside it gives the program such a host
    would build if anything probed the backend at trace time."""
    real = jax.default_backend
    jax.default_backend = lambda: platform
    try:
        yield
    finally:
        jax.default_backend = real


def lower_program(program: str, platform: str, model_cfg: ml_collections.ConfigDict,
                  runtime: RuntimeOptions, shapes: Shapes = Shapes(),
                  devices: Optional[Sequence[jax.Device]] = None) -> jax.export.Exported:
    """`jax.export` of one program for one platform (no compilation, any host)."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}, expected one of {PLATFORMS}")
    fn, args = program_and_args(program, model_cfg, runtime, shapes, devices)
    return jax.export.export(fn, platforms=(platform,))(*args)


# --- reading StableHLO ----------------------------------------------------------

def analyse(program: hlo.Program, top: int = 5) -> dict:
    """Facts about a StableHLO module (text, or a module parsed by `hlo.parse`).

    ops: count by op kind (stablehlo / chlo / mhlo ops, scalar bodies of reduces,
    scatters, sorts ... not counted); contractions: dot_general + convolution
    counts by precision ('none' where unset); unset_precision: those lacking one
    (first ones as text); mixed_operands: contractions whose two operands differ
    in element type (e.g. f32 x bf16, first ones as mixed_operand_examples); f64:
    whether any float64 value appears; callbacks: host callback custom_calls;
    custom_calls: every custom_call target; gathers / scatters: the largest by
    result size.
    """
    module = hlo.parse(program)
    ops: collections.Counter = collections.Counter()
    contractions: collections.Counter = collections.Counter()
    unset, gathers, scatters, mixed = [], [], [], []
    for op in hlo.walk(module):
        kind = hlo.kind(op)
        if kind is None:
            continue
        ops[kind] += 1
        if kind in hlo.CONTRACTIONS:
            precs = hlo.precisions(op)
            key = "/".join(sorted(set(precs))) if precs else "none"
            contractions[f"{kind}:{key}"] += 1
            if not precs:
                unset.append(hlo.op_text(op))
            args = hlo.operands(op)
            if len(args) >= 2 and args[0].dtype != args[1].dtype:
                mixed.append(hlo.op_text(op))
        elif kind in ("gather", "dynamic_gather", "scatter"):
            res = hlo.results(op)
            n = res[0].elements if res and not res[0].dynamic else 0
            (scatters if kind == "scatter" else gathers).append(
                {"type": hlo.result_type_text(op), "elements": n})
    targets = {t for t in map(hlo.custom_call_target, hlo.walk(module, scalar_bodies=True))
               if t is not None}
    key = lambda d: -d["elements"]
    return {
        "ops": dict(sorted(ops.items())),
        "contractions": dict(sorted(contractions.items())),
        "unset_precision": len(unset),
        "unset_precision_examples": unset[:top],
        "mixed_operands": len(mixed),
        "mixed_operand_examples": mixed[:top],
        "f64": any(t in ("f64", "complex<f64>") for t in hlo.element_types(module)),
        "callbacks": sorted(t for t in targets if "callback" in t.lower()),
        "custom_calls": sorted(targets),
        "gathers": sorted(gathers, key=key)[:top],
        "scatters": sorted(scatters, key=key)[:top],
    }


def compute_ops(ops: dict) -> dict:
    """Op counts by kind without the one-branch `case` wrappers (WRAPPERS)."""
    return {k: v for k, v in ops.items() if k not in WRAPPERS}
