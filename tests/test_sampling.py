"""grid_sample semantics (nearest / bilinear / border, out of range, ties) and host geometry."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")  # the PyTorch reference (requirements-torch.txt)

from msit_jax import geometry
from msit_jax.models import sampling
from tests.torch_reference import grid, torch_coord_axis, torch_make_coord

rng = np.random.RandomState(0)


def test_coord_grid_bit_exact():
    for n in [1, 2, 7, 20, 24, 48, 70, 84, 97, 1000, 4097]:
        np.testing.assert_array_equal(geometry.coord_axis(n), torch_coord_axis(n).numpy())
    np.testing.assert_array_equal(geometry.make_coord((13, 17)), torch_make_coord(13, 17).numpy())


def _sample_coords():
    """Random in-range and out-of-range coords, plus exact tie points at x3.5 and x1.5."""
    rand = rng.uniform(-1.3, 1.3, (400, 2)).astype(np.float32)
    ties = geometry.make_coord((84, 70)).reshape(-1, 2)  # x3.5 on 24 x 20: 1560 ties
    ties15 = geometry.make_coord((36, 30)).reshape(-1, 2)
    edges = np.array([[-1, -1], [1, 1], [-1, 1], [0.999, -0.999], [1.05, 0]], np.float32)
    return np.concatenate([rand, ties, ties15, edges])


@pytest.mark.parametrize("border", [False, True])
def test_bilinear_matches_grid_sample(border):
    img = rng.randn(24, 20, 5).astype(np.float32)
    coords = _sample_coords()
    ours = jax.vmap(lambda c: sampling.bilinear(jnp.asarray(img), c, border=border))(
        jnp.asarray(coords))
    ref = grid(torch.from_numpy(img.transpose(2, 0, 1))[None], torch.from_numpy(coords)[None],
               "bilinear", "border" if border else "zeros")[0].numpy()
    # continuous in the coordinate: float32 rounding of the weights only
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


def test_nearest_index_matches_grid_sample_including_ties():
    h, w = 24, 20
    coords = _sample_coords()
    # An image whose value encodes its own index, 1-based so zeros mean "outside".
    idx_img = np.stack(np.meshgrid(np.arange(h) + 1, np.arange(w) + 1, indexing="ij"), -1)
    ref = grid(torch.from_numpy(idx_img.astype(np.float32).transpose(2, 0, 1))[None],
               torch.from_numpy(coords)[None], "nearest")[0].numpy()
    iy = geometry.nearest_index(coords[:, 0], h)
    ix = geometry.nearest_index(coords[:, 1], w)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    ours = np.where(inside[:, None], np.stack([iy + 1, ix + 1], -1), 0)
    np.testing.assert_array_equal(ours, ref)

    # Exact ties inside the image: c + 1 = (k + 1) * 2 / n is dyadic for these k, so
    # u = ((c + 1) * n - 1) / 2 = k + 0.5 with no float32 rounding anywhere. Half to
    # even rounds down at even k and up at odd k, so half-up or half-down fails here.
    tie_rows = np.array([2, 5, 8, 11, 14, 17, 20])  # k with 12 | 8 * (k + 1), n = 24
    tie_cols = np.array([4, 9, 14])  # k with 10 | 8 * (k + 1), n = 20
    even_rows = np.array([2, 6, 8, 12, 14, 18, 20])
    even_cols = np.array([4, 10, 14])
    ty, tx = np.meshgrid((tie_rows + 1) * 2 / h - 1, (tie_cols + 1) * 2 / w - 1, indexing="ij")
    ties = np.stack([ty.ravel(), tx.ravel()], -1).astype(np.float32)
    want = np.stack(np.meshgrid(even_rows, even_cols, indexing="ij"), -1).reshape(-1, 2)
    ref_ties = grid(torch.from_numpy(idx_img.astype(np.float32).transpose(2, 0, 1))[None],
                    torch.from_numpy(ties)[None], "nearest")[0].numpy()
    np.testing.assert_array_equal(ref_ties - 1, want)  # the reference: half to even
    np.testing.assert_array_equal(np.stack([geometry.nearest_index(ties[:, 0], h),
                                            geometry.nearest_index(ties[:, 1], w)], -1), want)


def test_nearest_gather_marks_outside_samples():
    img = rng.randn(6, 5, 3).astype(np.float32)
    iy = jnp.array([-1, 0, 5, 6])
    ix = jnp.array([4, 5, -2])
    out, valid = sampling.nearest_clipped(jnp.asarray(img), iy, ix)
    out, valid = np.asarray(out), np.asarray(valid)
    assert out.shape == (4, 3, 3) and valid.shape == (4, 3)
    np.testing.assert_array_equal(out[1, 0], img[0, 4])
    np.testing.assert_array_equal(out[2, 0], img[5, 4])
    want = np.zeros((4, 3), bool)
    want[1, 0] = want[2, 0] = True
    np.testing.assert_array_equal(valid, want)


def test_query_geometry_matches_torch_reference_keys():
    """Keys / rel exactly as the reference builds them with grid_sample in float32."""
    h, w, r = 24, 20, 3
    coords = _sample_coords()
    coords = coords[(np.abs(coords) <= 1).all(-1)]
    g = geometry.query_geometry(coords, (h, w), r, geometry.rel_cell((3 * h, 3 * w), (h, w)))

    lr = torch_make_coord(h, w).permute(2, 0, 1)[None]
    c_q = grid(lr, torch.from_numpy(coords)[None], "nearest")[0]  # (N, 2)
    dh = torch.linspace(-r, r, 2 * r + 1) * (2 / h)
    dw = torch.linspace(-r, r, 2 * r + 1) * (2 / w)
    ky, kx = c_q[:, :1] + dh, c_q[:, 1:] + dw  # (N, 7) each
    rel_y = (torch.from_numpy(coords[:, :1]) - ky) * h
    rel_x = (torch.from_numpy(coords[:, 1:]) - kx) * w
    np.testing.assert_array_equal(g.rel[:, 0], rel_y.numpy())
    np.testing.assert_array_equal(g.rel[:, 1], rel_x.numpy())

    # key indices: what grid_sample(nearest) picks at each key position
    idx_img = torch.from_numpy(np.stack(np.meshgrid(np.arange(h) + 1, np.arange(w) + 1,
                                                    indexing="ij")).astype(np.float32))[None]
    keys = torch.stack(torch.broadcast_tensors(ky[:, :, None], kx[:, None, :]), -1)
    picked = grid(idx_img, keys.reshape(1, -1, 2), "nearest")[0].reshape(-1, 7, 7, 2).numpy()
    vy = (g.key_idx[:, 0] >= 0) & (g.key_idx[:, 0] < h)
    vx = (g.key_idx[:, 1] >= 0) & (g.key_idx[:, 1] < w)
    valid = vy[:, :, None] & vx[:, None, :]
    ours = np.stack(np.broadcast_arrays(g.key_idx[:, 0, :, None] + 1, g.key_idx[:, 1, None, :] + 1), -1)
    np.testing.assert_array_equal(np.where(valid[..., None], ours, 0), picked)


def test_rel_cell():
    np.testing.assert_array_equal(geometry.rel_cell((84, 70), (24, 20)),
                                  (torch.tensor([2 / 84, 2 / 70]) * torch.tensor([24., 20.])).numpy())


def test_query_geometry_rejects_bad_shape():
    with pytest.raises(ValueError, match="coord"):
        geometry.query_geometry(np.zeros((5, 3), np.float32), (4, 4), 1, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="rel_cell"):  # one cell per image, not per query
        geometry.query_geometry(np.zeros((2, 5, 2), np.float32), (4, 4), 1,
                                np.ones((2, 5, 2), np.float32))


def test_query_chunks_region_is_the_full_grid_restricted():
    """Chunks of an HR region: the region's pixels in raster order, each with the
    geometry (and rel_cell) it has in the full grid; padding repeats the last query."""
    out_hw, lr_hw, region, chunk = (23, 17), (7, 5), ((4, 15), (3, 11)), 13
    (_, _, whole), = geometry.query_chunks(out_hw, lr_hw, 2, out_hw[0] * out_hw[1])
    tw = region[1][1] - region[1][0]
    seen = 0
    for start, count, g in geometry.query_chunks(out_hw, lr_hw, 2, chunk, region=region):
        assert start == seen and g.coord.shape == (chunk, 2)
        k = np.arange(start, start + chunk)
        k[count:] = k[count - 1]
        flat = (region[0][0] + k // tw) * out_hw[1] + region[1][0] + k % tw
        for name in ("coord", "key_idx", "rel"):
            np.testing.assert_array_equal(getattr(g, name), getattr(whole, name)[flat])
        np.testing.assert_array_equal(g.rel_cell, geometry.rel_cell(out_hw, lr_hw))
        seen += count
    assert seen == (region[0][1] - region[0][0]) * tw
