"""torch.nn.functional.grid_sample (align_corners=False) for one sample point.

Written for a single coordinate; `jax.vmap` lifts them to many. Bilinear
sampling is continuous in the coordinate, so computing it on device is safe;
nearest sampling is not, and its indices come from `msit_jax.geometry`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def unnormalize(c: Array, n: int) -> Array:
    """Continuous pixel index of coordinate c on an axis of size n."""
    return ((c + 1.0) * n - 1.0) / 2.0


def axis_taps(c: Array, n: int, border: bool) -> tuple[Array, Array]:
    """Two (index, weight) taps along one axis; out-of-range taps get weight 0."""
    u = unnormalize(c, n)
    if border:
        u = jnp.clip(u, 0.0, n - 1.0)
    i0 = jnp.floor(u)
    idx = jnp.stack([i0, i0 + 1.0])
    wgt = jnp.stack([i0 + 1.0 - u, u - i0])
    valid = (idx >= 0) & (idx <= n - 1)
    return jnp.clip(idx, 0, n - 1).astype(jnp.int32), jnp.where(valid, wgt, 0.0)


def bilinear(img: Array, coord: Array, *, border: bool = False) -> Array:
    """Bilinear sample of img (H, W, C) at coord (2,) = (row, col) -> (C,).

    border=False: zero padding; border=True: the coordinate is clamped to the
    image first (padding_mode='border').
    """
    h, w = img.shape[:2]
    iy, wy = axis_taps(coord[0], h, border)
    ix, wx = axis_taps(coord[1], w, border)
    corners = img[iy[:, None], ix[None, :]]  # (2, 2, C)
    weights = (wy[:, None] * wx[None, :]).astype(img.dtype)
    # Elementwise, not a dot: a dot may run at reduced precision on GPU/TPU.
    return jnp.sum(weights[..., None] * corners, axis=(0, 1))


def nearest_clipped(img: Array, idx_y: Array, idx_x: Array) -> tuple[Array, Array]:
    """Nearest samples on the grid idx_y (A,) x idx_x (B,), indices clipped into the image.

    Returns values (A, B, C) and validity (A, B): where invalid, grid_sample's
    zero padding would give a zero vector. Callers apply the mask to whatever
    small quantity the zero vector feeds (cheaper than masking C-wide vectors).
    """
    h, w = img.shape[:2]
    vy = (idx_y >= 0) & (idx_y < h)
    vx = (idx_x >= 0) & (idx_x < w)
    vals = img[jnp.clip(idx_y, 0, h - 1)[:, None], jnp.clip(idx_x, 0, w - 1)[None, :]]
    return vals, vy[:, None] & vx[None, :]

