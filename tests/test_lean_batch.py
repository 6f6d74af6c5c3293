"""The lean batch encoding (msit_jax.data.lean): expanded, it is the full batch bit for bit.

The full batch (`make_example` + `collate`) is the reference; the lean one carries
uint8 pixels, int16 query indices and a per-batch geometry table, expanded by
gathers on the host (numpy), under jit, and inside the train step.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import jax
import numpy as np
import pytest

from msit_jax import geometry
from msit_jax.data import lean
from msit_jax.data.pipeline import host_dataset
from msit_jax.data.protocol import (Batch, BatchPlanner, Protocol, collate, make_example,
                                    make_lean_example)
from msit_jax.data.sources import EmbeddedSource
from tests.conftest import REPO, assert_trees_equal, load_config


def assert_batches_identical(got: Batch, want: Batch) -> None:
    """Every array of the two batches: same dtype, shape and values (NaN-free)."""
    g, w = got.to_flat(), want.to_flat()
    assert set(g) == set(w)
    for k in w:
        a, b = np.asarray(g[k]), np.asarray(w[k])
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
        assert np.array_equal(a, b), k


def photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def both_encodings(images, p: Protocol, batch: int, steps, seed: int = 0):
    """(full Batch, lean flat batch, hr) of each step, from the same planner draws."""
    sizes = np.array([im.shape[:2] for im in images])
    planner = BatchPlanner(sizes, batch, seed, p)
    for step in steps:
        idx, _, hr = planner.plan(step)
        full = collate([make_example(images[i], hr, p, planner.example_rng(step, r))
                        for r, i in enumerate(idx)])
        thin = collate([make_lean_example(images[i], hr, p, planner.example_rng(step, r))
                        for r, i in enumerate(idx)])
        yield Batch.from_flat(full), lean.AddTable(p)(thin), hr


@pytest.mark.parametrize("scale_max", [4.0, 8.0])
def test_lean_batches_expand_to_the_full_batches(scale_max):
    """Random steps of the paper protocol (U(1,4) and U(1,8), hr up to 384, non-integer
    scales with exact .5 ties): the host expansion equals make_example + collate."""
    p = Protocol(48, 2304, 1.0, scale_max, True, radius=3)
    images = [photo(390, 400, 0), photo(420, 385, 1)]
    hrs, ties = set(), 0
    for full, flat, hr in both_encodings(images, p, 2, range(0, 400, 23)):
        assert_batches_identical(lean.expand(lean.LeanBatch.from_flat(flat)), full)
        assert isinstance(lean.step_input(flat), lean.LeanBatch)
        mask = geometry.tie_mask((hr, hr), (48, 48))
        q = flat["q_rc"].astype(int)
        ties += int(mask[q[..., 0], q[..., 1]].sum())
        hrs.add(hr)
    assert len(hrs) >= 12 and max(hrs) > (192 if scale_max == 8 else 150)
    assert ties > 1000  # the tie-sensitive queries are among those compared


def test_the_table_gives_query_geometry_at_every_crop_side_including_ties():
    """Every hr of U(1,8) at inp 48: for random pixels and all tie pixels of the crop, the
    table's gathers equal geometry.query_geometry of the pixel centres."""
    h, radius, rows = 48, 3, lean.hr_max(Protocol(48, 2304, 1.0, 8.0))
    rng = np.random.default_rng(0)
    n_ties = 0
    for hr in range(h, rows + 1):
        tie = np.argwhere(geometry.tie_mask((hr, hr), (h, h)))
        tie = tie[rng.permutation(len(tie))[:64]]
        n_ties += len(tie)
        q = np.concatenate([tie, rng.integers(0, hr, (64, 2))]).astype(np.int16)
        coord = geometry.make_coord((hr, hr))[q[:, 0], q[:, 1]]
        want = geometry.query_geometry(coord[None], (h, h), radius,
                                       geometry.rel_cell((hr, hr), (h, h))[None])
        t = lean.geometry_table(hr, h, radius, rows)
        u8 = np.zeros((1, h, h, 3), np.uint8)
        got = lean.expand(lean.LeanBatch(u8, np.zeros((1, len(q), 3), np.uint8), q[None], t))
        for a, b in zip(got.geometry, want):
            assert a.dtype == b.dtype and np.array_equal(a, b), hr
    assert n_ties > 5000


