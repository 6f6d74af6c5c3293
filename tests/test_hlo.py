"""msit_jax.hlo, the one StableHLO reader: the op walk, types, precisions,
custom_call targets, nested regions and locations, on tiny jitted functions
whose programs are known."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msit_jax import hlo
from msit_jax.lowering import analyse

X = jax.ShapeDtypeStruct((4, 8), jnp.float32)
Y = jax.ShapeDtypeStruct((8, 16), jnp.float32)


def _two_dots(x, y):
    hi = jax.lax.dot(x, y, precision=jax.lax.Precision.HIGHEST)
    lo = jnp.dot(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
    return (hi + lo.astype(jnp.float32)).sum(axis=0)


def _kinds(module, **kw) -> collections.Counter:
    return collections.Counter(k for k in map(hlo.kind, hlo.walk(module, **kw)) if k)


def test_walk_counts_ops_types_and_precisions():
    module = jax.jit(_two_dots).lower(X, Y).compiler_ir("stablehlo")
    kinds = _kinds(module)
    assert kinds["dot_general"] == 2 and kinds["convert"] == 3 and kinds["reduce"] == 1
    dots = [op for op in hlo.walk(module) if hlo.kind(op) == "dot_general"]
    assert [hlo.precisions(op) for op in dots] == [["HIGHEST", "HIGHEST"],
                                                   ["DEFAULT", "DEFAULT"]]
    assert [t.dtype for t in hlo.operands(dots[1])] == ["bf16", "bf16"]
    (res,) = hlo.results(dots[1])
    assert (res.dims, res.dtype, res.elements, res.nbytes) == ((4, 16), "bf16", 64, 128)
    assert hlo.result_type_text(dots[1]) == "tensor<4x16xbf16>"
    assert hlo.dot_dimensions(dots[0]) == ([1], [0], [], [])
    assert hlo.element_types(module) == {"f32", "bf16"}
    # The reduce's scalar body (add, return) is its op's, walked only on request.
    assert kinds["add"] == 1
    assert _kinds(module, scalar_bodies=True)["add"] == 2
    facts = analyse(module)
    assert facts["contractions"] == {"dot_general:DEFAULT": 1, "dot_general:HIGHEST": 1}
    assert facts["unset_precision"] == 0 and facts["mixed_operands"] == 0
    assert facts["f64"] is False and facts["callbacks"] == []


def test_text_parses_to_the_same_program():
    lowered = jax.jit(_two_dots).lower(X, Y)
    from_text = hlo.parse(lowered.as_text())
    assert _kinds(from_text) == _kinds(lowered.compiler_ir("stablehlo"))
    assert list(hlo.functions(from_text)) == ["main"]


def test_nested_regions_calls_and_locations():
    """A while body calling a function, a two-branch case: the walk enters both."""

    def f(x, y, i):
        def body(_, a):
            return jnp.tanh(a @ y[:, :8])

        a = jax.lax.fori_loop(0, 3, body, x)
        return jax.lax.cond(i > 0, lambda: jnp.exp(a), lambda: jnp.sin(a) * 2)

    i = jax.ShapeDtypeStruct((), jnp.int32)
    text = jax.jit(f).lower(jax.ShapeDtypeStruct((4, 8), jnp.float32), Y, i).as_text(
        debug_info=True)
    module = hlo.parse(text)
    kinds = _kinds(module)
    assert kinds["while"] == 1 and kinds["case"] == 1
    assert kinds["exponential"] == 1 and kinds["sine"] == 1  # one in each branch
    assert kinds["dot_general"] == 1 and kinds["tanh"] == 1  # in the while body
    (case,) = [op for op in hlo.walk(module) if hlo.kind(op) == "case"]
    assert len(case.regions) == 2
    (loop,) = [op for op in hlo.walk(module) if hlo.kind(op) == "while"]
    # The body's ops, those of the functions it calls included.
    funcs = hlo.functions(module)
    inside = [op for op in hlo.walk(loop)]
    inside += [o for op in inside if hlo.callee(op) for o in hlo.walk(funcs[hlo.callee(op)])]
    assert {"dot_general", "tanh"} <= {hlo.kind(op) for op in inside}
    # Locations: the call site carries the name stack, the called function's ops
    # their primitive only.
    call = next(op for op in hlo.walk(loop) if hlo.callee(op))
    assert hlo.location_name(call).startswith("jit(f)/while/body")
    dot = next(op for op in hlo.walk(module) if hlo.kind(op) == "dot_general")
    assert hlo.location_name(dot) == "dot_general"
    calls = [hlo.callee(op) for op in hlo.walk(module) if hlo.callee(op)]
    assert all(c in hlo.functions(module) for c in calls)


def test_custom_call_targets_and_callbacks():
    def f(x):
        y = jax.pure_callback(lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype),
                              x)
        return y + 1

    module = jax.jit(f).lower(jax.ShapeDtypeStruct((3,), jnp.float32)).compiler_ir("stablehlo")
    targets = [hlo.custom_call_target(op) for op in hlo.walk(module)
               if hlo.kind(op) == "custom_call"]
    assert len(targets) == 1 and "callback" in targets[0]
    facts = analyse(module)
    assert facts["callbacks"] == targets and facts["custom_calls"] == targets


def test_f64_and_unset_precision_are_found():
    with jax.enable_x64(True):
        module = hlo.parse(jax.jit(lambda x: x.astype(jnp.float64) * 2).lower(
            jax.ShapeDtypeStruct((3,), jnp.float32)).as_text())
    assert analyse(module)["f64"] is True
    text = """
module {
  func.func public @main(%a: tensor<4x8xf32>, %b: tensor<8x16xbf16>) -> tensor<4x16xf32> {
    %0 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0] : (tensor<4x8xf32>, tensor<8x16xbf16>) -> tensor<4x16xf32>
    return %0 : tensor<4x16xf32>
  }
}
"""
    facts = analyse(text)
    assert facts["contractions"] == {"dot_general:none": 1}
    assert facts["unset_precision"] == 1 and facts["mixed_operands"] == 1
    assert facts["unset_precision_examples"][0].startswith("%0 = stablehlo.dot_general")


@pytest.mark.parametrize("loc,name", [
    ('loc("jit(f)/dot_general"(callsite("f"("a/b.py":7:8) at "<module>"("a/b.py":9:6))))',
     "jit(f)/dot_general"),
    ('loc(callsite("relu" at "jit(f)/act/relu"("f.py":1:1)))', "jit(f)/act/relu"),
    ('loc("mul"("f.<locals>.<lambda>"("x.py":8:48)))', "mul"),
    ('loc("x.py":3:1)', ""),
])
def test_location_names(loc, name):
    text = ('module {\n  func.func @main(%a: tensor<f32>) -> tensor<f32> {\n'
            f'    %0 = stablehlo.negate %a : tensor<f32> {loc}\n'
            '    return %0 : tensor<f32>\n  }\n}\n')
    op = next(op for op in hlo.walk(hlo.parse(text)) if hlo.kind(op) == "negate")
    assert hlo.location_name(op) == name
