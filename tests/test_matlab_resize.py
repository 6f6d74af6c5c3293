"""MATLAB-compatible imresize / rgb2ycbcr: hand-computed values and the published figures."""

from __future__ import annotations

import numpy as np
import pytest

from msit_jax import images
from msit_jax.eval import datasets, matlab_resize, predictors, protocol, runner
from msit_jax.eval.matlab_resize import contributions, cubic, imresize, rgb2ycbcr_y

from tests.conftest import shared_data


def test_cubic_kernel_hand_values():
    # Keys' kernel, a = -0.5: 1.5|x|^3 - 2.5|x|^2 + 1 (|x| <= 1); -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2.
    x = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, -0.5])
    want = [1.0, 0.8671875, 0.5625, 0.2265625, 0.0, -0.0703125, -0.0625, -0.0234375, 0.0, 0.0,
            0.5625]
    np.testing.assert_array_equal(cubic(x), want)


def test_contributions_upscale_by_two_hand_computed():
    # Output pixel 1 of a 4 -> 8 resize: u = 1/2 + 0.5 (1 - 1/2) = 0.75, taps at 1-based
    # -2..3 with t = u - tap = 2.75 .. -2.25: weights 0, c(1.75), c(0.75), c(0.25), c(1.25), 0;
    # zero columns are dropped; taps -1, 0 mirror to pixels 2, 1 (0-based 1, 0).
    w, idx = contributions(4, 8, 2.0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-15)
    row = dict()
    for k in range(w.shape[1]):
        row[int(idx[0, k])] = row.get(int(idx[0, k]), 0.0) + w[0, k]
    assert row == pytest.approx({1: -0.0234375 - 0.0703125, 0: 0.2265625 + 0.8671875}, abs=1e-15)


def test_imresize_row_hand_computed():
    # A 1x4 float row upscaled x2: the height pass is the identity (scale 1), and the first
    # output is 1.09375 a - 0.09375 b (from the weights above).
    a, b, c, d = 10.0, 20.0, 40.0, 80.0
    out = imresize(np.array([[a, b, c, d]]), output_shape=(1, 8))
    assert out.shape == (1, 8)
    assert out[0, 0] == pytest.approx(1.09375 * a - 0.09375 * b, abs=1e-12)
    # The last output mirrors the first: 1.09375 d - 0.09375 c.
    assert out[0, 7] == pytest.approx(1.09375 * d - 0.09375 * c, abs=1e-12)


def test_downscale_is_antialiased_and_preserves_constants():
    # Shrinking x1/4: the kernel widens to 16 taps (antialiasing); a stripe pattern of
    # period 2 averages out to its mean, which an unwidened kernel would alias.
    stripes = np.tile(np.array([0.0, 1.0]), (16, 16))  # (16, 32)
    out = imresize(stripes, 0.25)
    assert out.shape == (4, 8)
    np.testing.assert_allclose(out[1:-1, 1:-1], 0.5, atol=0.02)
    w, _ = contributions(32, 8, 0.25)
    assert w.shape[1] >= 16
    const = np.full((13, 9, 3), 77, np.uint8)
    np.testing.assert_array_equal(imresize(const, 1 / 3), 77)
    np.testing.assert_array_equal(imresize(const, 2.5), 77)


def test_output_size_and_types():
    img = np.zeros((10, 7, 3), np.uint8)
    assert imresize(img, 1 / 3).shape == (4, 3, 3)  # ceil(10/3), ceil(7/3)
    assert imresize(img, (2.0, 0.5)).shape == (20, 4, 3)
    assert imresize(img, output_shape=(5, 21)).dtype == np.uint8
    assert imresize(img.astype(np.float32), 2).dtype == np.float64
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
    with pytest.raises(TypeError):
        imresize(img.astype(np.int32), 2)


