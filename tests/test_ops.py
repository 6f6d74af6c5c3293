"""msit_jax.ops: per-platform conv kernels, forward mode, f32-accumulating contractions.

The CPU kernel-gradient methods must equal XLA's own rule (the accelerator
branch, reference autodiff), forward-mode autodiff must work through them, and
lowering for another platform must pick that platform's branch.
"""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the PyTorch reference (requirements-torch.txt)
import torch.nn.functional as F  # noqa: E402

from msit_jax import ops
from msit_jax.ops.conv import lax_conv

HI = jax.lax.Precision.HIGHEST
rng = np.random.RandomState(0)

# (k, cin, cout, groups) -> the CPU kernel-gradient method it reaches.
CASES = [
    ((1, 32, 64, 1), "dense"), ((1, 32, 64, 16), "dense"), ((1, 32, 64, 8), "dense"),
    ((3, 128, 128, 1), "xla"), ((3, 8, 8, 1), "xla"), ((5, 6, 6, 1), "shifts"),
    ((7, 8, 8, 1), "shifts"),
    ((9, 4, 4, 1), "fft"), ((13, 4, 4, 1), "fft"), ((33, 4, 4, 1), "fft"),
    ((5, 40, 40, 1), "xla"), ((3, 8, 16, 2), "xla"),
]


def _params(cases) -> list:
    """CASES as pytest params with ids from the case itself ('k7-8to8-g1-shifts'), so an
    id (tests/conftest.py SLOW_TESTS names some) does not move when a case is added."""
    return [pytest.param(s, m, id=f"k{s[0]}-{s[1]}to{s[2]}-g{s[3]}-{m}") for s, m in cases]


