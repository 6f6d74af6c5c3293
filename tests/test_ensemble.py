"""Geometric self-ensemble: the 8 transforms, their inverses and sizes, and the ensemble
through the model (untiled and tiled) on non-square, anisotropic outputs."""

from __future__ import annotations

import numpy as np
import pytest

from msit_jax import tiny_model_config

from msit_jax.inference import ensemble
from msit_jax.inference.engine import Engine
from msit_jax.models import reparam
from msit_jax.models.random_init import random_variables

LR_HW, OUT_HW = (11, 8), (29, 17)  # non-square, scales 2.64 x 2.125


def _lr(seed: int = 0, hw=LR_HW) -> np.ndarray:
    return np.random.RandomState(seed).rand(*hw, 3).astype(np.float32)


def test_the_eight_transforms_are_the_dihedral_group():
    img = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    seen = set()
    for t in ensemble.TRANSFORMS:
        out = t.forward(img)
        assert out.flags["C_CONTIGUOUS"]
        assert out.shape[:2] == t.size((3, 4))
        np.testing.assert_array_equal(t.inverse(out), img)
        seen.add(out.tobytes() + bytes(out.shape))
    assert len(seen) == ensemble.N_TRANSFORMS  # 8 distinct images: no transform twice
    assert ensemble.TRANSFORMS[0] == ensemble.Transform(False, False, False)


def test_an_equivariant_predictor_is_its_own_ensemble_and_others_are_not():
    lr = _lr()
    calls = []

    def nearest_x3(x, hw, progress):  # exactly equivariant under flips and transposes
        calls.append((x.shape[:2], hw))
        return np.repeat(np.repeat(x, 3, 0), 3, 1)[:hw[0], :hw[1]]

    hw = (3 * LR_HW[0], 3 * LR_HW[1])
    got = ensemble.mean_over_transforms(nearest_x3, lr, hw)
    # Equal to rounding: eight equal addends summed in float32, then divided by 8.
    np.testing.assert_allclose(got, nearest_x3(lr, hw, False), rtol=3e-7, atol=0)
    # A transposed pass gets the transposed input and asks for the transposed size.
    assert sorted(set(calls)) == sorted({(LR_HW, hw), (LR_HW[::-1], hw[::-1])})
    assert len(calls) == 1 + ensemble.N_TRANSFORMS

    def ramp(x, hw, progress):  # depends on absolute position: not equivariant
        return x.mean() + np.arange(hw[0] * hw[1] * 3, dtype=np.float32).reshape(*hw, 3)

    got = ensemble.mean_over_transforms(ramp, lr, OUT_HW)
    mean = np.mean([t.inverse(ramp(t.forward(lr), t.size(OUT_HW), False))
                    for t in ensemble.TRANSFORMS], axis=0)
    np.testing.assert_allclose(got, mean, rtol=1e-6)
    assert np.abs(got - ramp(lr, OUT_HW, False)).max() > 1.0


def test_progress_callbacks_count_all_eight_passes():
    seen = []

    def two_chunks(x, hw, progress):
        progress(1, 2)
        progress(2, 2)
        return np.zeros((*hw, 3), np.float32)

    ensemble.mean_over_transforms(two_chunks, _lr(), OUT_HW,
                                  progress=lambda d, t: seen.append((d, t)))
    assert seen == [(d, 16) for d in range(1, 17)]


@pytest.fixture(scope="module")
def folded():
    cfg = tiny_model_config()
    return reparam.fold(cfg, random_variables(cfg, 3))


def _symmetric(variables):
    """The decoder's MLP silenced (its output layer zero but for the bias): the model
    is a constant plus the border-clamped bilinear upsampling of its input, which
    commutes with every flip and transpose."""
    v = {k: dict(x) for k, x in variables.items()}
    params = dict(v["params"])
    dec = params["decoder"]["query"]["mlp"]
    last = sorted(dec)[-1]
    mlp = dict(dec)
    mlp[last] = {"kernel": np.zeros_like(dec[last]["kernel"]),
                 "bias": np.full_like(dec[last]["bias"], 0.0625)}
    params["decoder"] = {"query": dict(params["decoder"]["query"], mlp=mlp)}
    v["params"] = params
    return v


