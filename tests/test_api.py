"""The one-call API: Upscaler.from_pretrained, any input type in, the same type out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msit_jax.inference import engine
from msit_jax.inference import frontend
from msit_jax.models import reparam


def reference(rim_folder, lr, hw):
    _, cfg, v = rim_folder
    return engine.upscale(*reparam.fold(cfg, v), lr, hw, chunk=128)


def test_from_pretrained_is_folded_and_matches_upscale(rim_folder, rim_up):
    assert (rim_up.model_cfg.conv, rim_up.model_cfg.batch_norm) == ("plain", False)
    lr = np.random.RandomState(0).rand(9, 7, 3).astype(np.float32)
    out = rim_up(lr, scale=3.5)
    assert out.dtype == np.float32 and out.shape == (32, 24, 3)  # round(9 * 3.5), round(24.5)
    np.testing.assert_array_equal(out, reference(rim_folder, lr, (32, 24)))
    # the unfolded model gives the same image
    _, cfg, v = rim_folder
    np.testing.assert_allclose(out, engine.upscale(cfg, v, lr, (32, 24)), atol=1e-5)


@pytest.mark.slow  # quick tier under 90 s
def test_types_round_trip(rim_folder, rim_up):
    rs = np.random.RandomState(1)
    u8 = (rs.rand(8, 6, 3) * 255).astype(np.uint8)
    want = reference(rim_folder, u8.astype(np.float32) / 255, (16, 18))

    out = rim_up(u8, scale=(2, 3))
    assert out.dtype == np.uint8 and out.shape == (16, 18, 3)
    np.testing.assert_array_equal(out, frontend.to_uint8(want))

    img = rim_up(Image.fromarray(u8), size=(16, 18))
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (18, 16)
    np.testing.assert_array_equal(np.asarray(img), frontend.to_uint8(want))

    f64 = rim_up(u8.astype(np.float64) / 255, size=(16, 18))
    assert f64.dtype == np.float64
    np.testing.assert_allclose(f64, want, atol=1e-6)

    rgba = Image.fromarray(np.dstack([u8, np.full((8, 6), 200, np.uint8)]), "RGBA")
    out = rim_up(rgba, scale=2)
    assert out.mode == "RGBA" and out.size == (12, 16)
    assert np.asarray(out)[..., 3].min() == 200  # alpha resized and kept
    assert rim_up(Image.fromarray(u8[..., 0]), scale=2).mode == "L"


def test_progress_per_chunk(rim_up):
    calls = []
    rim_up(np.zeros((16, 16, 3), np.float32), size=(22, 22),
       progress=lambda d, t: calls.append((d, t)))
    # 484 pixels at x1.375 (below the CPU grid threshold): the per-query decoder,
    # 128 queries per chunk
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_bad_calls(rim_up):
    img = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="exactly one of scale"):
        rim_up(img)
    with pytest.raises(ValueError, match="exactly one of scale"):
        rim_up(img, 2, size=(9, 9))
    with pytest.raises(ValueError, match="scale must be positive"):
        rim_up(img, -2)
    with pytest.raises(ValueError, match="size must be"):
        rim_up(img, size=(0, 5))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        rim_up(np.zeros((8, 8), np.uint8), 2)
    with pytest.raises(TypeError, match="uint8 .* or float"):
        rim_up(np.zeros((8, 8, 3), np.int32), 2)
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        rim_up("photo.png", 2)


def test_api_refuses_downscales_like_the_cli(rim_up):
    """scale < 1 and sizes under the input are refused as msit-upscale refuses them."""
    from msit_jax import errors
    from msit_jax.inference import cli

    img = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(errors.UsageError, match=r"scale must be >= 1 \(MSIT upsamples"):
        rim_up(img, scale=0.5)
    with pytest.raises(errors.UsageError, match=r"must be >= 1"):
        rim_up(img, scale=(2, 0.5))
    with pytest.raises(errors.UsageError, match=r"size 4 x 9 is smaller than the input 8 x 8"):
        rim_up(img, size=(4, 9))
    assert cli.parse_scale("2,3") == (2.0, 3.0)
    with pytest.raises(errors.UsageError, match=r"--scale must be >= 1 \(MSIT upsamples"):
        cli.parse_scale("0.5")