def _pair(k, cin, cout, groups, h=11, w=9):
    x = jnp.asarray(rng.randn(2, h, w, cin).astype(np.float32))
    wt = jnp.asarray(rng.randn(k, k, cin // groups, cout).astype(np.float32))
    return x, wt


def _op_counts(fn, args, platform):
    text = jax.export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()
    return Counter(re.findall(r"stablehlo\.([a-z_]+)", text))


@pytest.mark.parametrize("shape,method", _params(CASES))
def test_kernel_gradient_methods_match_reference_autodiff(shape, method):
    """Every CPU method gives XLA's gradients (input and kernel); so does impl='xla'."""
    k, cin, cout, groups = shape
    assert ops.cpu_kernel_method((k, k, cin // groups, cout), cin, groups, k // 2) == method
    x, w = _pair(*shape)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(lax_conv(x, w, groups, k // 2, HI))),
                   argnums=(0, 1))(x, w)
    for impl in ops.conv.CONV_IMPLS:
        ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(
            ops.conv2d(x, w, None, groups=groups, precision=HI, impl=impl))), argnums=(0, 1))(x, w)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                       atol=2e-6 * float(jnp.abs(b).max()))


@pytest.mark.slow  # quick tier under 90 s
@pytest.mark.parametrize("shape,method", _params(CASES[::2]))
def test_forward_mode_through_conv(shape, method):
    """jax.jvp and jax.jacfwd work and equal XLA's tangents."""
    k, cin, cout, groups = shape
    x, w = _pair(*shape, h=6, w=5)
    f = lambda x, w: ops.conv2d(x, w, None, groups=groups, precision=HI)
    ref = lambda x, w: lax_conv(x, w, groups, k // 2, HI)
    dx, dw = jnp.ones_like(x) * 0.3, jnp.asarray(rng.randn(*w.shape).astype(np.float32))
    y, t = jax.jvp(f, (x, w), (dx, dw))
    y_ref, t_ref = jax.jvp(ref, (x, w), (dx, dw))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(t), np.asarray(t_ref), rtol=0,
                               atol=2e-6 * float(jnp.abs(t_ref).max()))
    # jacfwd along a 2-D family of kernels and inputs
    along = lambda conv: (lambda c: jnp.sum(conv(x + c[0] * dx, w + c[1] * dw) ** 2))
    c0 = jnp.asarray([0.1, -0.2], jnp.float32)
    jac, jac_ref = jax.jacfwd(along(f))(c0), jax.jacfwd(along(ref))(c0)
    np.testing.assert_allclose(np.asarray(jac), np.asarray(jac_ref), rtol=0,
                               atol=2e-5 * float(jnp.abs(jac_ref).max()))


@pytest.mark.parametrize("shape,method", _params([c for c in CASES if c[1] != "xla"]))
def test_lowering_picks_the_platform_branch(shape, method):
    """Lowered for TPU or CUDA (from this CPU host), a conv's gradient is XLA's
    rule: three convolutions, no matmul, no FFT. Lowered for CPU, it is the CPU method."""
    k, cin, cout, groups = shape
    x, w = _pair(*shape)
    grad = jax.grad(lambda x, w: jnp.sum(ops.conv2d(x, w, None, groups=groups, precision=HI)
                                         ** 2), argnums=(0, 1))
    for platform in ("tpu", "cuda"):
        ops_ = _op_counts(grad, (x, w), platform)
        assert ops_["convolution"] == 3 and ops_["dot_general"] == 0 and ops_["fft"] == 0
    cpu = _op_counts(grad, (x, w), "cpu")
    assert cpu["convolution"] == 2  # forward + input gradient
    if method == "fft":
        assert cpu["fft"] > 0
    else:
        assert cpu["dot_general"] == (k * k if method == "shifts" else 1)


def test_fft_auto_is_cpu_only():
    """fft_min_kernel=-1: a 17x17 conv is an FFT product on CPU, a convolution elsewhere;
    an explicit threshold applies on every platform."""
    x, w = _pair(17, 2, 2, 1, h=20, w=20)
    auto = lambda x, w: ops.conv2d(x, w, None, precision=HI, fft_min_kernel=-1)
    assert _op_counts(auto, (x, w), "cpu")["fft"] > 0
    assert _op_counts(auto, (x, w), "tpu")["fft"] == 0
    forced = lambda x, w: ops.conv2d(x, w, None, precision=HI, fft_min_kernel=9)
    assert _op_counts(forced, (x, w), "tpu")["fft"] > 0
    never = lambda x, w: ops.conv2d(x, w, None, precision=HI, fft_min_kernel=0)
    assert _op_counts(never, (x, w), "cpu")["fft"] == 0


@pytest.mark.parametrize("k", [5, 13, 33])
def test_fft_conv_matches_torch_and_direct(k):
    """The FFT conv: the same 'same' convolution, forward (vs torch) and gradients."""
    x = jnp.asarray(rng.randn(2, 15, 12, 4).astype(np.float32))
    w = jnp.asarray(rng.randn(k, k, 4, 6).astype(np.float32) / k)
    b = jnp.asarray(rng.randn(6).astype(np.float32))
    ref = F.conv2d(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                   torch.from_numpy(np.transpose(np.asarray(w), (3, 2, 0, 1)).copy()),
                   torch.from_numpy(np.array(b)), padding=k // 2)
    ref = ref.numpy().transpose(0, 2, 3, 1)
    out = ops.conv2d(x, w, b, precision=HI, fft_min_kernel=1)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * float(np.abs(ref).max()))
    loss = lambda fft: (lambda x, w: jnp.sum(jnp.sin(ops.conv2d(x, w, b, precision=HI,
                                                                fft_min_kernel=fft))))
    for a, r in zip(jax.grad(loss(1), argnums=(0, 1))(x, w),
                    jax.grad(loss(0), argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0,
                                   atol=2e-6 * float(jnp.abs(r).max()))


def test_fft_lengths_are_smooth_and_precise():
    assert [ops.smooth_size(n) for n in (1, 7, 74, 82, 94, 97, 128)] == [1, 8, 75, 90, 96, 100, 128]
    for n in range(1, 300):
        m = ops.smooth_size(n)
        assert m >= n and all(ops.smooth_size(j) == m for j in range(n, m + 1))
    # 48 + 17 - 1 = 64 is already smooth; 47 + 33 - 1 = 79 is prime -> 80.
    x, w = _pair(33, 2, 2, 1, h=47, w=47)
    text = jax.export.export(jax.jit(lambda x, w: ops.conv2d_fft(x, w, HI)),
                             platforms=("tpu",))(x, w).mlir_module()
    lengths = set(re.findall(r"stablehlo\.fft .*length = \[(\d+), (\d+)\]", text))
    assert lengths == {("80", "80")}
    dots = [l for l in text.splitlines() if "stablehlo.dot_general" in l]
    assert dots and all("HIGHEST" in l for l in dots)


def test_bf16_contractions_accumulate_in_f32_on_cpu():
    """ops.einsum of bf16 operands returns float32 on CPU (the upcast branch) and
    is exactly the float32 einsum of the bf16 values; lowered for TPU it is one
    bf16 x bf16 -> f32 dot_general."""
    a = jnp.asarray(rng.randn(6, 64).astype(np.float32)).astype(jnp.bfloat16)
    b = jnp.asarray(rng.randn(64, 5).astype(np.float32)).astype(jnp.bfloat16)
    out = jax.jit(lambda a, b: ops.einsum("ik,kn->in", a, b, HI))(a, b)
    assert out.dtype == jnp.float32
    ref = np.asarray(a, np.float32).astype(np.float64) @ np.asarray(b, np.float32).astype(np.float64)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-5)
    text = jax.export.export(jax.jit(lambda a, b: ops.dot(a, b, HI)),
                             platforms=("tpu",))(a, b).mlir_module()
    dots = [l for l in text.splitlines() if "stablehlo.dot_general" in l]
    assert len(dots) == 1 and "tensor<6x64xbf16>" in dots[0] and "-> tensor<6x5xf32>" in dots[0]
    # float32 operands: no platform branch at all.
    f32 = jax.jit(lambda a, b: ops.dot(a, b, HI)).lower(a.astype(jnp.float32),
                                                        b.astype(jnp.float32)).as_text()
    assert "case" not in f32


# --- backward of low-precision contractions (bf16 cotangents) --------------------------

LOW_SPECS = (("ik,kn->in", (6, 64), (64, 5)),
             # the attention forms (SwinIR, the decoder): slow tier, the quick tier keeps one
             pytest.param("bwqhd,bwkhd->bwhqk", (2, 3, 16, 2, 8), (2, 3, 16, 2, 8),
                          marks=pytest.mark.slow),
             pytest.param("hc,khc->kh", (4, 32), (9, 4, 32), marks=pytest.mark.slow))


def _bf16(shape, seed):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32)
                       ).astype(jnp.bfloat16)