@pytest.mark.parametrize("method", ["query", "grid"])
def test_model_self_ensemble_equals_plain_only_for_a_symmetric_model(folded, method):
    cfg, variables = folded
    lr = _lr(1)
    for v, symmetric in ((_symmetric(variables), True), (variables, False)):
        plain = Engine(cfg, v, chunk=64, method=method)(lr, OUT_HW, clamp=False)
        plus = Engine(cfg, v, chunk=64, method=method, self_ensemble=True)(
            lr, OUT_HW, clamp=False)
        assert plus.shape == (*OUT_HW, 3)
        diff = np.abs(plus - plain).max()
        if symmetric:
            assert diff < 2e-6, diff
        else:
            assert diff > 1e-4, diff
            # ...and it is the mean of the 8 plain passes, each mapped back.
            up = Engine(cfg, v, chunk=64, method=method)
            mean = sum(t.inverse(up(t.forward(lr), t.size(OUT_HW), clamp=False))
                       for t in ensemble.TRANSFORMS) / 8
            np.testing.assert_allclose(plus, mean, atol=1e-6)


def test_tiled_self_ensemble(folded):
    cfg, variables = folded
    lr = _lr(2, (20, 13))
    out_hw = (47, 31)
    for v, symmetric in ((_symmetric(variables), True), (variables, False)):
        tiled = Engine(cfg, v, chunk=128, tile=8, self_ensemble=True)
        plus = tiled(lr, out_hw, clamp=False)
        plain = Engine(cfg, v, chunk=128, tile=8)(lr, out_hw, clamp=False)
        diff = np.abs(plus - plain).max()
        assert (diff < 2e-6) if symmetric else (diff > 1e-4), diff
    # Clamping applies once, to the mean.
    clamped = Engine(cfg, variables, chunk=128, tile=8, self_ensemble=True)(lr, out_hw)
    np.testing.assert_array_equal(clamped, np.clip(plus, 0, 1))



@pytest.fixture(scope="module")
def model_folder(make_model_folder):
    return make_model_folder(4)


def test_upscale_and_evaluate_commands_take_self_ensemble(tmp_path, model_folder, capsys):
    from PIL import Image

    from msit_jax import images

    from msit_jax.inference import cli as upscale
    from msit_jax.eval import cli as evaluate_cli

    path, cfg, variables = model_folder
    rgb = (_lr(5, (12, 9)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    rc = upscale.main([str(tmp_path / "in.png"), "--checkpoint", path, "--scale", "2.5,3",
                       "--self_ensemble", "--noprogress", "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("decode x8 (self-ensemble)") == 1  # one stage for the 8 passes
    fcfg, fvars = reparam.fold(cfg, variables)
    want = Engine(fcfg, fvars, self_ensemble=True)(images.to_float(rgb), (30, 27))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")),
                                  images.to_uint8(want))

    data = tmp_path / "Mini"
    data.mkdir()
    Image.fromarray((_lr(6, (24, 20)) * 255).astype(np.uint8)).save(data / "a.png")
    rc = evaluate_cli.main(["--checkpoint", path, "--data", str(data), "--scales", "2",
                            "--self_ensemble", "--noprogress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert [ln.split(" | ")[0] for ln in out.splitlines() if ln.startswith("| MSIT")] == \
        ["| MSIT+"], out
    assert evaluate_cli.main(["--model", "bicubic", "--data", str(data), "--scales", "2",
                              "--self_ensemble"]) == 2
    assert "--self_ensemble needs an MSIT model" in capsys.readouterr().err


def test_the_public_upscaler_takes_self_ensemble(model_folder):
    from msit_jax import Upscaler as PublicUpscaler

    path, cfg, variables = model_folder
    lr = (_lr(7, (10, 6)) * 255).astype(np.uint8)
    plus = PublicUpscaler.from_pretrained(path, self_ensemble=True)(lr, size=(23, 13))
    fcfg, fvars = reparam.fold(cfg, variables)
    want = Engine(fcfg, fvars, self_ensemble=True)(lr / np.float32(255), (23, 13))
    from msit_jax import images

    np.testing.assert_array_equal(plus, images.to_uint8(want))
