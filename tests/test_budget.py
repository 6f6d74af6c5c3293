"""The one memory model (`msit_jax.inference.budget`) behind the API, msit-upscale and the
demo: the same estimate, the same auto tile, the same refusals; and the acceptance call
`Upscaler.from_pretrained(...)(img, size=(4100, 4100), tile="auto", max_memory_gb=2)`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import msit_jax
from msit_jax import errors, images, tiny_model_config
from msit_jax.inference import budget, cli, tiling
from msit_jax.inference.engine import Engine
from msit_jax.io import model_dir
from msit_jax.models import reparam
from msit_jax.models.random_init import random_variables
from tests.conftest import REPO, micro_model_config

IN_HW, OUT_HW = (40, 46), (60, 69)
TIGHT_GB = 1.0 / 1024  # 1 MB: the 40 x 46 encoder (~3.8 MB estimated) does not fit


@pytest.fixture(scope="module")
def lr():
    return (np.random.RandomState(0).rand(*IN_HW, 3) * 255).astype(np.uint8)


@pytest.mark.slow  # loads a checkpoint (~4 s of fixture; the quick tier is full)
def test_one_estimate_for_every_surface(rim_up):
    """The API's plan, the demo's plan and the CLI's (both call Upscaler.plan) carry
    budget.memory_estimate; no surface keeps bytes-per-pixel constants of its own."""
    from msit_jax import demo

    cfg = rim_up.model_cfg
    tile = budget.auto_tile(cfg, IN_HW, budget.budget_bytes(TIGHT_GB))
    want = budget.memory_estimate(cfg, IN_HW, OUT_HW, rim_up.chunk, tile)
    api_plan = rim_up.plan(IN_HW, OUT_HW, tile="auto", max_memory_gb=TIGHT_GB)
    demo_plan = demo.plan(rim_up, IN_HW, OUT_HW, TIGHT_GB)
    assert api_plan.estimate == demo_plan.estimate == want
    assert api_plan.tile == demo_plan.tile == tile == budget.MIN_TILE
    for module in (cli, demo):
        assert not [n for n in vars(module) if n.endswith("BYTES_PER_PIXEL")], module
    # The parts add up as documented: 64 B per output pixel, 40 per input pixel, ...
    assert want["output"] == 60 * 69 * 64 and want["input"] == 40 * 46 * 40
    assert want["decoder"] == 128 * (2 * cfg.radius + 1) ** 2 * cfg.dim * 12
    # the encoder window is the tile plus its halo, clipped to the image
    side = min(tile + 2 * tiling.halo(cfg), 40), min(tile + 2 * tiling.halo(cfg), 46)
    assert want["encoder"] == side[0] * side[1] * 64 * cfg.dim


@pytest.mark.slow  # shares the checkpoint fixture above
def test_demo_refuses_where_the_budget_does(rim_up):
    """The demo's refusal threshold is the budget's (buffers = output + input)."""
    from msit_jax import demo

    need = budget.output_bytes(OUT_HW) + IN_HW[0] * IN_HW[1] * budget.INPUT_BYTES_PER_PIXEL
    ok_gb, over_gb = need * 1.01 / 2 ** 30, need * 0.99 / 2 ** 30
    rim_up.plan(IN_HW, OUT_HW, tile="auto", max_memory_gb=ok_gb, decoder=False)
    demo.plan(rim_up, IN_HW, OUT_HW, ok_gb)
    with pytest.raises(budget.OverBudget, match="for the image buffers"):
        rim_up.plan(IN_HW, OUT_HW, tile="auto", max_memory_gb=over_gb, decoder=False)
    with pytest.raises(demo.DemoError, match=r"over this demo's limit"):
        demo.plan(rim_up, IN_HW, OUT_HW, over_gb)


def test_auto_tile_and_checks():
    cfg = tiny_model_config()
    per_px = budget.encoder_bytes_per_pixel(cfg)
    assert per_px == 64 * cfg.dim
    assert budget.auto_tile(cfg, (100, 100), 100 * 100 * per_px) == 0  # fits: no tiles
    side = int(np.sqrt(2 ** 24 / per_px)) - 2 * tiling.halo(cfg)
    assert budget.auto_tile(cfg, (1000, 1000), 2 ** 24) == side > budget.MIN_TILE
    assert budget.auto_tile(cfg, (1000, 1000), 2 ** 10) == budget.MIN_TILE
    with pytest.raises(budget.OverBudget, match=r"--chunk 9 needs .* over --max_memory_gb"):
        budget.check_decoder(cfg, 9, 1e-9, "--chunk 9")
    with pytest.raises(budget.OverBudget, match=r"--tile 8 on a 100 x 100 input"):
        budget.check(cfg, (100, 100), (100, 100), 128, 8, 2.0 / 1024, auto=False)
    for bad in (0, -1, float("nan"), float("inf"), "2"):
        with pytest.raises(errors.UsageError, match="--max_memory_gb must be a finite"):
            budget.budget_bytes(bad)
    for bad in (-1, "x", 2.5, True):
        with pytest.raises(errors.UsageError, match="--tile must be"):
            budget.parse_tile(bad)
    assert budget.parse_tile("12") == 12 and budget.parse_tile(None) == "auto"


@pytest.mark.slow  # compiles the tiled windows (~3 s)
def test_call_time_budget_tiles_and_matches_the_engine(rim_folder, rim_up, lr):
    """up(img, size=..., tile="auto", max_memory_gb=...) tiles the encoder when its
    untiled estimate is over the budget: the output is the tiled engine's, bit for bit,
    and the untiled one's away from the circular-shift border (see tiling)."""
    _, cfg, v = rim_folder
    fcfg, fvars = reparam.fold(cfg, v)
    assert rim_up.plan(IN_HW, OUT_HW, tile=0).estimate["encoder"] > TIGHT_GB * 2 ** 30
    plan = rim_up.plan(IN_HW, OUT_HW, tile="auto", max_memory_gb=TIGHT_GB)
    assert 0 < plan.tile < max(IN_HW) and not plan.grid
    got = rim_up(lr, size=OUT_HW, tile="auto", max_memory_gb=TIGHT_GB)
    assert got.dtype == np.uint8 and got.shape == (*OUT_HW, 3)
    lr_f = images.to_float(lr)
    tiled = Engine(fcfg, fvars, chunk=128, tile=plan.tile)(lr_f, OUT_HW)
    np.testing.assert_array_equal(got, images.to_uint8(tiled))
    whole = Engine(fcfg, fvars, chunk=128)(lr_f, OUT_HW)
    my = int(np.ceil((tiling.wrap_radius(cfg) + cfg.radius + 1) * OUT_HW[0] / IN_HW[0]))
    mx = int(np.ceil((tiling.wrap_radius(cfg) + cfg.radius + 1) * OUT_HW[1] / IN_HW[1]))
    np.testing.assert_allclose(tiled[my:-my, mx:-mx], whole[my:-my, mx:-mx], atol=1e-5)
    # without a budget (the default) nothing is tiled: today's untiled output
    np.testing.assert_array_equal(rim_up(lr, size=OUT_HW), images.to_uint8(whole))
    # an upscaler-wide budget is the default of every call
    tight = msit_jax.Upscaler.from_pretrained(rim_folder[0], chunk=128, max_memory_gb=TIGHT_GB)
    np.testing.assert_array_equal(tight(lr, size=OUT_HW), got)