@pytest.mark.parametrize("spec,sa,sb", LOW_SPECS)
def test_bf16_backward_rounds_the_cotangent_once_and_accumulates_in_f32(spec, sa, sb):
    """The operand cotangents of a bf16 x bf16 contraction are the float32 contractions
    of the bf16-rounded result cotangent with the other operand, rounded to bf16:
    exactly, on CPU. Autodiff of the float32-result einsum would use the unrounded
    cotangent (so this differs from it where the cotangent has low bits)."""
    a, b = _bf16(sa, 1), _bf16(sb, 2)
    out_shape = jax.eval_shape(lambda a, b: ops.einsum(spec, a, b, HI), a, b).shape
    g = jnp.asarray(np.random.RandomState(3).randn(*out_shape).astype(np.float32))
    _, vjp = jax.vjp(lambda a, b: ops.einsum(spec, a, b, HI), a, b)
    da, db = jax.jit(vjp)(g)
    assert da.dtype == db.dtype == jnp.bfloat16

    def f32(a, b):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision=HI)

    _, ref_vjp = jax.vjp(f32, a, b)
    g_low = g.astype(jnp.bfloat16).astype(jnp.float32)
    ref_da, ref_db = (x.astype(jnp.bfloat16) for x in jax.jit(ref_vjp)(g_low))
    np.testing.assert_array_equal(np.asarray(da, np.float32), np.asarray(ref_da, np.float32))
    np.testing.assert_array_equal(np.asarray(db, np.float32), np.asarray(ref_db, np.float32))
    old_da = jax.jit(ref_vjp)(g)[0].astype(jnp.bfloat16)
    assert not np.array_equal(np.asarray(da, np.float32), np.asarray(old_da, np.float32))


