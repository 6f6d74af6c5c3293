"""Each building block against torch.nn.functional on random tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

torch = pytest.importorskip("torch")  # the PyTorch reference (requirements-torch.txt)
import torch.nn.functional as F  # noqa: E402

from msit_jax.models import layers, msno
from msit_jax import ops
from msit_jax.models.decoder import Dense, posenc_frequencies, torch_linspace
from msit_jax.ops.runtime import RuntimeOptions
from tests.torch_reference import LEM, RIM

rng = np.random.RandomState(0)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def oihw_to_hwio(w):
    return np.transpose(w.detach().numpy(), (2, 3, 1, 0))


@pytest.mark.parametrize("k,cin,cout,groups", [
    (1, 16, 32, 1), (3, 8, 8, 1), (5, 4, 6, 1), (33, 2, 2, 1),  # MSNO kernel sizes
    (1, 32, 64, 16),  # SIM: grouped 1x1, dim -> 2 dim
    (1, 32, 64, 8),  # Q/K proj1: groups = dim / heads
])
def test_conv_matches_torch(k, cin, cout, groups):
    x = rng.randn(2, 13, 11, cin).astype(np.float32)
    w = torch.randn(cout, cin // groups, k, k)
    b = torch.randn(cout)
    ref = F.conv2d(nchw(x), w, b, padding=k // 2, groups=groups)
    ours = ops.conv2d(jnp.asarray(x), jnp.asarray(oihw_to_hwio(w)), jnp.asarray(b.numpy()),
                      groups=groups, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(ours), nhwc(ref), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("k,cin,cout", [(3, 4, 4), (9, 3, 5), (33, 2, 2)])
def test_rim_kernel_and_conv_match_torch(k, cin, cout):
    torch.manual_seed(k)
    rim = RIM(cin, cout, k)
    x = rng.randn(1, 12, 10, cin).astype(np.float32)
    n = cin * cout
    convmap = rim.convmap.weight.detach().numpy().reshape(cout, cin, 3, 3).transpose(2, 3, 1, 0)
    scale = rim.linear.weight.detach().numpy().reshape(cout, cin).T
    base = oihw_to_hwio(rim.weight)
    kernel = layers.rim_effective_kernel(jnp.asarray(base), jnp.asarray(convmap), jnp.asarray(scale))
    np.testing.assert_allclose(np.asarray(kernel), oihw_to_hwio(rim.kernel()), atol=1e-6, rtol=1e-6)
    # Independent of both implementations: per 2-D kernel W_oi, K = W + corr(W, m) * s * W
    # with torch's grouped channel c = o * cin + i holding m and s (correlation, zero pad).
    m_t = rim.convmap.weight.detach().numpy()[:, 0]  # (n, 3, 3)
    s_t = rim.linear.weight.detach().numpy()[:, 0, 0, 0]  # (n,)
    w_t = rim.weight.numpy()  # (cout, cin, k, k)
    want = np.empty((k, k, cin, cout), np.float64)
    for c in range(n):
        o, i = divmod(c, cin)
        mapped = scipy.signal.correlate2d(w_t[o, i], m_t[c], mode="same")
        want[:, :, i, o] = w_t[o, i] + mapped * s_t[c] * w_t[o, i]
    np.testing.assert_allclose(np.asarray(kernel), want, atol=1e-6, rtol=1e-5)

    mod = layers.RIMConv(cout, k, runtime=RuntimeOptions(fft_min_kernel=0))
    variables = {"params": {"convmap": convmap, "scale": scale, "bias": rim.bias.detach().numpy()},
                 layers.FROZEN: {"kernel": base}}
    ours = mod.apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), nhwc(rim(nchw(x))), atol=2e-5, rtol=1e-5)


def test_gelu_is_exact_erf_gelu():
    x = np.linspace(-8, 8, 2001).astype(np.float32)
    np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))),
                               F.gelu(torch.from_numpy(x)).numpy(), atol=1e-6, rtol=0)
    # tanh approximation differs by >1e-4 somewhere: we must not be using it
    approx = F.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert np.abs(np.asarray(layers.gelu(jnp.asarray(x))) - approx).max() > 1e-4


def test_batchnorm_train_and_eval_match_torch():
    c = 6
    x = (rng.randn(3, 5, 4, c) * 2 + 1).astype(np.float32)
    bn_t = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn_t.weight.copy_(torch.rand(c) + 0.5)
        bn_t.bias.copy_(torch.randn(c))
        bn_t.running_mean.copy_(torch.randn(c))
        bn_t.running_var.copy_(torch.rand(c) + 0.5)
    variables = {"params": {"scale": bn_t.weight.detach().numpy().copy(),
                            "bias": bn_t.bias.detach().numpy().copy()},
                 "batch_stats": {"mean": bn_t.running_mean.numpy().copy(),
                                 "var": bn_t.running_var.numpy().copy()}}
    bn = layers.BatchNorm()

    bn_t.eval()
    out_eval = bn.apply(variables, jnp.asarray(x), False)
    np.testing.assert_allclose(np.asarray(out_eval), nhwc(bn_t(nchw(x))), atol=1e-5, rtol=1e-5)

    bn_t.train()
    ref = bn_t(nchw(x))
    out, upd = bn.apply(variables, jnp.asarray(x), True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(out), nhwc(ref), atol=1e-5, rtol=1e-5)
    # running stats: momentum 0.1, unbiased variance (flax's BatchNorm would use biased)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], bn_t.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], bn_t.running_var.numpy(), atol=1e-6)


def test_lem_shift_matches_circular_depthwise_conv():
    dim = 24
    x = rng.randn(2, 7, 9, dim).astype(np.float32)
    lem = LEM(dim)
    np.testing.assert_array_equal(msno.lem_mask(dim)[:, None], lem.mask.detach().numpy())
    np.testing.assert_allclose(np.asarray(msno.lem_shift(jnp.asarray(x))), nhwc(lem(nchw(x))),
                               atol=1e-6, rtol=0)


def test_dense_matches_linear():
    lin = torch.nn.Linear(37, 5)
    x = rng.randn(4, 37).astype(np.float32)
    v = {"params": {"kernel": lin.weight.detach().numpy().T, "bias": lin.bias.detach().numpy()}}
    out = Dense(5, runtime=RuntimeOptions()).apply(v, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), lin(torch.from_numpy(x)).detach().numpy(),
                               atol=1e-5, rtol=1e-5)


# Sizes the models use (paper: 16 frequencies; tiny: 4; offsets: 7). For long
# ranges torch fills SIMD lanes with base + i * step and its result then depends
# on the CPU's vector width, so there is no single value to match.
@pytest.mark.parametrize("start,end,steps", [(0.0, 10.0, 16), (0.0, 10.0, 4), (-3.0, 3.0, 7),
                                             (0.0, 1.0, 5)])
def test_linspace_is_torch_bit_exact(start, end, steps):
    np.testing.assert_array_equal(torch_linspace(start, end, steps),
                                  torch.linspace(start, end, steps).numpy())


def test_posenc_frequencies_bit_exact():
    for scale, dims in [(10.0, 64), (10.0, 16)]:
        ref = (2.0 ** torch.linspace(0, scale, dims // 4) - 1).numpy()
        np.testing.assert_array_equal(posenc_frequencies(scale, dims), ref)
