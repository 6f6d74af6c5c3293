"""Cross-platform lowering from this CPU host: TPU and CUDA programs, f32 and bf16.

For the folded inference programs (encoder, per-query and grid decoders) and
the stage-1 / stage-2 train steps sharded over 8 virtual devices, lowered with
`jax.export` for 'tpu' and 'cuda':
  * lowering succeeds, with no float64 and no host callback;
  * the accelerator method is chosen: the program equals the one built with
    XLA's own conv rules (conv_impl='xla') and contains no FFT;
  * every dot_general and convolution carries the configured precision, and takes
    two operands of one element type (no f32 x bf16 backward dots);
  * it is the program a TPU host would build: with `jax.default_backend()`
    reporting the platform while tracing, the op counts are the same.
The lowering runs in a subprocess (the device count is fixed at start-up);
this file is also its entry point: python tests/test_lowering.py OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from msit_jax.lowering import compute_ops

pytestmark = pytest.mark.slow  # one subprocess lowers every program for two platforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ("encode", "decode", "grid", "train_stage1", "train_stage2")
PLATFORMS = ("tpu", "cuda")
DTYPES = ("float32", "bfloat16")
# The other encoders (tiny configs), each with the programs that differ: the encoder
# program, and for RCAN (channel attention) the stage-2 train step through it, for
# SwinIR (window attention: einsums, a bias-table gather, rolls) the stage-1 train step.
ENCODER_PROGRAMS = (("edsr", "encode"), ("rcan", "encode"), ("rcan", "train_stage2"),
                    ("swinir", "encode"), ("swinir", "train_stage1"))
# Runtime options that change the program, not the function: the stage-1 train step
# with each (the multi-scale heads on pixel blocks; the decoder rematerialised).
RUNTIME_VARIANTS = (("s2d", dict(s2d_min_kernel=3)), ("remat", dict(remat_decoder=16)))


def worker(out: str) -> None:
    import jax

    from msit_jax import tiny_model_config
    from msit_jax.lowering import Shapes, analyse, default_backend_reporting, lower_program
    from msit_jax.ops.runtime import RuntimeOptions

    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_model_config()
    shapes = Shapes(batch=8, lr_size=12, sample_q=64, chunk=256)

    def facts(program, platform, runtime, model_cfg=cfg):
        return analyse(lower_program(program, platform, model_cfg, runtime, shapes).mlir_module())

    results = {}
    for program in PROGRAMS:
        for platform in PLATFORMS:
            for dtype in DTYPES:
                rt = RuntimeOptions(dtype=dtype)
                entry = {"auto": facts(program, platform, rt),
                         "xla": facts(program, platform, rt.replace(conv_impl="xla"))}
                if program.startswith("train") and dtype == "float32":
                    for prec in ("high", "default"):
                        entry[f"precision_{prec}"] = facts(program, platform,
                                                           rt.replace(precision=prec))
                if program.startswith("train"):
                    with default_backend_reporting(platform):  # as a TPU/GPU host reports
                        entry["emulated_host"] = facts(program, platform, rt)
                results[f"{program}/{platform}/{dtype}"] = entry
        results[f"{program}/cpu/float32"] = {"auto": facts(program, "cpu", RuntimeOptions())}
    for encoder, program in ENCODER_PROGRAMS:
        enc_cfg = tiny_model_config(encoder)
        for platform in PLATFORMS:
            for dtype in DTYPES:
                rt = RuntimeOptions(dtype=dtype)
                results[f"{encoder}:{program}/{platform}/{dtype}"] = {
                    "auto": facts(program, platform, rt, enc_cfg),
                    "xla": facts(program, platform, rt.replace(conv_impl="xla"), enc_cfg)}
    for variant, options in RUNTIME_VARIANTS:
        for platform in PLATFORMS:
            for dtype in DTYPES:
                rt = RuntimeOptions(dtype=dtype, **options)
                results[f"{variant}:train_stage1/{platform}/{dtype}"] = {
                    "auto": facts("train_stage1", platform, rt),
                    "xla": facts("train_stage1", platform, rt.replace(conv_impl="xla")),
                    "base": facts("train_stage1", platform, RuntimeOptions(dtype=dtype))}
    with open(out, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lowering") / "facts.json")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), out], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("program", PROGRAMS + tuple(f"{e}:{p}" for e, p in ENCODER_PROGRAMS)
                         + tuple(f"{v}:train_stage1" for v, _ in RUNTIME_VARIANTS))
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_accelerator_lowering(lowered, program, platform, dtype):
    """program: one of PROGRAMS (the default tiny EDSR-baseline model) or
    'encoder:program' (another encoder's tiny model)."""
    entry = lowered[f"{program}/{platform}/{dtype}"]
    auto = entry["auto"]
    assert not auto["f64"], "float64 in the lowered program"
    assert not auto["callbacks"], auto["callbacks"]
    assert auto["ops"].get("fft", 0) == 0, "FFT convolution chosen for an accelerator"
    # The accelerator method: identical to the program with XLA's own conv rules.
    assert compute_ops(auto["ops"]) == compute_ops(entry["xla"]["ops"])
    # The configured precision ('highest') on every contraction.
    assert auto["unset_precision"] == 0, auto["unset_precision_examples"]
    assert set(k.split(":")[1] for k in auto["contractions"]) == {"HIGHEST"}
    assert sum(auto["contractions"].values()) > 0
    # Every contraction takes operands of one type: the backward of bf16 dots runs
    # bf16 x bf16 (ops.matmul), never f32 x bf16 (the slow f32 algorithm on a TPU).
    assert auto["mixed_operands"] == 0, auto["mixed_operand_examples"]
    if "emulated_host" in entry:
        assert entry["emulated_host"]["ops"] == auto["ops"]
    if "precision_high" in entry:
        p = entry["precision_high"]
        assert p["unset_precision"] == 0
        assert set(k.split(":")[1] for k in p["contractions"]) == {"HIGH"}
        # DEFAULT is StableHLO's default: JAX writes no attribute for it.
        p = entry["precision_default"]
        assert set(k.split(":")[1] for k in p["contractions"]) <= {"none", "DEFAULT"}
        assert sum(p["contractions"].values()) == sum(auto["contractions"].values())


@pytest.mark.parametrize("program", ["train_stage1", "train_stage2"])
def test_cpu_lowering_uses_the_cpu_methods(lowered, program):
    """The same train step lowered for CPU carries the CPU kernel-gradient methods:
    more matmuls, fewer convolutions, and FFT kernel gradients (the tiny model's 9x9)."""
    cpu = lowered[f"{program}/cpu/float32"]["auto"]["ops"]
    tpu = lowered[f"{program}/tpu/float32"]["auto"]["ops"]
    assert cpu.get("fft", 0) > 0
    assert cpu["dot_general"] > tpu["dot_general"]
    assert cpu["convolution"] < tpu["convolution"]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_runtime_variants_change_the_program_as_intended(lowered, platform, dtype):
    """s2d: each multi-scale conv is still one conv (forward and backward), now on the
    block grid, plus the folds and the block-kernel gathers around it; remat: more
    rematerialised regions than without it."""
    s2d = lowered[f"s2d:train_stage1/{platform}/{dtype}"]
    assert s2d["auto"]["ops"]["convolution"] == s2d["base"]["ops"]["convolution"]
    assert s2d["auto"]["ops"] != s2d["base"]["ops"]  # the folds and the block-kernel gather
    remat = lowered[f"remat:train_stage1/{platform}/{dtype}"]
    assert (remat["auto"]["ops"].get("optimization_barrier", 0)
            > remat["base"]["ops"].get("optimization_barrier", 0))


def test_train_steps_gather_in_the_decoder_only(lowered):
    """Gathers are the decoder's key/value reads; none in bf16 come back as f64 etc."""
    for program in ("train_stage1", "train_stage2"):
        g = lowered[f"{program}/tpu/bfloat16"]["auto"]["gathers"]
        assert g and all(x["elements"] > 0 for x in g)


if __name__ == "__main__":
    worker(sys.argv[1])