def test_bf16_backward_is_within_bf16_rounding_of_the_float32_gradient():
    """Against the float32 contraction's gradient (float32 operands and cotangent), the
    bf16 gradient's error is that of bf16 operands: relative (Frobenius) <= 2^-7."""
    a32 = jnp.asarray(np.random.RandomState(4).randn(32, 256).astype(np.float32))
    b32 = jnp.asarray(np.random.RandomState(5).randn(256, 64).astype(np.float32))
    w = jnp.asarray(np.random.RandomState(6).randn(32, 64).astype(np.float32))

    def loss(a, b, dtype):
        return jnp.sum(ops.dot(a.astype(dtype), b.astype(dtype), HI) * w)

    exact = jax.grad(loss, (0, 1))(a32, b32, jnp.float32)
    low = jax.grad(loss, (0, 1))(a32, b32, jnp.bfloat16)
    for x, y in zip(exact, low):
        rel = float(jnp.linalg.norm(y - x) / jnp.linalg.norm(x))
        assert 0 < rel <= 2.0 ** -7, rel


def test_bf16_backward_lowers_to_bf16_dots_for_tpu():
    """Lowered for TPU, both backward dots take two bf16 operands and give the bf16
    operand cotangents (the MXU accumulates in float32); autodiff alone gives
    f32 x bf16 dots there."""
    a, b = _bf16((6, 64), 7), _bf16((64, 5), 8)
    w = jnp.ones((6, 5), jnp.float32)
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(ops.dot(a, b, HI) * w), (0, 1)))
    text = jax.export.export(grad, platforms=("tpu",))(a, b).mlir_module()
    sigs = re.findall(r"stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> "
                      r"(tensor<[^>]*>)", text)
    assert len(sigs) == 2, sigs  # the forward is dead in a gradient of a linear loss
    for lhs, rhs, out in sigs:
        assert lhs.endswith("bf16>") and rhs.endswith("bf16>") and out.endswith("bf16>"), sigs


def test_bf16_backward_of_a_contraction_summing_within_an_operand():
    """A spec with an index summed within one operand (i, in a alone) and a vmapped
    contraction with an unbatched operand (the per-query decoder's layers) get the same
    rounded-cotangent backward, exactly as the reference on CPU."""
    a, b = _bf16((4, 8), 9), _bf16((8, 3), 10)
    spec = "ij,jk->k"
    g = jnp.asarray(np.random.RandomState(11).randn(3).astype(np.float32))
    da = jax.vjp(lambda a: ops.einsum(spec, a, b, HI), a)[1](g)[0]

    def f32(a):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision=HI)

    g_low = g.astype(jnp.bfloat16).astype(jnp.float32)
    ref = jax.vjp(f32, a)[1](g_low)[0].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(da, np.float32), np.asarray(ref, np.float32))

    x, w = _bf16((5, 7, 8), 12), _bf16((8, 3), 13)
    gy = jnp.asarray(np.random.RandomState(14).randn(5, 7, 3).astype(np.float32))
    per_row = jax.vmap(jax.vmap(lambda r, w: ops.dot(r, w, HI), (0, None)), (0, None))
    dw = jax.vjp(lambda w: per_row(x, w), w)[1](gy)[0]
    ref_w = jax.vjp(lambda w: jnp.einsum("pqy,yz->pqz", x.astype(jnp.float32),
                                         w.astype(jnp.float32), precision=HI), w)[1](
        gy.astype(jnp.bfloat16).astype(jnp.float32))[0].astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(ref_w, np.float32),
                               rtol=2 ** -8)


def test_vmapped_bf16_backward_contracts_over_the_batch_for_tpu():
    """Under vmap with an unbatched weight (as the per-query decoder MLP), the weight's
    cotangent is one bf16 dot contracting the batch axes: no per-example outer product
    (a VJP rule under vmap would produce (P, Q, K, N) and sum it)."""
    x, w = _bf16((32, 64, 96), 15), _bf16((96, 16), 16)
    per_row = jax.vmap(jax.vmap(lambda r, w: ops.dot(r, w, HI), (0, None)), (0, None))
    grad = jax.jit(jax.grad(lambda w: jnp.sum(per_row(x, w)), 0))
    text = jax.export.export(grad, platforms=("tpu",))(w).mlir_module()
    sizes = [int(np.prod([int(d) for d in t.split("x")[:-1]]))
             for t in re.findall(r"stablehlo\.dot_general .*-> tensor<([0-9x]+[a-z0-9]+)>", text)]
    assert sizes and max(sizes) <= 32 * 64 * 96, sizes


