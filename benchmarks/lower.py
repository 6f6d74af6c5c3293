"""Lowering report: what a TPU or GPU would run, and a roofline guess of how fast,
computed on a laptop before renting the accelerator.

    python benchmarks/lower.py --platform tpu --program train_stage1 --dtype bfloat16 \\
        --json /tmp/ts1_tpu_bf16.json [--mlir /tmp/ts1.mlir] [--precision highest] [--devices 8]

The program (paper-size MSIT, the training protocol's shapes: global batch 32,
48x48 LR, 2304 queries) is lowered with `jax.export` for the target platform
(`msit_jax.lowering`); the report records

  * op counts, the precision of every dot_general / convolution, f64 and host
    callbacks, the largest gathers and scatters;
  * the acceptance check: lowered a second time with `jax.default_backend()`
    reporting the target platform (what a TPU host reports while tracing), the
    op counts (ignoring the one-branch `case` wrappers) must be the same;
  * FLOPs and bytes from XLA's cost model of the same math lowered for this CPU
    (`RuntimeOptions(conv_impl='xla', fft_min_kernel=0)`), next to the nominal
    FLOPs of `benchmarks/flops.py`;
  * a per-op roofline from the StableHLO text, per chip (TPU v5e, TPU v4, H100):
    time = sum over ops of max(FLOPs / effective peak, bytes / HBM bandwidth),
    the three largest predicted bottlenecks on v5e, and for the train steps a
    data-parallel (weak) scaling estimate to a v5e-64 pod.

These are predictions from published peak rates, not measurements. The exit
status is non-zero when the acceptance check fails or, at precision 'highest',
a contraction carries no precision.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Iterable, Optional, Sequence

PROGRAMS = ("encode", "decode", "grid", "train_stage1", "train_stage2")
PLATFORMS = ("tpu", "cuda")
DTYPES = ("float32", "bfloat16")
PRECISIONS = ("highest", "high", "default")

# --- published chip figures ----------------------------------------------------
# Sources (vendor spec pages, figures as published):
#   TPU v5e: cloud.google.com/tpu/docs/v5e - 197 TFLOP/s bf16, 16 GB HBM2e at
#            819 GB/s, ICI 1600 Gbps per chip (= 200 GB/s).
#   TPU v4:  cloud.google.com/tpu/docs/v4 - 275 TFLOP/s bf16, 32 GiB HBM2 at
#            1228 GB/s.
#   H100 SXM: nvidia.com/en-us/data-center/h100 datasheet - 989 TFLOP/s bf16
#            (dense), 495 TFLOP/s TF32 (dense), 67 TFLOP/s FP32 (CUDA cores),
#            80 GB HBM3 at 3350 GB/s.
# Precision -> effective matmul peak (an assumption, stated in the report):
#   TPU: bf16 operands: one MXU pass; f32 operands: 'default' 1 bf16 pass,
#        'high' ~3 passes (bf16_3x), 'highest' ~6 passes (bf16_6x).
#   H100: bf16 operands: bf16 tensor cores; f32 'high'/'default': TF32 tensor
#        cores; f32 'highest': FP32 on CUDA cores.
# Vector (elementwise, reduce, gather/scatter arithmetic) rate: H100 = its FP32
# CUDA-core rate; TPU = bf16 MXU peak / 10. The TPU VPU rate is not in the
# published specs: the /10 is an order-of-magnitude assumption, and the report
# shows how much of each prediction comes from these ops.
# Mixed f32 x bf16 contractions (bf16 forward, f32 cotangents) count as f32.
# TPU MXU fill: a contraction's contracted size K and output-feature size N are
# padded to the 128x128 systolic array (K includes a conv's window: taps folded
# into the contraction, the optimistic mapping); H100 tiles are not modelled.
TPU_VECTOR_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Chip:
    """Peak rates of one chip (FLOP/s and bytes/s)."""

    name: str
    family: str  # 'tpu' | 'gpu'
    bf16_flops: float
    hbm_bytes_s: float
    tf32_flops: float = 0.0
    fp32_flops: float = 0.0
    mxu_tile: int = 0  # systolic array side (TPU: 128); 0: no tile padding modelled
    hbm_capacity: float = 0.0  # bytes

    def contraction_peak(self, operand_dtype: str, precision: str) -> float:
        """Effective FLOP/s of a dot/conv with `operand_dtype` operands at `precision`
        ('HIGHEST' | 'HIGH' | 'DEFAULT'); see the table's assumptions above."""
        low = operand_dtype in ("bf16", "f16") or operand_dtype.startswith(("i", "ui", "f8"))
        if self.family == "tpu":
            if low:
                return self.bf16_flops
            return self.bf16_flops / {"HIGHEST": 6, "HIGH": 3}.get(precision, 1)
        if low:
            return self.bf16_flops
        return self.fp32_flops if precision == "HIGHEST" else self.tf32_flops

    @property
    def vector_flops(self) -> float:
        return self.fp32_flops if self.family == "gpu" else self.bf16_flops * TPU_VECTOR_FRACTION


CHIPS = {
    "tpu_v5e": Chip("TPU v5e", "tpu", 197e12, 819e9, mxu_tile=128, hbm_capacity=16e9),
    "tpu_v4": Chip("TPU v4", "tpu", 275e12, 1228e9, mxu_tile=128, hbm_capacity=32e9),
    "h100_sxm": Chip("H100 SXM", "gpu", 989e12, 3350e9, tf32_flops=495e12, fp32_flops=67e12,
                     hbm_capacity=80e9),
}
# v5e ICI: 1600 Gbps per chip as published (cloud.google.com/tpu/docs/v5e) = 200 GB/s.
V5E_ICI_BYTES_S = 1600e9 / 8
# Latency of one small (per-channel) all-reduce over ICI: not a published figure,
# an order-of-magnitude assumption for the synchronous-BatchNorm column.
SMALL_ALLREDUCE_S = 10e-6
POD_SIZES = (1, 4, 8, 16, 32, 64)