@pytest.mark.slow  # runs msit-upscale in-process (~2 s)
def test_api_refuses_over_budget_with_the_cli_message(rim_folder, rim_up, lr, tmp_path, capsys):
    # The output alone fits (CLI's flag-time check), output + input do not.
    gb = (budget.output_bytes((120, 138)) + 20_000) / 2 ** 30
    one = msit_jax.Upscaler.from_pretrained(rim_folder[0], chunk=1)  # its decoder fits
    with pytest.raises(budget.OverBudget) as e:
        one(lr, size=(120, 138), max_memory_gb=gb, tile="auto")
    api_msg = str(e.value)
    assert api_msg.startswith("image: 40 x 46 -> 120 x 138 (H x W) needs ~")
    src = tmp_path / "in.png"
    Image.fromarray(lr).save(src)
    rc = cli.main([str(src), "--checkpoint", rim_folder[0], "--chunk", "1", "--size", "120x138",
                   "--max_memory_gb", str(gb), "-o", str(tmp_path / "o.png"), "--noprogress"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_RESOURCE, err
    line = next(ln for ln in err.splitlines() if ln.startswith(f"error: {src}: "))
    assert line.split(") needs ", 1)[1] == api_msg.split(") needs ", 1)[1]
    assert f"over --max_memory_gb {gb:g}; choose a smaller output" in api_msg


RSS_SCRIPT = """
import json, resource, sys
import numpy as np
from msit_jax import Upscaler
up = Upscaler.from_pretrained(sys.argv[1], chunk=65536)
img = (np.random.RandomState(0).rand(256, 256, 3) * 255).astype(np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = up(img, size=(4100, 4100), tile="auto", max_memory_gb=float(sys.argv[2]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"shape": list(out.shape), "dtype": str(out.dtype),
                  "growth_kib": peak - before, "std": float(out[:64, :64].std())}))
"""


@pytest.mark.slow  # decodes 16.8 M pixels (~1 min on 2 cores)
def test_4100_squared_within_the_budget(tmp_path):
    """The acceptance call on a micro model: peak RSS growth over the process's RSS
    before the call stays within max_memory_gb."""
    cfg = micro_model_config()
    path = model_dir.save_model(str(tmp_path / "micro"), cfg, random_variables(cfg))
    gb = 2.0
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path, str(gb)], capture_output=True,
                       text=True, timeout=900, cwd=REPO,
                       env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["shape"] == [4100, 4100, 3] and r["dtype"] == "uint8" and r["std"] > 0
    assert r["growth_kib"] * 1024 < gb * 2 ** 30, f"RSS grew {r['growth_kib'] / 2 ** 20:.2f} GiB"