def test_im2uint8_rounds_half_away_from_zero():
    x = np.array([0.5 / 255, 1.5 / 255, 2.5 / 255, 1.2, -1])
    np.testing.assert_array_equal(matlab_resize.im2uint8(x), [1, 2, 3, 255, 0])
    # images.to_uint8 rounds half to even: the float64 ties differ, hence two names.
    np.testing.assert_array_equal(images.to_uint8(x), [0, 2, 2, 255, 0])


def test_im2uint8_equals_to_uint8_on_float32():
    # x * 255 is exact in float64 for float32 x, and its only tie in [0, 1] is x = 0.5
    # (-> 127.5, 128 both ways), so model outputs quantise identically either way.
    rs = np.random.RandomState(0)
    ties = (np.arange(256, dtype=np.float64) + 0.5) / 255  # nearest float32s of the ties
    x = np.concatenate([rs.rand(200_000), ties, np.nextafter(ties, 0), np.nextafter(ties, 1),
                        [0.0, 0.5, 1.0, -0.1, 1.1]]).astype(np.float32)
    np.testing.assert_array_equal(matlab_resize.im2uint8(x), images.to_uint8(x))


def test_rgb2ycbcr_y_hand_values():
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [128, 128, 128]]], np.uint8)
    # 16 + 235 - 16 = 235; 16; 16 + 65.481 = 81.481 -> 81; 16 + 128/255 * 219 = 125.93 -> 126.
    np.testing.assert_array_equal(rgb2ycbcr_y(rgb), [[235, 16, 81, 126]])
    np.testing.assert_allclose(rgb2ycbcr_y(rgb.astype(np.float64) / 255)[0, 0], 235 / 255)


@pytest.mark.parametrize("scale, psnr, ssim", [(2, 33.66, 0.9299), (3, 30.39, 0.8682),
                                               (4, 28.42, 0.8104)])
def test_published_set5_bicubic_figures(scale, psnr, ssim):
    """The bicubic rows of the SR tables (SRCNN/VDSR onwards): Set5 33.66/30.39/28.42 dB,
    SSIM 0.9299/0.8682/0.8104, computed as those tables were: MATLAB-degraded and
    MATLAB-upsampled, uint8 results, Y from MATLAB's rgb2ycbcr, shave = scale."""
    ds = datasets.open_eval_set(shared_data("Set5"))
    r = runner.evaluate_scale(predictors.BicubicYPredictor(), ds, scale,
                              protocol.PRESETS["matlab"], degradation="matlab")
    assert len(r.per_image) == 5
    assert abs(r.psnr - psnr) <= 0.02
    assert abs(r.ssim - ssim) <= 0.0005


@pytest.mark.parametrize("scale, psnr", [(2, 30.24), (3, 27.55), (4, 26.00)])
def test_published_set14_bicubic_figures(scale, psnr):
    """Set14's published bicubic PSNR (30.24/27.55/26.00); bridge.png is single-channel and
    is scored on its own values, as MATLAB reads it (no rgb2ycbcr)."""
    ds = datasets.open_eval_set(shared_data("Set14"))
    assert [ds.source.key(i) for i in range(len(ds)) if ds.source.is_gray(i)] == ["bridge.png"]
    r = runner.evaluate_scale(predictors.BicubicYPredictor(), ds, scale,
                              protocol.PRESETS["matlab"], degradation="matlab")
    assert len(r.per_image) == 14
    assert abs(r.psnr - psnr) <= 0.02


def test_matlab_degradation_matches_modcrop_imresize():
    # For integer scales the reference crop (floor(H/s) * s) is MATLAB's modcrop.
    hr = (np.random.RandomState(0).rand(23, 31, 3) * 255).astype(np.uint8)
    lr, gt = protocol.degrade(hr, 3, "matlab")
    np.testing.assert_array_equal(gt, matlab_resize.modcrop(hr, 3))
    np.testing.assert_array_equal(lr, imresize(matlab_resize.modcrop(hr, 3), 1 / 3))
