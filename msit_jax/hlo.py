"""Read StableHLO programs through jaxlib's MLIR bindings: the one op walker.

    module = parse(exported.mlir_module())      # or jax.jit(f).lower(x).compiler_ir()
    for op in walk(module):
        kind(op), results(op), precisions(op), location_name(op)

The lowering checks (`msit_jax.lowering.analyse`), the lowering report's cost
model (`benchmarks/cost_model.py`) and the tests read programs through this
module only. It imports jax and jaxlib, nothing of Flax or the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional, Union

from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.mlir import ir
from jaxlib.mlir.dialects import stablehlo

# Ops of these dialects are the program's; func.*, sdy.* etc. are structure.
DIALECTS = ("stablehlo", "chlo", "mhlo")
CONTRACTIONS = ("dot_general", "dot", "convolution")
# Ops whose regions are scalar bodies applied per element (the op's own cost;
# their ops are not the program's ops).
SCALAR_REGION_OPS = ("reduce", "scatter", "select_and_scatter", "reduce_window", "sort",
                     "all_reduce", "reduce_scatter", "map")
ELEMENT_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "ui64": 8, "i32": 4,
                 "ui32": 4, "i16": 2, "ui16": 2, "i8": 1, "ui8": 1, "i1": 1, "f8E4M3FN": 1,
                 "f8E5M2": 1, "complex<f32>": 8, "complex<f64>": 16}

Program = Union[str, bytes, ir.Module, ir.Operation]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A ranked tensor type: dims (a dynamic dim counts as 1, `dynamic` set),
    element type as StableHLO writes it ('f32', 'bf16', 'complex<f32>', 'i1')."""

    dims: tuple[int, ...]
    dtype: str
    dynamic: bool = False

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        # Unknown element types (index, tokens' payloads) as 4 bytes.
        return self.elements * ELEMENT_BYTES.get(self.dtype, 4)


def parse(program: Program) -> ir.Operation:
    """The module operation of a program: StableHLO text or bytecode (parsed in a
    context with JAX's dialects registered) or an already parsed module."""
    if isinstance(program, ir.Operation):
        return program
    if isinstance(program, ir.Module):
        return program.operation
    module = ir.Module.parse(program, context=jax_mlir.make_ir_context())
    return module.operation


def _op(op) -> ir.Operation:
    """An OpView or Operation as an Operation."""
    return op.operation if not isinstance(op, ir.Operation) else op


def walk(root: Program, scalar_bodies: bool = False) -> Iterator[ir.Operation]:
    """Every op nested in `root`, pre-order (an op before the ops of its regions);
    the ops of scalar bodies (SCALAR_REGION_OPS' regions) only if `scalar_bodies`."""
    for region in parse(root).regions:
        for block in region.blocks:
            for op in block.operations:
                op = _op(op)
                yield op
                if op.regions and (scalar_bodies or kind(op) not in SCALAR_REGION_OPS):
                    yield from walk(op, scalar_bodies)


def block_ops(region: ir.Region) -> Iterator[ir.Operation]:
    """The ops directly in a region's blocks (not nested deeper)."""
    for block in region.blocks:
        for op in block.operations:
            yield _op(op)


def kind(op: ir.Operation) -> Optional[str]:
    """'dot_general' for stablehlo.dot_general (likewise chlo / mhlo ops); None for
    ops of other dialects (func.call, func.return, sdy.*)."""
    dialect, _, name = op.name.partition(".")
    return name if dialect in DIALECTS else None


def functions(module: Program) -> dict[str, ir.Operation]:
    """The module's func.func ops by symbol name."""
    out = {}
    for region in parse(module).regions:
        for op in block_ops(region):
            if op.name == "func.func":
                out[ir.StringAttr(op.attributes["sym_name"]).value] = op
    return out


def callee(op: ir.Operation) -> Optional[str]:
    """The function a func.call calls; None for other ops."""
    if op.name != "func.call":
        return None
    return ir.FlatSymbolRefAttr(op.attributes["callee"]).value


def tensor(ty: ir.Type) -> Optional[Tensor]:
    """A ranked tensor type as a Tensor; None for other types (tokens, tuples)."""
    if not isinstance(ty, ir.RankedTensorType):
        return None
    dims = [int(d) for d in ty.shape]
    dynamic = any(ir.ShapedType.is_dynamic_size(d) for d in dims)
    dims = [1 if ir.ShapedType.is_dynamic_size(d) else d for d in dims]
    return Tensor(tuple(dims), str(ty.element_type), dynamic)


