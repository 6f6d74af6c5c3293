"""The training batch protocol (docs/design.md#5-training-batch-protocol) against hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from msit_jax import geometry
from msit_jax.data.protocol import (Batch, BatchPlanner, Protocol, augment_view, batch_scale,
                                    collate, crop_size, make_example, normalize_uint8,
                                    shrink_scale)
from msit_jax.images import resize_bicubic


def position_image(h: int, w: int) -> np.ndarray:
    """R = row, G = col, B = (row + col) % 256: every pixel names its position."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([r, c, (r + c) % 256], -1).astype(np.uint8)


def denorm(x):
    return np.round((np.asarray(x) * 0.5 + 0.5) * 255).astype(int)


def test_crop_size_rounds_half_to_even():
    assert crop_size(1.0, 48) == 48
    assert crop_size(4.0, 48) == 192
    assert crop_size(2.5, 48) == 120
    assert crop_size(3.3, 48) == 158            # 158.4
    assert crop_size(1.0 + 0.5 / 48, 48) == 48  # 48.5 -> 48 (even)
    assert crop_size(1.0 + 1.5 / 48, 48) == 50  # 49.5 -> 50 (even)


def test_shrink_scale_reference_rule():
    # fits: unchanged
    assert shrink_scale(2.0, 48, 100) == 2.0
    assert shrink_scale(100 / 48, 48, 100) == 100 / 48
    # too big: s * m / (48 s), so the crop becomes the smallest side
    s = shrink_scale(3.0, 48, 100)
    assert s == pytest.approx(100 / 48)
    assert crop_size(s, 48) == 100
    for m in (48, 61, 97, 143, 191):
        assert crop_size(shrink_scale(4.0, 48, m), 48) == m


def test_batch_scale_range_and_small_image_error():
    p = Protocol(inp_size=48, scale_min=1.0, scale_max=4.0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        s, hr = batch_scale(rng, p, 1000)
        assert 1.0 <= s <= 4.0 and hr == crop_size(s, 48) and 48 <= hr <= 192
    for _ in range(50):  # smallest image 60: scale shrinks so the crop fits
        s, hr = batch_scale(rng, p, 60)
        assert hr <= 60 and s <= 60 / 48 + 1e-12
    with pytest.raises(ValueError, match="smaller than the 48-pixel LR patch"):
        batch_scale(rng, p, 47)


def test_protocol_rejects_impossible_settings():
    with pytest.raises(ValueError, match="sample_q"):
        Protocol(inp_size=8, sample_q=65)
    with pytest.raises(ValueError, match="scale_min"):
        Protocol(scale_min=4.0, scale_max=1.0)


def test_augment_view_hand_cases():
    a = np.arange(6).reshape(2, 3, 1)
    np.testing.assert_array_equal(augment_view(a, True, False, False)[..., 0], [[3, 4, 5], [0, 1, 2]])
    np.testing.assert_array_equal(augment_view(a, False, True, False)[..., 0], [[2, 1, 0], [5, 4, 3]])
    np.testing.assert_array_equal(augment_view(a, False, False, True)[..., 0], [[0, 3], [1, 4], [2, 5]])
    # all three: flip rows, flip cols, then transpose
    np.testing.assert_array_equal(augment_view(a, True, True, True)[..., 0], [[5, 2], [4, 1], [3, 0]])


@pytest.mark.parametrize("hr", [16, 24, 37])
def test_example_coordinates_cell_and_targets_align(hr):
    """An hr x hr image is its own crop: every target is the pixel its coordinate names."""
    inp = 12
    p = Protocol(inp_size=inp, sample_q=100, augment=False, radius=1)
    img = position_image(hr, hr)
    ex = make_example(img, hr, p, np.random.default_rng(1))
    assert ex["inp"].shape == (inp, inp, 3) and ex["inp"].dtype == np.float32
    assert ex["coord"].shape == (100, 2) and ex["gt"].shape == (100, 3)
    assert ex["key_idx"].shape == (100, 2, 3) and ex["key_idx"].dtype == np.int32
    # LR: Pillow bicubic of the uint8 crop, normalised as the reference
    np.testing.assert_array_equal(ex["inp"], normalize_uint8(resize_bicubic(img, (inp, inp))))
    # cell: 2 / hr per axis, times the LR size
    np.testing.assert_array_equal(ex["rel_cell"],
                                  np.float32(2.0 / hr) * np.float32(inp) * np.ones(2, np.float32))
    # queries: distinct HR pixel centres; targets: exactly those pixels
    rows = geometry.nearest_index(ex["coord"][:, 0], hr)
    cols = geometry.nearest_index(ex["coord"][:, 1], hr)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 100
    np.testing.assert_array_equal(ex["coord"][:, 0], geometry.coord_axis(hr)[rows])
    np.testing.assert_array_equal(ex["coord"][:, 1], geometry.coord_axis(hr)[cols])
    gt = denorm(ex["gt"])
    np.testing.assert_array_equal(gt[:, 0], rows)
    np.testing.assert_array_equal(gt[:, 1], cols)
    # geometry: as geometry.query_geometry on the LR grid
    g = geometry.query_geometry(ex["coord"], (inp, inp), 1, ex["rel_cell"])
    np.testing.assert_array_equal(ex["key_idx"], g.key_idx)
    np.testing.assert_array_equal(ex["rel"], g.rel)
    assert int(ex["hr"]) == hr


def test_nearest_index_recovers_every_hr_pixel():
    """The GT lookup (grid_sample nearest at pixel centres) is the identity for every size."""
    for n in range(1, 400):
        np.testing.assert_array_equal(geometry.nearest_index(geometry.coord_axis(n), n),
                                      np.arange(n))


def test_unit_scale_samples_every_pixel():
    p = Protocol(inp_size=8, sample_q=64, augment=True, radius=1)
    ex = make_example(position_image(40, 50), 8, p, np.random.default_rng(3))
    rows = geometry.nearest_index(ex["coord"][:, 0], 8)
    cols = geometry.nearest_index(ex["coord"][:, 1], 8)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(r, c) for r in range(8) for c in range(8)]