def test_normalisation_table_is_normalize_uint8():
    from msit_jax.data.protocol import normalize_uint8

    v = np.arange(256, dtype=np.uint8)
    assert np.array_equal(lean.norm_table(), normalize_uint8(v))
    pixels = np.stack([v, v[::-1], v], axis=-1)  # (256, 3): every byte in every channel
    got = lean.expand(lean.LeanBatch(pixels.reshape(1, 16, 16, 3), pixels[None],
                                     np.zeros((1, 256, 2), np.int16),
                                     lean.geometry_table(60, 48, 3, 192)))
    assert np.array_equal(got.inp, normalize_uint8(pixels).reshape(1, 16, 16, 3))
    assert np.array_equal(got.gt, normalize_uint8(pixels)[None])


def test_table_rejects_what_it_cannot_express():
    with pytest.raises(ValueError, match="outside the table"):
        lean.geometry_table(200, 48, 3, 192)
    with pytest.raises(ValueError, match="one crop side"):
        lean.batch_table(np.array([60, 61], np.int32), Protocol(48, 2304))
    p = Protocol(48, 2304, 1.0, 4.0)
    assert lean.hr_max(p) == 192
    # the table is read-only: a cached table cannot be corrupted by a consumer
    with pytest.raises(ValueError):
        lean.geometry_table(60, 48, 3, 192).rel[0, 0] = 1.0


def test_lean_examples_are_small():
    p = Protocol(48, 2304, 1.0, 4.0)
    img = photo(200, 200, 3)
    full = make_example(img, 100, p, np.random.default_rng(0))
    thin = make_lean_example(img, 100, p, np.random.default_rng(0))
    assert sum(v.nbytes for v in full.values()) == 331_788  # + the pipeline's step: 331,792
    assert sum(v.nbytes for v in thin.values()) == 23_044
    assert {k: v.dtype for k, v in thin.items()} == dict(
        inp_u8=np.uint8, gt_u8=np.uint8, q_rc=np.int16, hr=np.int32)


def test_expansion_under_jit_equals_the_host_expansion():
    p = Protocol(48, 2304, 1.0, 8.0, radius=3)
    images = [photo(390, 400, 5)]
    fn = jax.jit(lean.expand)
    for full, flat, hr in both_encodings(images, p, 2, (3, 11, 40)):
        got = jax.device_get(fn(lean.LeanBatch.from_flat(flat)))
        assert_batches_identical(Batch(*got), full)


def _take(ds, n):
    it = iter(ds)
    return it, [next(it) for _ in range(n)]


def test_lean_pipeline_stream_hosts_and_resume():
    """host_dataset(lean=True): each batch expands to host_dataset's full batch; two hosts
    give the halves (and the same table); the iterator state resumes mid-stream."""
    src = EmbeddedSource("train")
    p = Protocol(inp_size=16, sample_q=64, scale_max=8.0, radius=1)
    kw = dict(global_batch=4, seed=3, total_steps=20)
    _, full = _take(host_dataset(src, p, **kw), 4)
    it, thin = _take(host_dataset(src, p, lean=True, **kw), 3)
    for f, t in zip(full, thin):
        assert_batches_identical(lean.expand(lean.step_input(t)), Batch.from_flat(f))
        assert np.array_equal(t["step"], f["step"]) and np.array_equal(t["hr"], f["hr"])
    halves = [_take(host_dataset(src, p, lean=True, process_index=i, process_count=2,
                                 **kw), 3)[1] for i in range(2)]
    for s in range(3):
        for k, v in thin[s].items():
            if k in lean.TABLE_KEYS:  # no batch axis: the same on every host
                for h in halves:
                    assert np.array_equal(h[s][k], v)
            else:
                np.testing.assert_array_equal(np.concatenate([h[s][k] for h in halves]), v)
    state = it.get_state()
    it2 = iter(host_dataset(src, p, lean=True, **kw))
    it2.set_state(state)
    nxt = next(it2)
    assert_batches_identical(lean.expand(lean.step_input(nxt)), Batch.from_flat(full[3]))


@pytest.mark.slow  # worker processes start and import jax
def test_lean_pipeline_with_workers_is_the_same_stream():
    src = EmbeddedSource("train")
    p = Protocol(inp_size=16, sample_q=64, radius=1)
    kw = dict(global_batch=4, seed=3, total_steps=20, lean=True)
    _, ref = _take(host_dataset(src, p, **kw), 3)
    it, got = _take(host_dataset(src, p, num_workers=2, **kw), 2)
    state = it.get_state()
    it.close()
    it3 = iter(host_dataset(src, p, num_workers=2, **kw))
    it3.set_state(state)
    got.append(next(it3))
    it3.close()
    for a, b in zip(got, ref):
        assert set(a) == set(b)
        for k in b:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow  # two compilations of the tiny train step
