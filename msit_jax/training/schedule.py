"""The reference learning-rate schedule: linear warm-up to `multiplier` x base, then cosine to 0.

The official code steps its schedulers once per epoch (1000 iterations of
batch 32 on DIV2K x 40): `GradualWarmupScheduler(multiplier=10, total_epoch=50)`
chained into `CosineAnnealingLR(T_max=epoch_max - 50)`. Epoch e (1-based)
trains with, L = e - 1, W = warm-up epochs, E = total epochs, m = multiplier:

    L <= W:  base * (1 + (m - 1) * L / W)
    L >  W:  m * base * (1 + cos(pi * (L - W - 1) / (E - W))) / 2

(the peak is held for two epochs, L = W and W + 1, as torch's chained
schedulers do, up to rounding). With `epoch_steps > 0` this is what you get,
constant within each epoch of `epoch_steps` steps. torch's recursive cosine
(2.13) is not exactly this closed form: one epoch after the warm-up it
overshoots the peak slightly (x1.0000025 at W = 50, x1.00027 at W = 5), and it
drifts from the closed form by <= 3e-6 relative over most of the reference
recipe, up to ~5e-4 relative (< 2e-11 absolute) in its last epochs, where the
rate is ~1e-9 (benchmarks/learning_parity.py records both sides' rates; the
largest relative gap there is 2.8e-4). With `epoch_steps = 0` the same
shape is applied per step: linear from base to m * base over `warmup_steps`,
then cosine from m * base to 0 at `total_steps`.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def lr_schedule(base: float, multiplier: float, warmup_steps: int, total_steps: int,
                epoch_steps: int = 0) -> optax.Schedule:
    """step (int array) -> learning rate (float32)."""
    if base <= 0 or multiplier <= 0:
        raise ValueError(f"lr.base ({base}) and lr.multiplier ({multiplier}) must be positive")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= lr.warmup_steps ({warmup_steps}) < total_steps "
                         f"({total_steps})")
    if epoch_steps:
        if warmup_steps % epoch_steps or total_steps % epoch_steps:
            raise ValueError(f"lr.warmup_steps ({warmup_steps}) and total_steps ({total_steps}) "
                             f"must be multiples of lr.epoch_steps ({epoch_steps})")
        w, e, unit, hold = warmup_steps // epoch_steps, total_steps // epoch_steps, epoch_steps, 1
    else:
        w, e, unit, hold = warmup_steps, total_steps, 1, 0

    def schedule(step):
        t = (jnp.asarray(step) // unit).astype(jnp.float32)
        ramp = t / w if w else 1.0  # no warm-up: start at the peak
        warm = base * (1.0 + (multiplier - 1.0) * ramp)
        frac = jnp.clip((t - w - hold) / (e - w), 0.0, 1.0)
        cos = multiplier * base * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(t <= w, warm, cos).astype(jnp.float32)

    return schedule