def test_random_crop_is_a_window_of_the_augmented_image():
    """Targets are a contiguous hr x hr window of one of the 8 flips/transposes."""
    img = position_image(60, 90)
    p = Protocol(inp_size=8, sample_q=64, augment=True, radius=1)
    hr = 20
    seen = set()
    for seed in range(40):
        ex = make_example(img, hr, p, np.random.default_rng(seed))
        rows = geometry.nearest_index(ex["coord"][:, 0], hr)
        cols = geometry.nearest_index(ex["coord"][:, 1], hr)
        gt = denorm(ex["gt"])
        ok = False
        for flips in np.ndindex(2, 2, 2):
            view = augment_view(img, *map(bool, flips))
            # the window origin from one query, then every query must agree
            for y0 in range(view.shape[0] - hr + 1):
                x0s = np.nonzero((view[y0 + rows[0], :, :] == gt[0]).all(-1))[0] - cols[0]
                for x0 in x0s:
                    if 0 <= x0 <= view.shape[1] - hr and np.array_equal(
                            view[y0 + rows, x0 + cols], gt):
                        ok = True
                        seen.add(flips)
                        break
                if ok:
                    break
            if ok:
                break
        assert ok, f"seed {seed}: targets are not a window of any augmented view"
    assert len(seen) >= 6  # the augmentation really varies


def test_planner_is_a_function_of_seed_and_step():
    sizes = np.array([[100, 120], [300, 200], [64, 500], [90, 90]])
    p = Protocol(inp_size=48, scale_min=1.0, scale_max=4.0)
    a = BatchPlanner(sizes, 6, seed=7, protocol=p, repeat=3)
    b = BatchPlanner(sizes, 6, seed=7, protocol=p, repeat=3)
    c = BatchPlanner(sizes, 6, seed=8, protocol=p, repeat=3)
    for step in (5, 0, 3, 11):  # any order
        ia, sa, ha = a.plan(step)
        ib, sb, hb = b.plan(step)
        np.testing.assert_array_equal(ia, ib)
        assert (sa, ha) == (sb, hb)
        assert ha <= sizes[ia].min()  # the scale shrank where needed
    assert any(not np.array_equal(a.images(s), c.images(s)) for s in range(4))
    # an epoch (4 images x 3 repeats = 12 samples = 2 steps) uses each image 3 times
    for e in range(3):
        ids = np.concatenate([a.images(2 * e), a.images(2 * e + 1)])
        np.testing.assert_array_equal(np.bincount(ids, minlength=4), [3, 3, 3, 3])


def test_collate_stacks():
    exs = [{"a": np.full((2, 3), i, np.float32), "b": np.int32(i)} for i in range(4)]
    out = collate(exs)
    assert out["a"].shape == (4, 2, 3) and out["b"].tolist() == [0, 1, 2, 3]


def test_pipeline_batch_becomes_the_typed_batch():
    """Flat examples (as grain stacks them) -> Batch: fields in their places, extras dropped."""
    p = Protocol(inp_size=8, sample_q=20, augment=True, radius=1)
    exs = [make_example(position_image(30, 40), hr, p, np.random.default_rng(i))
           for i, hr in enumerate((12, 12, 12))]
    flat = dict(collate(exs), step=np.zeros(3, np.int32))
    batch = Batch.from_flat(flat)
    assert batch.inp.shape == (3, 8, 8, 3) and batch.gt.shape == (3, 20, 3)
    g = batch.geometry
    assert g.coord.shape == (3, 20, 2) and g.key_idx.shape == (3, 20, 2, 3)
    assert g.rel.shape == (3, 20, 2, 3) and g.rel_cell.shape == (3, 2)
    for k, v in batch.to_flat().items():
        np.testing.assert_array_equal(v, flat[k], err_msg=k)
    assert set(batch.to_flat()) == set(flat) - {"hr", "step"}
