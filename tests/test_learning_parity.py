"""The pure helpers of benchmarks/learning_parity.py (no torch, no training)."""

from __future__ import annotations

import pytest

from tests.conftest import import_benchmark


@pytest.fixture(scope="module")
def lp():
    return import_benchmark("learning_parity")


def test_window_means_match_the_train_log_windows(lp):
    steps = list(range(1, 8))
    s, v = lp.window_means(steps, [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 2.0], every=3)
    assert s == [3, 6, 7]  # the last, partial window ends at the last step
    assert v == pytest.approx([3.0, 9.0, 2.0])


def test_schedule_epochs_checks_divisibility(lp):
    s = lp.default_settings()
    assert lp.schedule_epochs(s) == (5, 100)
    with pytest.raises(SystemExit):
        lp.schedule_epochs(dict(s, steps=2010))
    with pytest.raises(SystemExit):
        lp.schedule_epochs(dict(s, warmup_epochs=100))


def _finals(ours, theirs):
    return {"ours": {0: {"Set5": {"x2": ours[0]}}, 1: {"Set5": {"x2": ours[1]}}},
            "theirs": {0: {"Set5": {"x2": theirs[0]}}, 1: {"Set5": {"x2": theirs[1]}}}}


def test_summarize_uses_0p1_db_or_the_larger_seed_spread(lp):
    row = lp.summarize(_finals((30.0, 30.1), (30.12, 30.16)))["Set5 x2"]
    assert row["ours"]["mean"] == pytest.approx(30.05)
    assert row["ours"]["spread"] == pytest.approx(0.1)
    assert row["theirs"]["spread"] == pytest.approx(0.04)
    assert row["abs_diff"] == pytest.approx(0.09)
    assert row["tolerance"] == pytest.approx(0.1) and row["agree"]

    row = lp.summarize(_finals((30.0, 30.0), (30.2, 30.2)))["Set5 x2"]
    assert row["abs_diff"] == pytest.approx(0.2) and not row["agree"]

    # a spread larger than 0.1 dB widens the tolerance
    row = lp.summarize(_finals((30.0, 30.5), (30.45, 30.45)))["Set5 x2"]
    assert row["tolerance"] == pytest.approx(0.5) and row["agree"]


def test_markdown_table_has_a_row_per_set_and_scale(lp):
    rows = lp.summarize(_finals((30.0, 30.0), (30.2, 30.2)))
    table = lp.markdown_table(rows, [0, 1]).splitlines()
    assert len(table) == 3
    assert table[2].startswith("| Set5 x2 | 30.000 | 30.000 |")
    assert table[2].rstrip().endswith("**no** |")


def test_one_side_only_has_no_verdict(lp):
    rows = lp.summarize({"ours": {0: {"Set5": {"x4": 27.0}}}})
    assert "agree" not in rows["Set5 x4"]
    assert lp.markdown_table(rows, [0]).splitlines()[2].endswith("| - | - | - |")


def test_ours_config_is_the_compared_protocol(lp):
    import argparse

    from msit_jax.io.pretrained import config_from_official_args
    from msit_jax.training.config import validate_config

    s = lp.default_settings()
    a = argparse.Namespace(data="/nonexistent/train", eval_data="/nonexistent")
    c = lp.ours_config(a, s, seed=1)
    validate_config(c)
    assert c.seed == 1 and c.batch_size == 4 and c.total_steps == 2000
    assert (c.lr.warmup_steps, c.lr.epoch_steps) == (100, 20)
    assert (c.data.inp_size, c.data.sample_q, c.data.scale_min, c.data.scale_max) == (
        24, 576, 1.0, 4.0)
    assert c.eval.source.path == "/nonexistent/Set5" and c.eval.y_channel
    assert c.eval.shave_extra == 0 and c.eval.scales == (4.0,)
    # The official model args describe exactly the model our side trains.
    spec = lp.official_spec(c.model)
    assert spec["name"] == "amsit"
    back = config_from_official_args(spec["args"], "plain").to_dict()
    want = c.model.to_dict()
    back.pop("rdn"), want.pop("rdn")  # the unused encoder's sizes
    assert back == want