# --- StableHLO text -> per-op costs ----------------------------------------------

_ELEM_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "ui64": 8, "i32": 4,
               "ui32": 4, "i16": 2, "ui16": 2, "i8": 1, "ui8": 1, "i1": 1, "f8E4M3FN": 1,
               "f8E5M2": 1, "complex<f32>": 8, "complex<f64>": 16}
_TYPE = re.compile(r"tensor<((?:[0-9?]+x)*)(complex<[a-z0-9]+>|[a-zA-Z0-9]+)(?:,[^>]*)?>")
_OP_LINE = re.compile(r'^\s*(?:%[^=]*=\s*)?"?(?:stablehlo|chlo|mhlo)\.([a-z_0-9]+)"?')
_CALL = re.compile(r"^\s*(?:%[^=]*=\s*)?(?:func\.)?call @([\w.$-]+)")
_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$-]+)\(")
_LOC_REF = re.compile(r"loc\((#loc\d*)\)\s*$")
_LOC_INLINE = re.compile(r'loc\("([^"]*)"(?!:)')
_LOC_DEF = re.compile(r"^#(loc\d*) = loc\((.*)\)\s*$")

CONTRACTIONS = ("dot_general", "dot", "convolution")
# Ops whose results XLA materialises in HBM: their operands are read and
# results written. Everything else (elementwise, broadcast, reshape, ...) is
# assumed fused into a neighbour (no HBM traffic of its own) in the main model.
MATERIALISED = CONTRACTIONS + ("gather", "dynamic_gather", "scatter", "reduce", "reduce_window",
                               "select_and_scatter", "sort", "fft", "custom_call", "all_reduce",
                               "all_gather", "reduce_scatter", "all_to_all")
# Data movement, no arithmetic.
LAYOUT = ("broadcast_in_dim", "broadcast", "reshape", "transpose", "slice", "dynamic_slice",
          "dynamic_update_slice", "concatenate", "pad", "reverse", "convert", "iota",
          "bitcast_convert", "get_tuple_element", "tuple", "optimization_barrier")
NOT_COUNTED = ("constant", "return", "case", "if", "while", "num_partitions", "partition_id",
               "replica_id", "sharding_constraint")
# Ops whose regions are scalar bodies applied per element (cost belongs to the op).
SCALAR_REGION_OPS = ("reduce", "scatter", "select_and_scatter", "reduce_window", "sort",
                     "all_reduce", "reduce_scatter", "map")
KIND_CLASSES = ("dot_general", "convolution", "gather", "scatter", "fft", "reduce",
                "elementwise/other")


@dataclasses.dataclass
class OpCost:
    """One executed StableHLO op.

    kind: op name ('dot_general', 'add', ...); name: JAX name stack of its
    source; flops; bytes_fused: HBM bytes if fusible ops are fused away;
    bytes_unfused: operands + result; operand_dtype / precision: of contractions;
    result: the result's tensor type text; mxu_k / mxu_n: the contracted and
    output-feature sizes a contraction fills a 128x128 MXU tile with.
    """

    kind: str
    name: str
    flops: float
    bytes_fused: float
    bytes_unfused: float
    operand_dtype: str = ""
    precision: str = ""
    result: str = ""
    mxu_k: int = 0
    mxu_n: int = 0

    @property
    def kind_class(self) -> str:
        if self.kind in ("dot_general", "dot"):
            return "dot_general"
        if self.kind == "convolution":
            return "convolution"
        if self.kind in ("gather", "dynamic_gather"):
            return "gather"
        if self.kind == "scatter":
            return "scatter"
        if self.kind == "fft":
            return "fft"
        if self.kind in ("reduce", "reduce_window", "select_and_scatter", "sort"):
            return "reduce"
        return "elementwise/other"


@dataclasses.dataclass(frozen=True)
class Tensor:
    dims: tuple[int, ...]
    dtype: str

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        return self.elements * _ELEM_BYTES.get(self.dtype, 4)


def parse_types(text: str) -> list[Tensor]:
    """Every `tensor<AxBxdtype>` in `text` (dynamic dims count as 1)."""
    out = []
    for m in _TYPE.finditer(text):
        dims = tuple(int(d) if d != "?" else 1 for d in m.group(1).split("x") if d)
        out.append(Tensor(dims, m.group(2)))
    return out


def _signature(line: str) -> tuple[list[Tensor], list[Tensor], bool]:
    """(operand types, result types, explicit) of an op line's trailing type
    signature: `: (A, B) -> C` (explicit) or the short `: T` / `: P, T` forms."""
    cut = line.rfind(" loc(")
    text = line[:cut] if cut >= 0 else line
    i = max(text.rfind(" : ("), text.rfind(" : tensor<"))
    if i < 0:
        return [], [], False
    sig = text[i + 3:]
    if sig.startswith("(") and "->" in sig:
        lhs, rhs = sig.split("->", 1)
        return parse_types(lhs), parse_types(rhs), True
    types = parse_types(sig)
    return types, types[-1:], False


def _operand_count(line: str) -> int:
    body = line.split("=", 1)[1] if re.match(r"^\s*%", line) else line
    cut = body.rfind(" : ")
    return len(re.findall(r"%[\w#]+", body[:cut] if cut >= 0 else body))


def _nbytes(ts: Iterable[Tensor]) -> int:
    return sum(t.nbytes for t in ts)


def _dims_attr(line: str, attr: str) -> Optional[tuple[list[int], list[int]]]:
    """`attr = [a, b] x [c, d]` -> ([a, b], [c, d]); None if absent."""
    m = re.search(attr + r" = \[([0-9, ]*)\] x \[([0-9, ]*)\]", line)
    if not m:
        return None
    return ([int(d) for d in m.group(1).split(",") if d.strip()],
            [int(d) for d in m.group(2).split(",") if d.strip()])


def _dot_flops(line: str, operands: list[Tensor], result: Tensor) -> tuple[float, int, int]:
    """(FLOPs, contracted size K, output-feature size N) of a dot_general: 2 x
    result elements x K. N is the larger free size of the two operands (the one
    XLA would lay along the MXU's columns; an optimistic mapping)."""
    if len(operands) < 2:
        return 0.0, 0, 0
    lhs, rhs = operands[0], operands[1]
    # An empty contraction (`contracting_dims = [] x []`) is an outer product (K = 1);
    # a legacy `dot` has no attribute and contracts lhs's last dim with rhs's first.
    default = ([len(lhs.dims) - 1], [0]) if "contracting_dims" not in line else ([], [])
    lc, rc = _dims_attr(line, "contracting_dims") or default
    lb, rb = _dims_attr(line, "batching_dims") or ([], [])
    k = math.prod(lhs.dims[d] for d in lc if d < len(lhs.dims))

    def free(t: Tensor, skip: set) -> int:
        return math.prod(n for i, n in enumerate(t.dims) if i not in skip)

    n = max(free(lhs, set(lc) | set(lb)), free(rhs, set(rc) | set(rb)))
    return 2.0 * result.elements * k, k, n


def _conv_flops(line: str, operands: list[Tensor], result: Tensor) -> tuple[float, int, int]:
    """(FLOPs, K, N) of a convolution: 2 x result elements x K, K = kernel window x
    kernel input features (also right for feature- and batch-grouped
    convolutions, whose kernel 'i' dim is per group); N = kernel output features
    (per group). K counts the window as contracted (taps folded into the MXU's
    rows): an optimistic mapping."""
    m = re.search(r"dim_numbers = \[[^\]]*\]x\[([^\]]*)\]", line)
    if len(operands) < 2 or not m:
        return 0.0, 0, 0
    kernel = operands[1]
    layout = [c.strip() for c in m.group(1).split(",")]
    per_output = math.prod(kernel.dims[i] for i, c in enumerate(layout) if c != "o")
    n = math.prod(kernel.dims[i] for i, c in enumerate(layout) if c == "o")
    g = re.search(r"feature_group_count = (\d+)", line)
    n //= max(1, int(g.group(1))) if g else 1
    return 2.0 * result.elements * per_output, per_output, max(n, 1)


def _op_cost(kind: str, line: str, name: str) -> Optional[OpCost]:
    """The cost of one op from its line (for region ops, the line that closes them)."""
    if kind in NOT_COUNTED:
        return None
    operands, results, explicit = _signature(line)
    if not results:
        return None
    if not explicit and operands:
        # Short form: `add %a, %b : T`, `select %p, %a, %b : P, T`.
        n = _operand_count(line)
        operands = operands[:-1] + [operands[-1]] * max(1, n - len(operands) + 1)
    result = results[0]
    out_bytes = _nbytes(results)
    in_bytes = _nbytes(operands)
    unfused = in_bytes + out_bytes
    if kind in ("dot_general", "dot", "convolution"):
        flops, k, n = (_dot_flops if kind != "convolution" else _conv_flops)(
            line, operands, result)
        floats = [t.dtype for t in operands if t.dtype.startswith(("f", "bf"))]
        widest = max(floats, key=lambda d: _ELEM_BYTES.get(d, 4)) if floats else "f32"
        from msit_jax.lowering import line_precisions  # jax: imported after --devices

        precs = line_precisions(line)
        precision = "HIGHEST" if "HIGHEST" in precs else "HIGH" if "HIGH" in precs else "DEFAULT"
        return OpCost(kind, name, flops, unfused, unfused, widest, precision, _type_text(result),
                      k, n)
    if kind in ("gather", "dynamic_gather"):
        # Reads one slice per result element (not the whole operand) plus indices.
        src = min(operands[0].nbytes, out_bytes) if operands else 0
        idx = _nbytes(operands[1:2])
        return OpCost(kind, name, 0.0, src + idx + out_bytes, unfused, result=_type_text(result))
    if kind == "scatter":
        # Read-modify-write of the result, plus the indices and updates.
        upd = operands[2:] if len(operands) > 2 else operands
        flops = float(sum(t.elements for t in upd))
        return OpCost(kind, name, flops, _nbytes(operands[1:]) + 2 * out_bytes, unfused,
                      result=_type_text(result))
    if kind == "fft":
        n = max([t.elements for t in operands + results] or [0])
        m = re.search(r"length = \[([0-9, ]*)\]", line)
        size = math.prod(int(x) for x in m.group(1).split(",") if x.strip()) if m else n
        return OpCost(kind, name, 5.0 * n * math.log2(max(size, 2)), unfused, unfused,
                      result=_type_text(result))
    if kind in MATERIALISED:
        flops = float(sum(t.elements for t in operands)) if kind != "custom_call" else 0.0
        return OpCost(kind, name, flops, unfused, unfused, result=_type_text(result))
    flops = 0.0 if kind in LAYOUT else float(result.elements)
    return OpCost(kind, name, flops, 0.0, unfused, result=_type_text(result))


def _type_text(t: Tensor) -> str:
    return f"{t.dtype}[{','.join(map(str, t.dims))}]"


class _Locations:
    """`#locN = loc(...)` definitions -> the JAX name stack of an op's source."""

    def __init__(self, mlir: str):
        self.defs = {}
        for line in mlir.splitlines():
            m = _LOC_DEF.match(line)
            if m:
                self.defs["#" + m.group(1)] = m.group(2)
        self.memo: dict[str, str] = {}

    def name(self, line: str) -> str:
        m = _LOC_REF.search(line)
        if m:
            return self.resolve(m.group(1))
        m = _LOC_INLINE.search(line)
        return m.group(1) if m else ""

    def resolve(self, ref: str, depth: int = 0) -> str:
        if ref in self.memo:
            return self.memo[ref]
        text = self.defs.get(ref, "")
        # Named locations (`"name"(...)` or `"name"`), not file ones (`"f.py":3:1`).
        names = re.findall(r'"([^"]*)"\s*(?:\(|$)', text)
        best = next((n for n in names if "/" in n), "")
        if not best and depth < 30:
            for sub in re.findall(r"#loc\d*", text):
                best = self.resolve(sub, depth + 1)
                if "/" in best:
                    break
        best = best or (names[0] if names else "")
        self.memo[ref] = best
        return best


def op_costs(mlir: str) -> tuple[list[OpCost], dict]:
    """Every op `main` executes (private functions expanded at each call), with
    its cost; and facts about the walk. Of a `case`/`if` only the costliest
    branch counts; a `while` body counts once ('while_loops': their trip count
    is not known here)."""
    locs = _Locations(mlir)
    funcs: dict[str, list] = {}  # name -> [OpCost | ('call', callee, call-site name)]
    # Region stack, one entry per open op: opening op kind, whether its ops
    # count (not a scalar body), and its regions' op lists.
    stack: list[dict] = []
    func: Optional[str] = None
    last_kind = ""
    facts = {"while_loops": 0}

    def weight(items: list) -> float:
        return sum(i.flops + i.bytes_fused for i in items if isinstance(i, OpCost))

    for line in mlir.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#loc"):
            continue
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            stack = [{"kind": "func", "counted": True, "regions": [[]]}]
            continue
        if func is None or not stack:
            continue
        if stripped.startswith("}"):
            if stripped.endswith("{"):  # `}, {` or `} do {`: the same op's next region
                stack[-1]["regions"].append([])
                continue
            top = stack.pop()
            if not stack:  # end of the function body
                funcs[func] = top["regions"][0]
                func = None
                continue
            sink = stack[-1]["regions"][-1]
            if top["counted"] and stack[-1]["counted"]:
                if top["kind"] in ("case", "if"):
                    sink.extend(max(top["regions"], key=weight))
                else:
                    for region in top["regions"]:
                        sink.extend(region)
            if top["kind"] != "region" and stack[-1]["counted"]:
                cost = _op_cost(top["kind"], stripped, locs.name(line))
                if cost:
                    sink.append(cost)
            continue
        counted = stack[-1]["counted"]
        sink = stack[-1]["regions"][-1]
        call = _CALL.match(line)
        if call:
            if counted:
                sink.append(("call", call.group(1), locs.name(line)))
            continue
        m = _OP_LINE.match(line)
        if stripped.endswith("{"):
            if m:
                kind = m.group(1)
                inner = kind not in SCALAR_REGION_OPS
            else:  # a bare region (`cond {`, `reducer(...) {`) of the op before it
                kind = "region"
                inner = last_kind in ("while", "case", "if")
            stack.append({"kind": kind, "counted": counted and inner, "regions": [[]]})
            if m:
                last_kind = kind
                facts["while_loops"] += kind == "while"
            continue
        if m:
            last_kind = m.group(1)
            facts["while_loops"] += last_kind == "while"
            if counted:
                cost = _op_cost(last_kind, stripped, locs.name(line))
                if cost:
                    sink.append(cost)
    out: list[OpCost] = []

    def expand(f: str, site: Optional[str], depth: int) -> None:
        if depth > 50:
            raise RecursionError(f"call depth over 50 at @{f}")
        for item in funcs.get(f, []):
            if isinstance(item, tuple):
                expand(item[1], item[2] or site, depth + 1)
            elif site:
                # Inside a private function an op's own location is relative to it
                # ('pkhc,khcn->pkhn/dot_general') or just its primitive ('max').
                own = item.name if "/" in item.name else ""
                out.append(dataclasses.replace(item, name=f"{site}/{own}" if own else site))
            else:
                out.append(item)

    expand("main", None, 0)
    return out, facts


# --- roofline --------------------------------------------------------------------

def _tile_fill(x: int, tile: int) -> float:
    """Fraction of `tile`-wide MXU rows/columns a size-x dimension fills (padding)."""
    return x / (tile * math.ceil(x / tile)) if x > 0 else 1.0


def op_peak(op: OpCost, chip: Chip, tiles: bool = True) -> float:
    """The FLOP/s an op runs at on `chip`: contractions at the effective matmul peak
    of their operand dtype and precision, times (TPU, `tiles`) the fill of the
    128x128 MXU by their contracted and output-feature sizes (dot_generals at
    least the vector rate); everything else at the vector rate."""
    if op.kind_class not in ("dot_general", "convolution"):
        return chip.vector_flops
    peak = chip.contraction_peak(op.operand_dtype, op.precision)
    if tiles and chip.mxu_tile:
        peak *= _tile_fill(op.mxu_k, chip.mxu_tile) * _tile_fill(op.mxu_n, chip.mxu_tile)
        if op.kind_class == "dot_general":
            # XLA rewrites degenerate dots (outer products, batched mat-vecs) as
            # elementwise multiplies and reduces: the faster unit is assumed.
            peak = max(peak, chip.vector_flops)
    return peak


def op_time(op: OpCost, chip: Chip, fused: bool = True, tiles: bool = True) -> float:
    """max(FLOPs / effective peak, bytes / HBM bandwidth) of one op on one chip (s)."""
    nbytes = op.bytes_fused if fused else op.bytes_unfused
    return max(op.flops / op_peak(op, chip, tiles), nbytes / chip.hbm_bytes_s)


def _memory_bound(op: OpCost, chip: Chip) -> bool:
    return op.bytes_fused / chip.hbm_bytes_s > op.flops / op_peak(op, chip)


def scope_of(name: str) -> tuple[str, str]:
    """(phase 'fwd'|'bwd', model scope) of a JAX name stack, e.g.
    'jit(f)/transpose(jvp(MSIT))/MSIT.decode/decoder/vmap(vmap(query))/gather'
    -> ('bwd', 'MSIT.decode/decoder/query'); an einsum's spec is kept:
    'jit(f)/jit(decode_centres)/pkhc,khcn->pkhn/dot_general' ->
    ('fwd', 'decode_centres/pkhc,khcn->pkhn')."""
    phase = "bwd" if "transpose(" in name else "fwd"
    parts, einsums = [], []
    comps = name.split("/")[:-1]  # the last component is the primitive
    for comp in comps[1:] if comps and comps[0].startswith("jit(") else comps:
        while True:
            m = re.match(r"^(jvp|transpose|vmap|pjit|remat|checkpoint|jit|custom_jvp_call|"
                         r"custom_vjp_call|while|cond|body|branch_\d+)\((.*)\)$", comp)
            if not m:
                break
            comp = m.group(2)
        # Control-flow wrappers and einsum specs name no model part.
        if "->" in comp:
            einsums.append(comp)
        elif (comp and comp not in ("MSIT", "<lambda>", "fn")
              and not re.match(r"^(cond|while|body|body_fun|cond_fun|branch_\d+_fun)$", comp)):
            parts.append(comp)
    # An einsum's spec tells its contractions apart (the attention's, the grid
    # decoder's, which runs outside Flax modules).
    parts += einsums[-1:]
    return phase, "/".join(parts) or "(top level)"


def model_part(scope: str, depth: int = 4) -> str:
    """A scope with sibling indices merged and cut to `depth` levels:
    'MSIT.encode/amsno/msc/Ms_conv_16' -> 'MSIT.encode/amsno/msc/Ms_conv_*'."""
    parts = [re.sub(r"_\d+$", "_*", p) for p in scope.split("/")[:depth]]
    return "/".join(parts)


def roofline(ops: Sequence[OpCost], chip: Chip) -> dict:
    """One chip's prediction: predicted_s (per-op roofline, fusible ops fused
    away), upper_bound_s (every op reads its operands and writes its result),
    lower_bound_s (one overall max(time at peak, bytes / bandwidth)),
    no_tile_padding_s (predicted_s with every contraction at the full MXU),
    memory_bound_share (of predicted_s), and the time per op kind."""
    by_kind: dict[str, float] = collections.defaultdict(float)
    for op in ops:
        by_kind[op.kind_class] += op_time(op, chip)
    predicted = sum(by_kind.values())
    compute = sum(op.flops / op_peak(op, chip) for op in ops)
    memory = sum(op.bytes_fused for op in ops) / chip.hbm_bytes_s
    return {
        "predicted_s": predicted,
        "upper_bound_s": sum(op_time(op, chip, fused=False) for op in ops),
        "lower_bound_s": max(compute, memory),
        "no_tile_padding_s": sum(op_time(op, chip, tiles=False) for op in ops),
        "memory_bound_share": (sum(op_time(op, chip) for op in ops if _memory_bound(op, chip))
                               / predicted) if predicted else 0.0,
        "by_kind_s": {k: by_kind[k] for k in KIND_CLASSES if by_kind.get(k)},
    }


def bottlenecks(ops: Sequence[OpCost], chip: Chip, top: int = 3) -> list[dict]:
    """The `top` (model part, op kind) groups taking the most predicted time,
    forward and backward together (one change fixes both)."""
    groups: dict[tuple, dict] = {}
    total = sum(op_time(op, chip) for op in ops) or 1.0
    for op in ops:
        phase, scope = scope_of(op.name)
        part = model_part(scope)
        g = groups.setdefault((part, op.kind_class), {
            "part": part, "kind": op.kind_class, "ops": 0, "time_s": 0.0, "fwd_s": 0.0,
            "bwd_s": 0.0, "flops": 0.0, "bytes": 0.0, "memory_bound_s": 0.0,
            "no_tile_padding_s": 0.0, "largest": "", "_t": -1.0})
        t = op_time(op, chip)
        g["ops"] += 1
        g["time_s"] += t
        g[f"{phase}_s"] += t
        g["flops"] += op.flops
        g["bytes"] += op.bytes_fused
        g["no_tile_padding_s"] += op_time(op, chip, tiles=False)
        if _memory_bound(op, chip):
            g["memory_bound_s"] += t
        if t > g["_t"]:
            g["_t"] = t
            g["largest"] = (f"{phase} {scope}: {op.kind} -> {op.result}"
                            + (f" (K {op.mxu_k}, N {op.mxu_n}, {op.precision})"
                               if op.mxu_k else ""))
    ranked = sorted(groups.values(), key=lambda g: -g["time_s"])[:top]
    for g in ranked:
        del g["_t"]
        g["share"] = g["time_s"] / total
        g["bound"] = "memory" if g["memory_bound_s"] > g["time_s"] / 2 else "compute"
    return ranked


def kind_totals(ops: Sequence[OpCost]) -> dict:
    """Executed op count, FLOPs and bytes (fused / unfused model) per op kind."""
    out = {k: {"ops": 0, "flops": 0.0, "bytes_fused": 0.0, "bytes_unfused": 0.0}
           for k in KIND_CLASSES}
    for op in ops:
        d = out[op.kind_class]
        d["ops"] += 1
        d["flops"] += op.flops
        d["bytes_fused"] += op.bytes_fused
        d["bytes_unfused"] += op.bytes_unfused
    return {k: v for k, v in out.items() if v["ops"]}


def scaling(step_s: float, global_batch: int, params: int, per_chip_batch: int,
            batch_reductions: int = 0) -> dict:
    """Weak scaling over v5e chips: per-chip batch fixed, compute scaled linearly
    from the one-chip prediction at `global_batch`, plus a ring all-reduce of the
    float32 gradients, 2 (N-1)/N x bytes / ICI bandwidth, not overlapped
    ('efficiency'). 'efficiency_with_sync' adds `batch_reductions` small
    all-reduces (synchronous BatchNorm statistics) of SMALL_ALLREDUCE_S each."""
    grad_bytes = 4 * params
    compute = step_s * per_chip_batch / global_batch
    rows = []
    for n in POD_SIZES:
        comm = 2 * (n - 1) / n * grad_bytes / V5E_ICI_BYTES_S
        sync = batch_reductions * SMALL_ALLREDUCE_S if n > 1 else 0.0
        rows.append({"chips": n, "global_batch": n * per_chip_batch, "compute_s": compute,
                     "allreduce_s": comm, "step_s": compute + comm,
                     "efficiency": compute / (compute + comm),
                     "efficiency_overlapped": compute / max(compute, comm),
                     "sync_latency_s": sync,
                     "efficiency_with_sync": compute / (compute + comm + sync)})
    return {"per_chip_batch": per_chip_batch, "gradient_bytes": grad_bytes, "rows": rows}


# --- the report ----------------------------------------------------------------------

def _ops_diff(a: dict, b: dict) -> dict:
    from msit_jax.lowering import compute_ops

    a, b = compute_ops(a), compute_ops(b)
    return {k: [a.get(k, 0), b.get(k, 0)] for k in sorted(set(a) | set(b))
            if a.get(k, 0) != b.get(k, 0)}


def _cost_dict(ca: Any) -> Optional[dict]:
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return None
    return {"flops": float(ca.get("flops", 0.0)),
            "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
            "transcendentals": float(ca.get("transcendentals", 0.0))}


def _nominal_flops(program: str, cfg, shapes, queries_per_call: int) -> float:
    """Analytic FLOPs from benchmarks/flops.py (reference formulation)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import flops  # benchmarks/flops.py

    b, n = shapes.batch, shapes.lr_size
    if program.startswith("train"):
        return flops.train_step_flops(cfg, b, n, shapes.sample_q)
    if program == "encode":
        return 2.0 * b * n * n * flops.encoder_macs_per_pixel(cfg)
    if program == "decode":
        return 2.0 * b * shapes.sample_q * flops.decoder_macs_per_query(cfg)
    return 2.0 * queries_per_call * flops.decoder_macs_per_query(cfg)


def build_report(args: argparse.Namespace) -> tuple[dict, str]:
    """(report, StableHLO text) of one program: lower, analyse and predict (jax
    must already see `args.devices` devices)."""
    import jax

    from msit_jax.models.config import model_config, tiny_model_config
    from msit_jax.models.grid_decoder import plan_axis
    from msit_jax.lowering import (Shapes, abstract_variables, analyse, compute_ops,
                                   default_backend_reporting, lower_program, program_and_args,
                                   stage_config)
    from msit_jax.ops.runtime import RuntimeOptions

    if jax.device_count() != args.devices:
        raise SystemExit(f"jax sees {jax.device_count()} devices, --devices {args.devices}: "
                         "run this file as a script so it can set XLA_FLAGS first")
    cfg = tiny_model_config() if args.tiny else model_config()
    shapes = Shapes(batch=8, lr_size=12, sample_q=64, chunk=256) if args.tiny else Shapes()
    runtime = RuntimeOptions(precision=args.precision, dtype=args.dtype,
                             remat_decoder=args.remat_decoder,
                             s2d_min_kernel=args.s2d_min_kernel)
    train = args.program.startswith("train")
    timings = {}

    t = time.perf_counter()
    exported = lower_program(args.program, args.platform, cfg, runtime, shapes)
    mlir = exported.mlir_module()
    timings["lower_s"] = time.perf_counter() - t
    facts = analyse(mlir, top=5)

    # Acceptance check: the program a host of that platform would build. Lowering
    # happens on this host either way; only what tracing sees of the backend
    # changes (e.g. per-platform defaults read from jax.default_backend()).
    with default_backend_reporting(args.platform):
        emulated = analyse(lower_program(args.program, args.platform, cfg, runtime, shapes)
                           .mlir_module())
    same = compute_ops(emulated["ops"]) == compute_ops(facts["ops"])

    # XLA's cost model of the same math on this host: XLA's own conv rules and no
    # FFT convolutions (the accelerator methods), lowered for CPU.
    cost_rt = runtime.replace(conv_impl="xla", fft_min_kernel=0)
    cpu_facts = analyse(lower_program(args.program, "cpu", cfg, cost_rt, shapes).mlir_module())
    fn, fargs = program_and_args(args.program, cfg, cost_rt, shapes)
    t = time.perf_counter()
    lowered = fn.lower(*fargs)
    xla_lowered = None
    try:
        xla_lowered = _cost_dict(lowered.cost_analysis())
    except Exception as e:  # noqa: BLE001 - older/newer jax: fall back to compiling
        print(f"note: Lowered.cost_analysis failed ({e}); compiling instead", file=sys.stderr)
    xla_compiled, memory = None, None
    if args.compile or xla_lowered is None:
        compiled = lowered.compile()
        xla_compiled = _cost_dict(compiled.cost_analysis())
        try:
            m = compiled.memory_analysis()
            memory = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes",
                                                      "output_size_in_bytes",
                                                      "temp_size_in_bytes")}
        except Exception:  # noqa: BLE001 - not every backend reports it
            memory = None
    timings["xla_cost_s"] = time.perf_counter() - t
    # The train step is sharded over `devices`: XLA:CPU's compiled numbers are one
    # device's partition (checked against the unpartitioned lowered numbers);
    # inference programs run unsharded on one device.
    shards = args.devices if train else 1
    if xla_compiled:
        xla_compiled.update(scope="per device (SPMD partition, after CPU fusion)"
                            if shards > 1 else "whole program (after CPU fusion)",
                            devices=shards,
                            global_flops=xla_compiled["flops"] * shards,
                            global_bytes_accessed=xla_compiled["bytes_accessed"] * shards)
    if xla_lowered:
        xla_lowered["scope"] = "whole program, global batch, unoptimised HLO (no fusion)"

    ops, walk = op_costs(mlir)
    totals = kind_totals(ops)
    preds = {key: roofline(ops, chip) for key, chip in CHIPS.items()}
    for key, chip in CHIPS.items():
        if xla_lowered:
            peak = chip.contraction_peak("bf16" if args.dtype == "bfloat16" else "f32",
                                         args.precision.upper())
            nbytes = (xla_compiled["global_bytes_accessed"] if xla_compiled
                      else xla_lowered["bytes_accessed"])
            # One overall roofline from XLA's totals, every FLOP at the contraction
            # peak; bytes fused (compiled) where available, else unfused.
            preds[key]["xla_cost_roofline_s"] = max(xla_lowered["flops"] / peak,
                                                    nbytes / chip.hbm_bytes_s)
            preds[key]["xla_cost_roofline_bytes"] = ("compiled (CPU-fused)" if xla_compiled
                                                     else "lowered (unfused)")

    if memory:
        # XLA:CPU's buffer assignment (the accelerator's differs): temporaries of
        # one shard scaled to the whole batch on one chip, plus arguments.
        one_chip = memory["temp_size_in_bytes"] * shards + memory["argument_size_in_bytes"]
        memory["one_chip_estimate_bytes"] = one_chip
        for key, chip in CHIPS.items():
            preds[key]["fits_hbm_estimate"] = one_chip <= chip.hbm_capacity
    variables = abstract_variables(stage_config(cfg, args.program))
    params = int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(variables["params"])))
    py = plan_axis(shapes.lr_size * shapes.grid_scale, shapes.lr_size, cfg.radius)
    group = int(py.groups.shape[1])
    grid_queries = max(1, shapes.chunk // group ** 2) * group ** 2

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "platform": args.platform, "program": args.program, "dtype": args.dtype,
        "precision": args.precision, "remat_decoder": int(args.remat_decoder),
        "s2d_min_kernel": int(args.s2d_min_kernel),
        "devices": args.devices, "tiny": bool(args.tiny),
        "shapes": dataclasses.asdict(shapes),
        "model": {"encoder": cfg.encoder, "dim": cfg.dim, "conv": stage_config(
            cfg, args.program).conv, "learnable_params": params},
        "ops": facts["ops"],
        "contractions": facts["contractions"],
        "unset_precision": facts["unset_precision"],
        "unset_precision_examples": facts["unset_precision_examples"],
        "f64": facts["f64"], "callbacks": facts["callbacks"],
        "custom_calls": facts["custom_calls"],
        "largest_gathers": facts["gathers"], "largest_scatters": facts["scatters"],
        "emulated_host_same_ops": same,
        "emulated_host_ops_diff": _ops_diff(facts["ops"], emulated["ops"]),
        "cost": {
            "xla_lowered": xla_lowered,
            "xla_compiled": xla_compiled,
            "xla_cpu_memory_per_device": memory,
            "cost_program": {"platform": "cpu", "conv_impl": "xla", "fft_min_kernel": 0,
                             "ops_diff_vs_target": _ops_diff(facts["ops"], cpu_facts["ops"])},
            "nominal_flops": _nominal_flops(args.program, cfg, shapes, grid_queries),
            "stablehlo_flops": sum(v["flops"] for v in totals.values()),
            "stablehlo_bytes_fused": sum(v["bytes_fused"] for v in totals.values()),
            "stablehlo_bytes_unfused": sum(v["bytes_unfused"] for v in totals.values()),
        },
        "by_kind": totals,
        "while_loops_counted_once": walk["while_loops"],
        "predictions": preds,
        "bottlenecks_tpu_v5e": bottlenecks(ops, CHIPS["tpu_v5e"]),
        "op_groups_tpu_v5e": bottlenecks(ops, CHIPS["tpu_v5e"], top=12),
        "peaks": {k: dataclasses.asdict(c) | {"vector_flops": c.vector_flops}
                  for k, c in CHIPS.items()},
        "assumptions": {
            "tpu_f32_passes": {"highest": 6, "high": 3, "default": 1},
            "h100_f32": {"highest": "FP32 CUDA cores", "high": "TF32", "default": "TF32"},
            "tpu_vector_fraction_of_bf16_peak": TPU_VECTOR_FRACTION,
            "fused_model": "elementwise and layout ops fused away (no HBM bytes); "
                           "contractions, gathers, scatters, reduces read operands and "
                           "write results",
            "one_chip": "one chip runs the whole program at the global batch",
        },
        "timings": timings,
    }
    if train:
        step = preds["tpu_v5e"]["predicted_s"]
        per_chip = sorted({max(1, shapes.batch // args.devices), shapes.batch})
        reductions = _batch_reductions(mlir, shapes.batch)
        report["scaling_v5e"] = {
            "ici_bytes_s": V5E_ICI_BYTES_S,
            "model": "weak scaling, ring all-reduce of f32 gradients, not overlapped",
            "batch_reductions": reductions,
            "small_allreduce_s_assumed": SMALL_ALLREDUCE_S,
            "per_chip_batch": [scaling(step, shapes.batch, params, b, reductions)
                               for b in per_chip],
        }
    failures = []
    if not same:
        failures.append(f"emulated host lowering differs: {report['emulated_host_ops_diff']}")
    if args.precision == "highest" and facts["unset_precision"]:
        failures.append(f"{facts['unset_precision']} contraction(s) without a precision: "
                        f"{facts['unset_precision_examples'][:2]}")
    report["failures"] = failures
    report["ok"] = not failures
    return report, mlir


def _batch_reductions(mlir: str, batch: int) -> int:
    """Reduces over the batch dimension of a batch-leading tensor: each is a small
    cross-device all-reduce once the batch is sharded (synchronous BatchNorm
    statistics, the loss)."""
    n = 0
    for line in mlir.splitlines():
        if "stablehlo.reduce(" not in line:
            continue
        m = re.search(r"across dimensions = \[([0-9, ]*)\]", line)
        ops, _, _ = _signature(line)
        if m and ops and ops[0].dims[:1] == (batch,) and "0" in m.group(1).split(", "):
            n += 1
    return n


def summary(r: dict) -> str:
    """A readable account of a report."""
    from msit_jax.lowering import compute_ops

    lines = [f"{r['program']} for {r['platform']} ({r['dtype']}, precision {r['precision']}, "
             f"{r['devices']} devices, shapes {r['shapes']})",
             f"  learnable parameters: {r['model']['learnable_params']:,}",
             "  ops: " + ", ".join(f"{k} {v}" for k, v in sorted(
                 compute_ops(r["ops"]).items(), key=lambda kv: -kv[1])),
             f"  contractions: {r['contractions']}  (without a precision: "
             f"{r['unset_precision']})",
             f"  f64: {r['f64']}  host callbacks: {r['callbacks'] or 'none'}",
             "  largest gathers: " + "; ".join(g["type"] for g in r["largest_gathers"][:3]),
             f"  emulated {r['platform']} host, same ops: {r['emulated_host_same_ops']}"]
    c = r["cost"]
    lines.append(f"  FLOPs: nominal {c['nominal_flops'] / 1e9:,.1f} G, StableHLO "
                 f"{c['stablehlo_flops'] / 1e9:,.1f} G"
                 + (f", XLA (unfused, global) {c['xla_lowered']['flops'] / 1e9:,.1f} G"
                    if c["xla_lowered"] else ""))
    lines.append(f"  bytes: StableHLO fused {c['stablehlo_bytes_fused'] / 1e9:,.1f} GB, "
                 f"unfused {c['stablehlo_bytes_unfused'] / 1e9:,.1f} GB"
                 + (f", XLA:CPU compiled x{c['xla_compiled']['devices']} "
                    f"{c['xla_compiled']['global_bytes_accessed'] / 1e9:,.1f} GB"
                    if c["xla_compiled"] else ""))
    lines.append("  predicted time, one chip, whole program (roofline, not a measurement;"
                 " [overall bound .. unfused], full-MXU figure, share memory-bound):")
    for key, p in r["predictions"].items():
        kinds = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in p["by_kind_s"].items())
        fits = p.get("fits_hbm_estimate")
        lines.append(f"    {CHIPS[key].name:9s} {p['predicted_s'] * 1e3:9.2f} ms  "
                     f"[{p['lower_bound_s'] * 1e3:.2f} .. {p['upper_bound_s'] * 1e3:.2f}]  "
                     f"full MXU {p['no_tile_padding_s'] * 1e3:.2f}  "
                     f"memory-bound {p['memory_bound_share']:.0%}"
                     + ("" if fits is None else f"  fits HBM: {'yes' if fits else 'no'}")
                     + f"\n              by kind (ms): {kinds}")
    lines.append("  largest predicted bottlenecks on TPU v5e:")
    for i, b in enumerate(r["bottlenecks_tpu_v5e"], 1):
        lines.append(f"    {i}. {b['part']} [{b['kind']}] {b['time_s'] * 1e3:.2f} ms "
                     f"({b['share']:.0%}; fwd {b['fwd_s'] * 1e3:.2f}, bwd {b['bwd_s'] * 1e3:.2f};"
                     f" {b['bound']}-bound, {b['ops']} ops; largest {b['largest']})")
    if "scaling_v5e" in r:
        for s in r["scaling_v5e"]["per_chip_batch"]:
            eff = ", ".join(f"{row['chips']}: {row['efficiency']:.1%} "
                            f"({row['efficiency_with_sync']:.1%})" for row in s["rows"])
            lines.append(f"  v5e weak scaling at {s['per_chip_batch']}/chip "
                         f"({s['gradient_bytes'] / 1e6:.1f} MB gradients; in brackets with "
                         f"{r['scaling_v5e']['batch_reductions']} BatchNorm sync all-reduces): "
                         f"{eff}")
    for f in r["failures"]:
        lines.append(f"  FAILED: {f}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--platform", required=True, choices=PLATFORMS)
    ap.add_argument("--program", required=True, choices=PROGRAMS)
    ap.add_argument("--dtype", required=True, choices=DTYPES)
    ap.add_argument("--precision", default="highest", choices=PRECISIONS)
    ap.add_argument("--devices", type=int, default=8,
                    help="virtual CPU devices the train step is sharded over (default 8)")
    ap.add_argument("--mlir", help="write the StableHLO text here")
    ap.add_argument("--json", required=True, help="write the report here")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip compiling for CPU (XLA's fused bytes and memory figures)")
    ap.add_argument("--remat_decoder", type=int, default=0,
                    help="runtime.remat_decoder: the per-query decoder in chunks of this many "
                         "queries, recomputed in the backward (memory for time; 0: off)")
    ap.add_argument("--s2d_min_kernel", type=int, default=0,
                    help="runtime.s2d_min_kernel: multi-scale convs with kernels at least "
                         "this large on 4x4 pixel blocks (0: never)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny model and shapes (batch 8, LR 12, 64 queries; for tests)")
    args = ap.parse_args(argv)
    if args.devices < 1:
        ap.error(f"--devices must be >= 1, got {args.devices}")
    batch = 8 if args.tiny else 32
    if args.program.startswith("train") and batch % args.devices:
        ap.error(f"--devices {args.devices} does not divide the global batch {batch}")
    return args


def _set_device_count(n: int) -> None:
    """Virtual CPU devices: XLA reads the flag once, when jax initialises."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if "jax" not in sys.modules:
        _set_device_count(args.devices)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    report, mlir = build_report(args)
    if args.mlir:
        with open(args.mlir, "w") as f:
            f.write(mlir)
    print(summary(report))
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
