"""PSNR / SSIM: hand-computed values, scikit-image's PSNR, and MATLAB's `ssim_index.m`
definition of SSIM written out here (valid windows of an 11x11 Gaussian)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from msit_jax.eval import color, metrics


def _rand(shape, seed):
    return np.random.RandomState(seed).rand(*shape).astype(np.float32)


def test_psnr_hand_computed_rgb_and_y():
    gt = np.full((8, 9, 3), 0.25)
    # Constant error 0.1 on every channel: MSE 0.01 -> 20 dB.
    assert metrics.psnr(gt + 0.1, gt) == pytest.approx(20.0, abs=1e-12)
    # On Y the error is 0.1 * (65.738 + 129.057 + 25.064) / 256 = 0.1 * 219.859 / 256.
    assert metrics.psnr(gt + 0.1, gt, y_channel=True) == pytest.approx(
        -20.0 * math.log10(0.1 * 219.859 / 256.0), abs=1e-12)
    # One pixel off by 0.5 on R only in a 10x10 image: MSE = 0.25 / 300.
    a = np.zeros((10, 10, 3))
    b = a.copy()
    b[4, 4, 0] = 0.5
    assert metrics.psnr(b, a) == pytest.approx(-10.0 * math.log10(0.25 / 300.0), abs=1e-12)
    assert metrics.psnr(a, a) == float("inf")


def test_psnr_shave_drops_borders():
    a = np.zeros((10, 12, 3))
    b = a.copy()
    b[:2] = 1.0  # errors only in the top two rows
    b[:, -2:] = 1.0  # and the right two columns
    assert metrics.psnr(b, a, shave=2) == float("inf")
    b[5, 5] = 0.2  # one interior pixel: (0.2^2 * 3) / (6 * 8 * 3) on the 6x8 interior
    assert metrics.psnr(b, a, shave=2) == pytest.approx(-10 * math.log10(0.04 / 48), abs=1e-12)
    with pytest.raises(ValueError, match="shave"):
        metrics.psnr(b, a, shave=5)


def test_psnr_matches_skimage():
    gt, pred = _rand((31, 40, 3), 0), _rand((31, 40, 3), 1)
    assert metrics.psnr(pred, gt) == pytest.approx(
        peak_signal_noise_ratio(gt.astype(np.float64), pred.astype(np.float64), data_range=1.0),
        abs=1e-9)
    # Y: the reference weights the difference, i.e. PSNR of the (offset-free) Y images.
    yg, yp = gt.astype(np.float64) @ color.Y_WEIGHTS, pred.astype(np.float64) @ color.Y_WEIGHTS
    assert metrics.psnr(pred, gt, y_channel=True, shave=3) == pytest.approx(
        peak_signal_noise_ratio(yg[3:-3, 3:-3], yp[3:-3, 3:-3], data_range=1.0), abs=1e-9)


def test_psnr_signature_and_shapes():
    a = np.zeros((4, 4, 3))
    with pytest.raises(ValueError, match="one shape"):
        metrics.psnr(a, np.zeros((4, 5, 3)))
    with pytest.raises(ValueError):
        metrics.psnr(np.zeros((4, 4)), np.zeros((4, 4)))
    # The keyword interface other modules use.
    assert metrics.psnr(a + 0.1, a, shave=1, y_channel=False) == pytest.approx(20.0)


def test_psnr_gray_hand_computed():
    a = np.full((6, 6), 100.0)
    assert metrics.psnr_gray(a + 5, a) == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-12)
    assert metrics.psnr_gray(a + 5, a, data_range=1.0) == pytest.approx(10 * math.log10(1 / 25))


def test_ssim_hand_computed():
    x = np.random.RandomState(0).rand(20, 23) * 255
    assert metrics.ssim_gray(x, x) == pytest.approx(1.0, abs=1e-12)
    # Constant images a, b: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 100.0, 120.0
    c1 = (0.01 * 255) ** 2
    got = metrics.ssim_gray(np.full((15, 15), a), np.full((15, 15), b))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim_gray(np.zeros((14, 30)), np.zeros((14, 30)), shave=2)


def _ssim_index_m(x, y, data_range=255.0):
    """MATLAB ssim_index.m: fspecial('gaussian', 11, 1.5), filter2(..., 'valid'),
    K = (0.01, 0.03), mean of the SSIM map; an independent reference."""
    t = np.arange(11, dtype=np.float64) - 5.0
    g = np.exp(-t * t / (2 * 1.5 ** 2))
    g /= g.sum()

    def valid(a):  # separable 'valid' correlation with g x g
        h, w = a.shape
        rows = sum(g[i] * a[i:h - 10 + i, :] for i in range(11))
        return sum(g[i] * rows[:, i:w - 10 + i] for i in range(11))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = valid(x), valid(y)
    sxx, syy, sxy = valid(x * x) - mx * mx, valid(y * y) - my * my, valid(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) * (2 * sxy + c2)
                         / ((mx * mx + my * my + c1) * (sxx + syy + c2))))


@pytest.mark.parametrize("shave", [0, 4])
def test_ssim_on_y_is_the_valid_window_definition(shave):
    gt = _rand((37, 45, 3), 2)
    pred = np.clip(gt + 0.1 * _rand((37, 45, 3), 3) - 0.05, 0, 1)
    yg, yp = color.rgb_to_y(gt), color.rgb_to_y(pred)
    assert yg.min() >= 16 and yg.max() <= 235
    sl = slice(shave, -shave) if shave else slice(None)
    want = _ssim_index_m(yp[sl, sl], yg[sl, sl])
    assert 0.3 < want < 0.999  # a discriminating case: neither identical nor unrelated
    assert metrics.ssim(pred, gt, shave=shave) == pytest.approx(want, abs=1e-9)
    assert metrics.ssim_gray(yp, yg, shave=shave) == pytest.approx(want, abs=1e-9)


def test_ssim_rgb_is_the_channel_mean():
    gt = _rand((30, 33, 3), 4)
    pred = np.clip(gt + 0.2 * _rand((30, 33, 3), 5) - 0.1, 0, 1)
    want = np.mean([_ssim_index_m(pred[..., c].astype(np.float64) * 255,
                                  gt[..., c].astype(np.float64) * 255) for c in range(3)])
    assert metrics.ssim(pred, gt, y_channel=False) == pytest.approx(want, abs=1e-9)
    assert metrics.ssim(pred, gt, y_channel=False, shave=3) == pytest.approx(np.mean(
        [_ssim_index_m(pred[3:-3, 3:-3, c].astype(np.float64) * 255,
                       gt[3:-3, 3:-3, c].astype(np.float64) * 255) for c in range(3)]),
        abs=1e-9)


def test_rgb_to_y_matches_matlab_formula():
    # MATLAB rgb2ycbcr for doubles: Y = 16/255 + (65.481 R + 128.553 G + 24.966 B) / 255.
    px = np.array([[[0.2, 0.5, 0.9]]])
    assert color.rgb_to_y(px)[0, 0] == pytest.approx(16 + 65.481 * 0.2 + 128.553 * 0.5
                                                       + 24.966 * 0.9)
