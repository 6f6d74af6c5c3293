"""End-to-end training on the tiny config: checkpoints, exact resume, stage-2 init, bad inputs.

Every run here uses configs/tiny.py unchanged apart from the workdir-level
settings (its train step compiles once per process and is reused).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys

import flax.traverse_util as tu
import jax
import numpy as np
import pytest

from msit_jax import build_model, errors, geometry
from msit_jax.io import model_dir, pretrained
from msit_jax.training import train_and_evaluate
from msit_jax.io.workdir import load_workdir_model
from msit_jax.training.config import fit_warmup, validate_config
from msit_jax.training.loop import prepare_workdir
from msit_jax.training.metrics import MetricLogger, read_jsonl
from msit_jax.training.schedule import lr_schedule
from msit_jax.training.stage2 import init_from
from msit_jax.training.state import make_optimizer
from tests.conftest import assert_trees_equal, flat, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """An uninterrupted 4-step tiny stage-1 run, validated at steps 2 and 4."""
    cfg = load_config("tiny")
    cfg.eval.every_steps = 2
    wd = str(tmp_path_factory.mktemp("runs") / "nested" / "stage1")  # parents created
    return cfg, wd, train_and_evaluate(cfg, wd)


def test_run_writes_checkpoints_logs_and_configs(stage1):
    cfg, wd, res = stage1
    assert res.step == 4 and int(res.state["step"]) == 4
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]
    for f in ("config.json", "model_config.json", "metrics.jsonl"):
        assert os.path.isfile(os.path.join(wd, f))
    recs = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert np.isfinite(r["loss"]) and r["lr"] > 0 and {"grad_norm", "epoch"} <= r.keys()
    assert "steps_per_sec" not in train[0]  # the compiling first step is not timed
    for r in train[1:]:
        assert r["steps_per_sec"] > 0 and r["pixels_per_sec"] == pytest.approx(
            r["steps_per_sec"] * cfg.batch_size * cfg.data.sample_q)
    val = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and all(np.isfinite(r["psnr_x2"]) for r in val)
    # the logged learning rates follow the schedule
    sched = lr_schedule(cfg.lr.base, cfg.lr.multiplier, cfg.lr.warmup_steps, cfg.total_steps)
    np.testing.assert_allclose([r["lr"] for r in train], [float(sched(s)) for s in range(4)],
                               rtol=1e-6)
    # the workdir's model loads through pretrained.load, as its best checkpoint
    mcfg, v = pretrained.load(wd)
    assert mcfg.to_dict() == cfg.model.to_dict()
    best = max(val, key=lambda r: r["val_psnr"])["step"]
    _, v_best = load_workdir_model(wd, str(best))
    assert_trees_equal(v["params"], v_best["params"])
    _, v_last = load_workdir_model(wd, "latest")
    assert_trees_equal(v_last["params"], res.state["params"])
    assert_trees_equal(v_last["batch_stats"], res.state["batch_stats"])


def test_killed_and_resumed_run_is_bit_identical(stage1, tmp_path):
    cfg, wd, full = stage1
    wd2 = str(tmp_path / "resumed")
    part = train_and_evaluate(cfg, wd2, stop_after_step=3)  # "killed" after step 3
    assert part.step == 3
    assert sorted(os.listdir(os.path.join(wd2, "checkpoints"))) == ["2"]  # step 3 never saved
    res = train_and_evaluate(cfg, wd2)  # resumes from step 2: params, Adam, BN, data
    assert res.step == 4
    assert_trees_equal(res.state, full.state)
    assert losses(wd2) == losses(wd)  # the same loss curve, step 3 logged once
    # a finished run resumes to nothing
    again = train_and_evaluate(cfg, wd2)
    assert again.step == 4
    assert_trees_equal(again.state["params"], full.state["params"])


def test_stage2_from_stage1_workdir_keeps_w_frozen(stage1, tmp_path):
    cfg1, wd1, res1 = stage1
    cfg = load_config("tiny")
    cfg.model.conv = "rim"
    cfg.init_from = wd1
    cfg.data.scale_max = 8.0  # stage 2's own scale range
    res = train_and_evaluate(cfg, str(tmp_path / "stage2"))
    _, stage1_vars = pretrained.load(wd1)  # its best checkpoint
    s1, fz = flat(stage1_vars["params"]), flat(res.state["frozen"])
    assert fz and all(np.array_equal(v, s1[k]) for k, v in fz.items())  # W never updated
    p = flat(res.state["params"])
    assert any(not np.array_equal(p[k], s1[k]) for k in p if k in s1)  # the rest trained
    assert all(k.endswith(("/convmap", "/scale")) or k in s1 for k in p)


def rim_equals_plain_outputs(plain_cfg, plain_vars, rim_cfg, rim_vars):
    """Outputs of both models (eval and train mode) on one random batch."""
    rs = np.random.RandomState(0)
    inp = rs.uniform(-1, 1, (2, 9, 11, 3)).astype(np.float32)
    coord = rs.uniform(-1, 1, (2, 40, 2)).astype(np.float32)
    rc = np.tile(geometry.rel_cell((20, 23), (9, 11)), (2, 1))
    g = geometry.query_geometry(coord, (9, 11), plain_cfg.radius, rc)
    outs = []
    for cfg, v in ((plain_cfg, plain_vars), (rim_cfg, rim_vars)):
        m = build_model(cfg)
        outs.append([np.asarray(m.apply(v, inp, g)),
                     np.asarray(m.apply(v, inp, g, train=True,
                                        mutable=["batch_stats"])[0])])
    return outs


def zero_rim_adapters(v):
    params = tu.flatten_dict(v["params"])
    rims = {k[:-1] for k in tu.flatten_dict(v["frozen"])}
    for k in params:
        if k[:-1] in rims and k[-1] in ("convmap", "scale"):
            params[k] = np.zeros_like(params[k])
    return {**v, "params": tu.unflatten_dict(params)}


def fresh_rim(cfg):
    from msit_jax.models.model import dummy_inputs
    from msit_jax.training.state import init_variables

    m = build_model(cfg)
    return jax.tree_util.tree_map(np.asarray, init_variables(
        m, jax.random.PRNGKey(1), dummy_inputs(cfg, (12, 12), 32)))


@pytest.fixture(scope="module")
def rim_fresh(stage1):
    cfg = stage1[0].model.copy_and_resolve_references()
    cfg.conv = "rim"
    return cfg, fresh_rim(cfg)


def test_stage2_init_reproduces_stage1_outputs(stage1, rim_fresh, tmp_path):
    """convmap = scale = 0 makes every RIM kernel exactly the stage-1 kernel."""
    plain_cfg, _, res1 = stage1
    plain_cfg = plain_cfg.model
    rim_cfg, fresh = rim_fresh
    plain_vars = {k: res1.state[k] for k in ("params", "batch_stats")}
    mdir = model_dir.save_model(str(tmp_path / "model"), plain_cfg, plain_vars)
    for source in (mdir, stage1[1]):  # a model dir and a training workdir
        v = init_from(source, rim_cfg, fresh)
        fp = flat(fresh["params"])
        rims = {k.rsplit("/", 1)[0] for k in flat(v["frozen"])}
        adapters = [k for k in fp if k.rsplit("/", 1)[0] in rims
                    and k.endswith(("/convmap", "/scale"))]
        assert len(adapters) == 2 * len(rims)
        assert all(np.array_equal(flat(v["params"])[k], fp[k]) for k in adapters)  # kept fresh
        (p_eval, p_train), (r_eval, r_train) = rim_equals_plain_outputs(
            plain_cfg, plain_vars if source == mdir else pretrained.load(source)[1],
            rim_cfg, zero_rim_adapters(v))
        np.testing.assert_array_equal(r_eval, p_eval)
        np.testing.assert_array_equal(r_train, p_train)
        # with the fresh (non-zero) adapters the outputs move
        (p_eval2, _), (r_eval2, _) = rim_equals_plain_outputs(plain_cfg, plain_vars, rim_cfg, v)
        if source == mdir:
            assert np.abs(r_eval2 - p_eval2).max() > 1e-4


def test_stage2_init_from_official_pth(stage1, rim_fresh, tmp_path):
    torch = pytest.importorskip("torch")
    from msit_jax.io.torch_io import variables_to_state_dict

    plain_cfg = stage1[0].model
    plain_vars = {k: stage1[2].state[k] for k in ("params", "batch_stats")}
    sd = {k: torch.from_numpy(np.array(v, copy=True))
          for k, v in variables_to_state_dict(plain_vars, plain_cfg).items()}
    c = plain_cfg
    args = {"encoder_spec": {"name": "edsr-baseline", "args": {
                "no_upsampling": True, "n_resblocks": c.edsr.n_resblocks, "n_feats": c.edsr.n_feats}},
            "base_dim": c.dim, "head": c.heads, "r": c.radius, "imnet_num": 1, "conv_num": 1,
            "is_cell": True, "local_attn": True, "use_lem": True, "MsC_heads": c.msno_heads,
            "MsSA_q": c.qk_heads,
            "pb_spec": {"name": "posenc", "args": {"posenc_type": "sinusoid",
                                                   "posenc_scale": c.posenc_scale,
                                                   "enc_dims": c.posenc_dims}},
            "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "act": "gelu",
                                                   "hidden_list": list(c.mlp_hidden)}}}
    path = str(tmp_path / "epoch-best.pth")
    torch.save({"model": {"name": "amsit", "args": args, "sd": sd}}, path)
    rim_cfg, fresh = rim_fresh
    v = init_from(path, rim_cfg, fresh)
    (p_eval, _), (r_eval, _) = rim_equals_plain_outputs(plain_cfg, plain_vars, rim_cfg,
                                                        zero_rim_adapters(v))
    np.testing.assert_array_equal(r_eval, p_eval)


def test_init_from_rejects_other_architectures(stage1, tmp_path):
    cfg = stage1[0].model.copy_and_resolve_references()
    cfg.conv = "rim"
    cfg.dim = 64
    with pytest.raises(ValueError, match=r"dim: 16 \(source\) != 64"):
        init_from(stage1[1], cfg, fresh_rim(cfg))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        init_from(str(tmp_path / "missing"), cfg, {})


def test_workdir_handling(tmp_path):
    nested = tmp_path / "a" / "b" / "run"
    assert prepare_workdir(str(nested)) == str(nested) and nested.is_dir()  # parents created
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        prepare_workdir(str(f))
    with pytest.raises(ValueError, match="workdir"):
        prepare_workdir("")
    with pytest.raises(FileNotFoundError, match="nor a msit-jax model checkpoint nor"):
        pretrained.load(str(tmp_path))


def test_bad_training_settings_name_the_field(tmp_path):
    cfg = load_config("tiny")
    cfg.total_steps = 0
    with pytest.raises(ValueError, match="total_steps"):
        train_and_evaluate(cfg, str(tmp_path / "r"))
    cfg = load_config("tiny")
    cfg.data.train.kind = "folder"
    cfg.data.train.path = str(tmp_path / "empty")
    os.makedirs(cfg.data.train.path)
    with pytest.raises(FileNotFoundError, match="no image files"):
        train_and_evaluate(cfg, str(tmp_path / "r"))


def test_reference_schedule_per_epoch():
    """Values of the official GradualWarmupScheduler(10, 50) + CosineAnnealingLR(1000),
    stepped per epoch (computed with torch 2.13), at 1000 steps per epoch."""
    sched = lr_schedule(1e-5, 10.0, 50_000, 1_050_000, epoch_steps=1000)
    torch_values = {1: 1e-05, 2: 1.18e-05, 3: 1.36e-05, 26: 5.5e-05, 50: 9.82e-05, 51: 1e-4,
                    52: 1.000002467405159e-04, 53: 1e-4, 54: 9.999925978088752e-05,
                    300: 8.557699501306224e-05, 550: 5.031428134368903e-05,
                    800: 1.486753819420744e-05, 1000: 6.657044321650938e-07,
                    1049: 2.220650031738408e-09, 1050: 9.86959628367501e-10}
    for epoch, lr in torch_values.items():
        for step in ((epoch - 1) * 1000, epoch * 1000 - 1):  # constant within an epoch
            # torch's recursive cosine drifts from the closed form by <= 3e-6 relative
            # (plus float32 here near the end, where the values are ~1e-9)
            assert float(sched(step)) == pytest.approx(lr, rel=3e-6, abs=2e-11)
    smooth = lr_schedule(1e-3, 10.0, 10, 110)
    np.testing.assert_allclose([float(smooth(s)) for s in (0, 5, 10, 60, 110)],
                               [1e-3, 5.5e-3, 1e-2, 5e-3, 0.0], atol=1e-9)
    with pytest.raises(ValueError, match="multiples of lr.epoch_steps"):
        lr_schedule(1e-5, 10.0, 50, 1000, epoch_steps=7)


def test_a_warmup_longer_than_the_run_is_clipped_to_a_tenth():
    cfg = load_config("default")  # 100 warm-up steps
    cfg.total_steps = 50
    fitted, warning = fit_warmup(cfg)
    assert fitted.lr.warmup_steps == 5 and cfg.lr.warmup_steps == 100  # a copy; input kept
    assert "lr.warmup_steps=100 is not shorter than total_steps=50" in warning
    assert "warming up for 5 steps" in warning and "\n" not in warning
    validate_config(fitted)
    with pytest.raises(errors.ConfigError, match=r"lr\.warmup_steps=100 must be >= 0 and < "
                       r"total_steps \(50\)"):
        validate_config(cfg)  # what train.py said (as a traceback) before the clip
    # the schedule keeps its shape: a ramp to the peak, then the cosine to 0 at the end
    sched = lr_schedule(cfg.lr.base, cfg.lr.multiplier, 5, 50)
    assert float(sched(5)) == pytest.approx(cfg.lr.base * cfg.lr.multiplier)
    assert float(sched(49)) < 0.01 * float(sched(5))
    cfg.total_steps = 100  # warm-up == total_steps is as invalid
    assert fit_warmup(cfg)[0].lr.warmup_steps == 10
    # per-epoch schedules clip to whole epochs
    paper = load_config("msit_edsr_stage1")
    paper.total_steps = 20_000
    fitted, _ = fit_warmup(paper)
    assert fitted.lr.warmup_steps == 2000 and fitted.lr.epoch_steps == 1000
    paper.total_steps = 5000
    assert fit_warmup(paper)[0].lr.warmup_steps == 0  # less than an epoch: no warm-up
    validate_config(fit_warmup(paper)[0])
    # valid values are left alone (the same object)
    tiny = load_config("tiny")
    assert fit_warmup(tiny) == (tiny, None)


@pytest.mark.parametrize("field,value,needle", [
    ("lr.warmup_steps", -1, "lr.warmup_steps=-1 must be >= 0"),
    ("total_steps", 0, "total_steps=0 must be >= 1"),
    ("total_steps", 500, "--config.lr.epoch_steps=0")])  # not a whole number of epochs
def test_a_warmup_that_cannot_be_fixed_stays_a_config_error(field, value, needle):
    cfg = load_config("msit_edsr_stage1" if field == "total_steps" and value else "tiny")
    *parents, leaf = field.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value
    fitted, warning = fit_warmup(cfg)
    assert fitted is cfg and warning is None
    with pytest.raises(errors.ConfigError) as e:
        validate_config(fitted)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_short_run_on_the_command_line_warns_once_and_trains(tmp_path):
    """`train.py ... --config.total_steps=50` on a config with a 100-step warm-up."""
    wd = str(tmp_path / "short")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
                        wd, "--config.total_steps=50", "--config.lr.warmup_steps=100",
                        "--config.checkpoint.every_steps=25"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    mentions = [ln for ln in p.stderr.splitlines() if "warmup" in ln]
    assert len(mentions) == 1 and mentions[0].startswith("W"), mentions  # absl WARNING line
    assert "lr.warmup_steps=100 is not shorter than total_steps=50" in mentions[0]
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["lr"]["warmup_steps"] == 5  # the warm-up actually used
    cfg = load_config("tiny")
    sched = lr_schedule(cfg.lr.base, cfg.lr.multiplier, 5, 50)
    train = [r for r in read_jsonl(os.path.join(wd, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 51))
    np.testing.assert_allclose([r["lr"] for r in train], [float(sched(s)) for s in range(50)],
                               rtol=1e-6)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["25", "50"]


def _tb_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the event files under logdir (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_files_hold_the_logged_scalars(tmp_path):
    logger = MetricLogger(str(tmp_path), tensorboard=True)
    logger.write(1, "train", {"loss": 0.5, "lr": 1e-4})
    logger.write(2, "train", {"loss": 0.25, "lr": float("nan")})  # non-finite: jsonl null only
    logger.write(2, "val", {"val_psnr": 30.0})
    logger.close()
    scalars = _tb_scalars(str(tmp_path / "tensorboard"))
    assert scalars == {"train/loss": [(1, 0.5), (2, 0.25)], "train/lr": [(1, pytest.approx(1e-4))],
                       "val/val_psnr": [(2, 30.0)]}


def test_training_logs_without_tensorboardx(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # not installed
    with caplog.at_level(logging.INFO, logger="msit_jax"):
        logger = MetricLogger(str(tmp_path), tensorboard=True)
    logger.write(1, "train", {"loss": 0.5})
    logger.close()
    assert "tensorboardX is not installed" in caplog.text
    assert not (tmp_path / "tensorboard").exists()
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "split": "train",
                                                            "loss": 0.5}]


def test_gradient_clipping_is_applied_before_adam():
    cfg = load_config("tiny")
    cfg.grad_clip_norm = 0.5
    tx, _ = make_optimizer(cfg)
    cfg.grad_clip_norm = 0.0
    adam, _ = make_optimizer(cfg)
    params = {"w": np.ones(3, np.float32)}
    g = {"w": np.array([30.0, -40.0, 0.0], np.float32)}  # norm 50 -> clipped to 0.5
    u1, _ = tx.update(g, tx.init(params), params)
    u2, _ = adam.update({"w": g["w"] / 100}, adam.init(params), params)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)
    u3, s3 = tx.update(g, tx.init(params), params)
    u3, _ = tx.update(g, s3, params)  # Adam's second moment sees the clipped gradient
    u4, s4 = adam.update({"w": g["w"] / 100}, adam.init(params), params)
    u4, _ = adam.update({"w": g["w"] / 100}, s4, params)
    np.testing.assert_allclose(u3["w"], u4["w"], rtol=1e-6)


def test_trains_from_a_prepared_tfds_dataset(tmp_path):
    """A TFDS dataset prepared here from generated images (no TensorFlow) feeds training."""
    from PIL import Image

    from msit_jax.data.tfds_builder import prepare

    folder = tmp_path / "images"
    folder.mkdir()
    rs = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray(rs.randint(0, 256, (40 + 5 * i, 56, 3)).astype(np.uint8)).save(
            folder / f"{i}.png")
    data_dir = str(tmp_path / "tfds")
    prepare({"train": str(folder)}, data_dir)
    cfg = load_config("tiny")
    cfg.data.train.update(kind="tfds", name="msit_images", split="train", data_dir=data_dir)
    res = train_and_evaluate(cfg, str(tmp_path / "run"))
    assert res.step == cfg.total_steps
    assert all(np.isfinite(v) for v in losses(str(tmp_path / "run")).values())


@pytest.mark.parametrize("name,encoder,conv,scale_max", [
    ("msit_edsr_stage1", "edsr-baseline", "plain", 4.0),
    ("msit_edsr_stage2_rim", "edsr-baseline", "rim", 8.0),
    ("msit_rdn_stage1", "rdn", "plain", 4.0),
    ("msit_rdn_stage2_rim", "rdn", "rim", 8.0)])
def test_paper_configs_match_the_reference(name, encoder, conv, scale_max):
    from msit_jax.models.config import model_config

    c = load_config(name)
    want = model_config(encoder, conv)
    assert c.model.to_dict() == want.to_dict()
    assert (c.model.dim, c.model.heads, c.model.radius, c.model.msno_heads,
            c.model.qk_heads) == (256, 8, 3, 16, 4)
    assert (c.batch_size, c.data.inp_size, c.data.sample_q, c.data.repeat) == (32, 48, 2304, 40)
    assert (c.data.scale_min, c.data.scale_max, c.data.augment) == (1.0, scale_max, True)
    assert (c.lr.base, c.lr.multiplier, c.lr.epoch_steps) == (1e-5, 10.0, 1000)
    assert c.lr.warmup_steps == 50 * 1000 and c.total_steps == 1050 * 1000
    assert (c.adam.b1, c.adam.b2, c.adam.eps, c.grad_clip_norm) == (0.9, 0.999, 1e-8, 0.0)
    assert c.eval.every_steps == 50 * 1000 and c.eval.shave_extra == 6
    with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
        assert f"python train.py --config configs/{name}.py" in f.read()  # its run command


def test_msit_lite_recipe_trains_on_291_and_validates_elsewhere():
    """configs/msit_lite.py: valid, the stage-1 batch protocol on the named 291 set, held-out
    validation photographs (no benchmark set), and small enough to ship (<= 5 MB float32)."""
    from msit_jax.models.model import build_model, dummy_inputs
    from msit_jax.models.reparam import count_params
    from msit_jax.training.config import validate_config

    c = load_config("msit_lite")
    validate_config(c)
    assert (c.data.train.kind, c.data.train.name) == ("named", "t91+bsd200")
    assert (c.eval.source.kind, c.eval.source.split) == ("embedded", "val")
    assert (c.data.scale_min, c.data.scale_max, c.data.augment) == (1.0, 4.0, True)
    assert (c.model.encoder, c.model.conv, c.model.batch_norm) == ("edsr-baseline", "plain", True)
    model = build_model(c.model)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            *dummy_inputs(c.model, (8, 8), 4))
    assert 4 * count_params(shapes["params"]) <= 5 * 2 ** 20
    with open(os.path.join(REPO, "configs", "msit_lite.py")) as f:
        assert "python train.py --config configs/msit_lite.py" in f.read()


def test_the_shipped_msit_lite_is_the_recipe():
    """The bundled weights were trained by configs/msit_lite.py: same architecture."""
    from msit_jax.io import pretrained

    shipped, _ = pretrained.load("msit-lite")
    assert shipped.to_dict() == load_config("msit_lite").model.to_dict()


# --- stochastic depth: the drop-path rng comes from the run's seed ----------------------

def _tiny_swinir_config(seed: int, drop_path_rate: float = 0.5):
    """configs/tiny.py with the tiny SwinIR encoder and stochastic depth on."""
    from msit_jax.models.config import tiny_model_config

    cfg = load_config("tiny")
    cfg.seed = seed
    cfg.model = tiny_model_config("swinir", "plain")
    cfg.model.update(dim=16, heads=2, msno_heads=2, qk_heads=1, mlp_hidden=(8,), posenc_dims=8)
    cfg.model.swinir.drop_path_rate = drop_path_rate
    return cfg


@pytest.mark.slow  # ~9 s: two compilations of the SwinIR train step
def test_drop_path_masks_follow_the_seed_argument():
    """One state, one batch: the step's loss (the drop-path masks) is a function of
    (seed, step) only: the same seed repeats it exactly, another seed changes it."""
    from msit_jax.data.pipeline import host_dataset
    from msit_jax.data.protocol import Batch, Protocol
    from msit_jax.data.sources import EmbeddedSource
    from msit_jax.models.model import dummy_inputs
    from msit_jax.training.state import create_state, init_variables
    from msit_jax.training.step import train_step

    cfg = _tiny_swinir_config(seed=0)
    model = build_model(cfg.model)
    tx, schedule = make_optimizer(cfg)
    d = cfg.data
    v = init_variables(model, jax.random.PRNGKey(0),
                       dummy_inputs(cfg.model, (d.inp_size, d.inp_size), d.sample_q))
    batch = Batch.from_flat(next(iter(host_dataset(
        EmbeddedSource("train"), Protocol(d.inp_size, d.sample_q, radius=cfg.model.radius),
        global_batch=cfg.batch_size, seed=0, total_steps=1))))
    # the seed traced: one compilation for every seed below
    loss = jax.jit(lambda st, b, seed: train_step(model, tx, schedule, st, b, seed=seed)[1]["loss"])
    state = create_state(v, tx)
    l0, l0_again, l1, l2 = (float(loss(state, batch, s)) for s in (0, 0, 1, 2))
    assert l0 == l0_again
    assert len({l0, l1, l2}) == 3
    # without drop path the seed changes nothing
    cfg_off = _tiny_swinir_config(seed=0, drop_path_rate=0.0)
    model_off = build_model(cfg_off.model)
    off = jax.jit(lambda st, b, seed: train_step(model_off, tx, schedule, st, b,
                                                 seed=seed)[1]["loss"])
    assert float(off(state, batch, 0)) == float(off(state, batch, 1))


@pytest.mark.slow
def test_drop_path_seed_is_the_run_seed_and_resume_is_exact(tmp_path, monkeypatch):
    """The loop hands config.seed to the step (so a seed-3 run draws seed-3 masks), and a
    run killed at step 3 of 4 and resumed ends bit-identical to the uninterrupted one."""
    from msit_jax.training import loop

    seeds = []
    real = loop.jit_train_step

    def recording(*a, **kw):
        seeds.append(kw.get("seed"))
        return real(*a, **kw)

    monkeypatch.setattr(loop, "jit_train_step", recording)
    cfg = _tiny_swinir_config(seed=3)
    cfg.total_steps = 4
    full = train_and_evaluate(cfg, str(tmp_path / "full"))
    part = train_and_evaluate(cfg, str(tmp_path / "part"), stop_after_step=3)
    res = train_and_evaluate(cfg, str(tmp_path / "part"))
    assert seeds == [3, 3, 3]
    assert (full.step, part.step, res.step) == (4, 3, 4)
    assert_trees_equal(res.state, full.state)
