"""The training progress bar and the logged step rate count completed steps."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import pytest

from msit_jax.training import loop
from msit_jax.training.progress import MAX_INFLIGHT_STEPS, RateWindow, StepTracker
from tests.conftest import load_config


class Token:
    """A step output whose readiness the test controls (as a jax.Array's is_ready)."""

    def __init__(self):
        self.ready, self.waited = False, False

    def is_ready(self) -> bool:
        return self.ready

    def block_until_ready(self):
        self.waited = self.ready = True
        return self


def test_tracker_counts_finished_steps_in_order_and_bounds_the_run_ahead():
    done = []
    t = StepTracker(10, done.append, max_inflight=2)
    a, b, c = Token(), Token(), Token()
    t.add(11, a)
    t.add(12, b)
    assert (t.completed, t.inflight, done) == (10, 2, [])  # dispatched is not done
    b.ready = True
    assert t.poll() == 0 and t.completed == 10  # 12 cannot finish before 11 is seen
    t.add(13, c)  # a third in flight: waits for the oldest, then counts 12 as well
    assert a.waited and not b.waited and not c.waited
    assert (t.completed, t.inflight, done) == (12, 1, [1, 1])
    assert t.drain() == 1 and c.waited and (t.completed, t.inflight, done) == (13, 0, [1, 1, 1])
    assert t.drain() == 0 and done == [1, 1, 1]


def test_tracker_rejects_an_empty_window():
    with pytest.raises(ValueError, match="max_inflight must be >= 1"):
        StepTracker(0, print, max_inflight=0)


def test_rate_window():
    r = RateWindow(100, 10.0)
    assert r.rate(100, 12.0) is None  # no step completed in the window
    assert r.rate(150, 15.0) == 10.0
    r.start(150, 15.0)
    assert r.rate(160, 17.0) == 5.0


DEVICE_LOOPS = 40


def _slow_on_device(monkeypatch):
    """Make every train step's outputs arrive ~tens of ms after dispatch: a chain of
    matmuls that depends on the loss runs after the real step, on the device, so
    dispatch returns at once (as on an accelerator) while the step is not done."""
    real = loop.jit_train_step

    @jax.jit
    def busy(loss):
        x = jnp.full((192, 192), 1e-3, jnp.float32) + loss * 0.0
        x = jax.lax.fori_loop(0, DEVICE_LOOPS, lambda i, x: jnp.tanh(x @ x), x)
        return loss + 0.0 * x[0, 0]

    def jit_train_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def slow_step(state, batch):
            state, metrics = step(state, batch)
            return state, dict(metrics, loss=busy(metrics["loss"]))
        return slow_step

    monkeypatch.setattr(loop, "jit_train_step", jit_train_step)


@pytest.mark.slow
def test_bar_rate_matches_logged_rate_with_the_device_behind(tmp_path, monkeypatch):
    """Steps finish well after dispatch. The bar advances at the completed-step rate
    (within 10% of metrics.jsonl's), never runs ahead of the steps logged, and the
    host never holds more than MAX_INFLIGHT_STEPS steps in flight. (On the code that
    advanced the bar at dispatch, the bar ran several times faster than the logged
    rate between log points.)"""
    import tqdm.auto

    updates, inflight = [], []
    real_add = StepTracker.add

    def add(self, step, token):
        real_add(self, step, token)
        inflight.append(self.inflight)

    class Bar(tqdm.auto.tqdm):
        def update(self, n=1):
            out = super().update(n)
            updates.append((time.perf_counter(), self.n))
            return out

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(StepTracker, "add", add)
    _slow_on_device(monkeypatch)
    cfg = load_config()
    cfg.update(total_steps=60, log_every_steps=20, progress_bar=True)
    cfg.checkpoint.every_steps = 1000
    wd = str(tmp_path / "run")
    loop.train_and_evaluate(cfg, wd)

    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train = {r["step"]: r for r in recs if r["split"] == "train"}
    assert sorted(train) == [20, 40, 60]
    assert max(inflight) <= MAX_INFLIGHT_STEPS
    for lo, hi in ((20, 40), (40, 60)):
        seg = [(t, n) for t, n in updates if lo <= n <= hi]
        (t0, n0), (t1, n1) = seg[0], seg[-1]
        assert (n0, n1) == (lo, hi)
        bar_rate = (n1 - n0) / (t1 - t0)
        logged = train[hi]["steps_per_sec"]
        assert abs(bar_rate / logged - 1) < 0.10, (lo, hi, bar_rate, logged)
        # no burst: every stretch of 5 completed steps runs near the logged rate (the
        # dispatch-time bar ran 5 steps in a few ms, then stalled at the log point)
        for i, (ta, na) in enumerate(seg):
            later = [(tb, nb) for tb, nb in seg[i + 1:] if nb >= na + 5]
            if later:
                tb, nb = later[0]
                assert (nb - na) / (tb - ta) < 2 * logged, (na, nb, tb - ta, logged)