def _tensors(values) -> list[Tensor]:
    return [t for t in (tensor(v.type) for v in values) if t is not None]


def operands(op: ir.Operation) -> list[Tensor]:
    """The types of an op's tensor operands, in order."""
    return _tensors(op.operands)


def results(op: ir.Operation) -> list[Tensor]:
    """The types of an op's tensor results, in order."""
    return _tensors(op.results)


def result_type_text(op: ir.Operation) -> str:
    """The first result's type as written, 'tensor<8x64xbf16>'; '' without results."""
    return str(op.results[0].type) if len(op.results) else ""


def element_types(module: Program) -> set[str]:
    """Every element type of any value in the program (op results, operands and
    block arguments, scalar bodies included)."""
    seen: set[str] = set()
    for op in walk(module, scalar_bodies=True):
        seen.update(t.dtype for t in results(op) + operands(op))
        for region in op.regions:
            for block in region.blocks:
                seen.update(t.dtype for t in _tensors(block.arguments))
    return seen


def precisions(op: ir.Operation) -> list[str]:
    """A contraction's precision_config ('HIGHEST' | 'HIGH' | 'DEFAULT' per
    operand); [] where the op carries none."""
    if "precision_config" not in op.attributes:
        return []
    return [stablehlo.PrecisionAttr(a).value for a in op.attributes["precision_config"]]


def custom_call_target(op: ir.Operation) -> Optional[str]:
    """A custom_call's call_target_name; None for other ops."""
    if kind(op) != "custom_call":
        return None
    return ir.StringAttr(op.attributes["call_target_name"]).value


def ints(op: ir.Operation, name: str) -> Optional[list[int]]:
    """An integer or integer-array attribute as a list; None if absent."""
    if name not in op.attributes:
        return None
    attr = op.attributes[name]
    if isinstance(attr, ir.IntegerAttr):
        return [attr.value]
    return [int(x) for x in attr]


def dot_dimensions(op: ir.Operation) -> tuple[list[int], list[int], list[int], list[int]]:
    """(lhs contracting, rhs contracting, lhs batching, rhs batching) dims of a
    dot_general; a legacy dot contracts lhs's last dim with rhs's first."""
    if kind(op) == "dot":
        return [len(operands(op)[0].dims) - 1], [0], [], []
    d = stablehlo.DotDimensionNumbers(op.attributes["dot_dimension_numbers"])
    return (list(d.lhs_contracting_dimensions), list(d.rhs_contracting_dimensions),
            list(d.lhs_batching_dimensions), list(d.rhs_batching_dimensions))


def conv_kernel_output_dimension(op: ir.Operation) -> int:
    """The kernel's output-feature dim of a convolution ('o' of [0, 1, i, o])."""
    d = stablehlo.ConvDimensionNumbers(op.attributes["dimension_numbers"])
    return int(d.kernel_output_feature_dimension)


def location_name(op: ir.Operation) -> str:
    """The JAX name stack of an op's source ('jit(f)/jvp(MSIT)/.../dot_general'):
    the first named location holding a '/', else the first name, else ''.

    The bindings expose a location only as its printed form, `loc("name"(...))`,
    `callsite(A at B)`, `fused[...]`, `"file.py":3:1`: quoted strings followed by
    ':' are file names, the others names."""
    text = str(op.location)
    names, i = [], 0
    while True:
        i = text.find('"', i)
        if i < 0:
            break
        j, chars = i + 1, []
        while j < len(text) and text[j] != '"':
            if text[j] == "\\" and j + 1 < len(text):
                j += 1
            chars.append(text[j])
            j += 1
        i = j + 1
        if text[i:i + 1] != ":":
            names.append("".join(chars))
    return next((n for n in names if "/" in n), names[0] if names else "")


def op_text(op: ir.Operation, limit: int = 200) -> str:
    """An op as StableHLO text on one line (no locations, no regions), cut to
    `limit` characters: for examples in reports."""
    text = op.get_asm(enable_debug_info=False, large_elements_limit=16, skip_regions=True)
    return " ".join(text.split())[:limit]