# --- space-to-depth large-kernel convolution (ops.s2d) ---------------------------------

@pytest.mark.parametrize("k,hw", [pytest.param(3, (12, 12), marks=pytest.mark.slow),
                                  (9, (13, 10)),
                                  pytest.param(33, (7, 5), marks=pytest.mark.slow)])
def test_s2d_conv_equals_the_direct_conv(k, hw):
    """On 4x4 pixel blocks (sizes that are and are not multiples of 4, a kernel larger
    than the image): the float64 direct conv to float32 rounding, like lax's own, and
    the same gradients."""
    from msit_jax.ops.s2d import conv2d_s2d

    x = rng.randn(2, *hw, 3).astype(np.float32)
    w = rng.randn(k, k, 3, 4).astype(np.float32)
    exact = _direct_f64(x, w)
    out = np.asarray(conv2d_s2d(jnp.asarray(x), jnp.asarray(w), HI))
    ref = np.asarray(ops.lax_conv(jnp.asarray(x), jnp.asarray(w), 1, k // 2, HI))
    scale = np.abs(exact).max()
    assert np.abs(out - exact).max() <= 4 * max(np.abs(ref - exact).max(), 1e-7 * scale)
    assert np.abs(out - exact).max() <= 2e-6 * scale
    g = rng.randn(2, *hw, 4).astype(np.float32)
    d_s2d = jax.vjp(lambda x, w: conv2d_s2d(x, w, HI), jnp.asarray(x), jnp.asarray(w))[1](g)
    d_ref = jax.vjp(lambda x, w: ops.lax_conv(x, w, 1, k // 2, HI), jnp.asarray(x),
                    jnp.asarray(w))[1](g)
    for a, b in zip(d_s2d, d_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=2e-6 * float(np.abs(np.asarray(b)).max()))


def _direct_f64(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """'same' cross-correlation in float64 (numpy), the reference of the conv tests."""
    k = w.shape[0]
    p = k // 2
    b, h, wd, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
    out = np.zeros((b, h, wd, w.shape[3]))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("bhwc,co->bhwo", xp[:, dy:dy + h, dx:dx + wd], w[dy, dx])
    return out


def test_s2d_block_kernel_taps():
    """Each block-kernel entry is the weight tap at input offset s*m + a' - a, or zero."""
    from msit_jax.ops.s2d import block_kernel, block_taps

    k, s = 5, 4
    index, lo, hi = block_taps(k, s)
    assert (lo, hi) == (-1, 1) and index.shape == (3, 4, 4)
    w = rng.randn(k, k, 1, 1).astype(np.float32)
    kk = np.asarray(block_kernel(jnp.asarray(w), s)).reshape(3, 3, s, s, s, s)  # m n a' b' a b
    for m in range(3):
        for ai in range(s):
            for ao in range(s):
                dy = s * (m + lo) + ai - ao
                want = w[dy + 2, 2, 0, 0] if abs(dy) <= 2 else 0.0
                assert kk[m, 1, ai, 0, ao, 0] == want


def test_s2d_convs_fill_the_mxu_in_the_tpu_program():
    """Lowered for TPU, a 16 -> 16 conv with k = 17 becomes one conv with 256 output
    features on the 4x4-block grid."""
    from msit_jax.ops.s2d import conv2d_s2d

    x = jnp.zeros((2, 48, 48, 16), jnp.float32)
    w = jnp.zeros((17, 17, 16, 16), jnp.float32)
    text = jax.export.export(jax.jit(lambda x, w: conv2d_s2d(x, w, HI)),
                             platforms=("tpu",))(x, w).mlir_module()
    convs = [l for l in text.splitlines() if "stablehlo.convolution" in l]
    assert len(convs) == 1 and "-> tensor<2x12x12x256xf32>" in convs[0], convs
    assert "tensor<5x5x256x256xf32>" in convs[0]
