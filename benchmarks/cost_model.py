"""The lowering report's cost model: per-op FLOPs and bytes of a StableHLO
program, a roofline per chip from published peak rates, the bottlenecks, and a
data-parallel scaling estimate.

    ops, facts = op_costs(exported.mlir_module())     # text or a parsed module
    roofline(ops, CHIPS["tpu_v5e"])["predicted_s"]

The program is read through `msit_jax.hlo` (jaxlib's MLIR bindings), like the
lowering checks. These are predictions, not measurements; `benchmarks.lower`
writes them into its report.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable, Optional, Sequence

from msit_jax import hlo

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


# --- StableHLO program -> per-op costs ---------------------------------------------

CONTRACTIONS = hlo.CONTRACTIONS
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
NOT_COUNTED = ("constant", "return", "case", "if", "while", "partition_id", "replica_id",
               "sharding_constraint")
SCALAR_REGION_OPS = hlo.SCALAR_REGION_OPS
KIND_CLASSES = ("dot_general", "convolution", "gather", "scatter", "fft", "reduce",
                "elementwise/other")
Tensor = hlo.Tensor


@dataclasses.dataclass
class OpCost:
    """One executed StableHLO op.

    kind: op name ('dot_general', 'add', ...); name: JAX name stack of its
    source; flops; bytes_fused: HBM bytes if fusible ops are fused away;
    bytes_unfused: operands + results; operand_dtype / precision: of contractions;
    result: the (first) result's type, 'f32[4,16]'; mxu_k / mxu_n: the contracted
    and output-feature sizes a contraction fills a 128x128 MXU tile with.
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


def _nbytes(ts: Iterable[Tensor]) -> int:
    return sum(t.nbytes for t in ts)


def _dot_flops(op, operands: list[Tensor], result: Tensor) -> tuple[float, int, int]:
    """(FLOPs, contracted size K, output-feature size N) of a dot_general: 2 x
    result elements x K (K = 1 for an outer product). N is the larger free size of
    the two operands (the one XLA would lay along the MXU's columns; an
    optimistic mapping)."""
    if len(operands) < 2:
        return 0.0, 0, 0
    lhs, rhs = operands[0], operands[1]
    lc, rc, lb, rb = hlo.dot_dimensions(op)
    k = math.prod(lhs.dims[d] for d in lc if d < len(lhs.dims))

    def free(t: Tensor, skip: set) -> int:
        return math.prod(n for i, n in enumerate(t.dims) if i not in skip)

    n = max(free(lhs, set(lc) | set(lb)), free(rhs, set(rc) | set(rb)))
    return 2.0 * result.elements * k, k, n


def _conv_flops(op, operands: list[Tensor], result: Tensor) -> tuple[float, int, int]:
    """(FLOPs, K, N) of a convolution: 2 x result elements x K, K = kernel window x
    kernel input features (also right for feature- and batch-grouped
    convolutions, whose kernel 'i' dim is per group); N = kernel output features
    (per group). K counts the window as contracted (taps folded into the MXU's
    rows): an optimistic mapping."""
    if len(operands) < 2:
        return 0.0, 0, 0
    kernel = operands[1]
    o = hlo.conv_kernel_output_dimension(op)
    per_output = math.prod(n for i, n in enumerate(kernel.dims) if i != o)
    n = kernel.dims[o] // max(1, (hlo.ints(op, "feature_group_count") or [1])[0])
    return 2.0 * result.elements * per_output, per_output, max(n, 1)


def _op_cost(kind: str, op, name: str) -> Optional[OpCost]:
    """The cost of one op from its types and attributes."""
    if kind in NOT_COUNTED:
        return None
    operands, results = hlo.operands(op), hlo.results(op)
    if not results:
        return None
    result = results[0]
    out_bytes = _nbytes(results)
    unfused = _nbytes(operands) + out_bytes
    if kind in CONTRACTIONS:
        flops, k, n = (_dot_flops if kind != "convolution" else _conv_flops)(
            op, operands, result)
        floats = [t.dtype for t in operands if t.dtype.startswith(("f", "bf"))]
        widest = max(floats, key=lambda d: hlo.ELEMENT_BYTES.get(d, 4)) if floats else "f32"
        precs = hlo.precisions(op)
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
        length = hlo.ints(op, "fft_length")
        size = math.prod(length) if length else n
        return OpCost(kind, name, 5.0 * n * math.log2(max(size, 2)), unfused, unfused,
                      result=_type_text(result))
    if kind in MATERIALISED:
        flops = float(sum(t.elements for t in operands)) if kind != "custom_call" else 0.0
        return OpCost(kind, name, flops, unfused, unfused, result=_type_text(result))
    flops = 0.0 if kind in LAYOUT else float(result.elements)
    return OpCost(kind, name, flops, 0.0, unfused, result=_type_text(result))


def _type_text(t: Tensor) -> str:
    return f"{t.dtype}[{','.join(map(str, t.dims))}]"


def _weight(items: list) -> float:
    return sum(i.flops + i.bytes_fused for i in items if isinstance(i, OpCost))


def _region_items(ops: Iterable) -> list:
    """The costs of a region's ops, in order: OpCost, or ('call', callee, call-site
    name) for a func.call. Of a `case`/`if` only the costliest branch counts; both
    regions of a `while` count once; scalar bodies count as their op."""
    items: list = []
    for op in ops:
        target = hlo.callee(op)
        if target is not None:
            items.append(("call", target, hlo.location_name(op)))
            continue
        kind = hlo.kind(op)
        if kind is None:
            continue
        if op.regions and kind not in SCALAR_REGION_OPS:
            regions = [_region_items(hlo.block_ops(r)) for r in op.regions]
            if kind in ("case", "if"):
                items.extend(max(regions, key=_weight))
            else:
                for region in regions:
                    items.extend(region)
        cost = _op_cost(kind, op, hlo.location_name(op))
        if cost:
            items.append(cost)
    return items


def op_costs(program: hlo.Program) -> tuple[list[OpCost], dict]:
    """Every op `main` executes (private functions expanded at each call), with
    its cost; and facts about the walk. Of a `case`/`if` only the costliest
    branch counts; a `while` body counts once ('while_loops': the number of
    while ops in the program; their trip count is not known here)."""
    module = hlo.parse(program)
    funcs = {name: _region_items(hlo.block_ops(f.regions[0]))
             for name, f in hlo.functions(module).items()}
    facts = {"while_loops": sum(hlo.kind(op) == "while"
                                for op in hlo.walk(module, scalar_bodies=True))}
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


def batch_reductions(program: hlo.Program, batch: int) -> int:
    """Reduces over the batch dimension of a batch-leading tensor: each is a small
    cross-device all-reduce once the batch is sharded (synchronous BatchNorm
    statistics, the loss)."""
    n = 0
    for op in hlo.walk(hlo.parse(program), scalar_bodies=True):
        if hlo.kind(op) != "reduce":
            continue
        args = hlo.operands(op)
        if args and args[0].dims[:1] == (batch,) and 0 in (hlo.ints(op, "dimensions") or []):
            n += 1
    return n


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