def test_train_step_on_the_lean_batch_is_the_full_step():
    """jit_train_step on the device-transferred lean batch (table replicated) gives the
    loss, metrics and parameters of the same step on the expanded Batch, exactly."""
    from msit_jax.data.pipeline import to_global
    from msit_jax.models.model import build_model, dummy_inputs
    from msit_jax.training.state import create_state, init_variables, make_optimizer
    from msit_jax.training.step import batch_sharding, jit_train_step, make_mesh

    cfg = load_config()
    model = build_model(cfg.model)
    tx, schedule = make_optimizer(cfg)
    d = cfg.data
    v = jax.device_get(init_variables(model, jax.random.PRNGKey(0),
                                      dummy_inputs(cfg.model, (d.inp_size, d.inp_size),
                                                   d.sample_q)))
    p = Protocol(d.inp_size, d.sample_q, d.scale_min, 3.3, radius=cfg.model.radius)
    kw = dict(global_batch=cfg.batch_size, seed=1, total_steps=3)
    thin = next(iter(host_dataset(EmbeddedSource("train"), p, lean=True, **kw)))
    full = next(iter(host_dataset(EmbeddedSource("train"), p, **kw)))
    mesh = make_mesh()
    step = jit_train_step(model, tx, schedule, mesh)
    s_lean, m_lean = step(create_state(v, tx),
                          lean.step_input(to_global(thin, batch_sharding(mesh))))
    s_full, m_full = step(create_state(v, tx),
                          lean.step_input(to_global(full, batch_sharding(mesh))))
    assert float(m_lean["loss"]) == float(m_full["loss"])
    assert_trees_equal(jax.device_get(m_lean), jax.device_get(m_full))
    assert_trees_equal(jax.device_get(s_lean), jax.device_get(s_full))


def test_benchmark_quick_mode_prints_its_tables():
    spec = importlib.util.spec_from_file_location(
        "input_pipeline_bench", os.path.join(REPO, "benchmarks", "input_pipeline.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    lines: list[str] = []
    t0 = time.perf_counter()
    cases = mod.main(["--quick"], out=lines.append)
    assert time.perf_counter() - t0 < 10
    text = "\n".join(lines)
    for needle in ("decode PNG / open cache", "Bytes per sample", "TPU v5e-8 host",
                   "one H100 SXM", "| lean | cache | U(1,8) |"):
        assert needle in text, needle
    by = {(c.encoding, c.read, c.scale_max): c for c in cases}
    assert len(by) == 8
    cur, thin = by[("current", "cache", 4.0)], by[("lean", "cache", 4.0)]
    assert sum(thin.bytes.values()) * 5 < sum(cur.bytes.values())
    assert all(c.cpu_ms > 0 and c.samples == 4 for c in cases)


SHARDED_CHECK = r"""
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from msit_jax.data import lean
from msit_jax.data.pipeline import host_dataset, to_global
from msit_jax.data.protocol import Batch, Protocol
from msit_jax.data.sources import EmbeddedSource
from msit_jax.training.step import batch_sharding, lean_sharding, make_mesh

assert jax.device_count() == 4
p = Protocol(inp_size=16, sample_q=64, scale_max=8.0, radius=1)
kw = dict(global_batch=8, seed=5, total_steps=3)
thin = next(iter(host_dataset(EmbeddedSource("train"), p, lean=True, **kw)))
full = Batch.from_flat(next(iter(host_dataset(EmbeddedSource("train"), p, **kw))))
mesh = make_mesh()
g = to_global(thin, batch_sharding(mesh))
for k in lean.TABLE_KEYS:
    assert g[k].sharding.is_fully_replicated and g[k].shape == thin[k].shape, k
for k in lean.EXAMPLE_KEYS:
    assert g[k].sharding.spec == P("data") and not g[k].sharding.is_fully_replicated, k
fn = jax.jit(lean.expand, in_shardings=(lean_sharding(mesh),))
got = jax.device_get(fn(lean.step_input(g)))
for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(full)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
print("SHARDED-OK")
"""


@pytest.mark.slow  # a subprocess with 4 virtual devices
def test_lean_batch_transfers_and_expands_on_a_sharded_mesh():
    """to_global shards the examples over 'data' and replicates the table; the jitted
    expansion with the train step's in_shardings equals the full batch bit for bit."""
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    res = subprocess.run([sys.executable, "-c", SHARDED_CHECK], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "SHARDED-OK" in res.stdout, res.stderr[-3000:]
