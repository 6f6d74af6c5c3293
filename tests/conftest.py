"""Shared test fixtures and test-only compile settings. Tests run on CPU with tiny
model configs.

Compile time is most of a test's time on CPU, so `pytest_configure` sets, for this
pytest session only (the library keeps no caches or settings for the tests' sake):
  * jax_disable_most_optimizations: XLA:CPU compiles without backend optimisation,
    3-4x faster for gradient programs of the whole model, with values that pass
    the same tolerances (the torch parity tests compare to 1e-6). The programs
    run slower, which tiny configs do not notice. Subprocesses (CLI, script and
    multi-process tests) inherit it through JAX_DISABLE_MOST_OPTIMIZATIONS, so a
    test and the command it starts compile the same programs (some compare their
    outputs bit for bit);
  * XLA's persistent compilation cache in a directory for this session: tests
    compile the same programs again (each training run builds its train step
    afresh, as a real run does once), and now each compiles once per session.
    Subprocesses do not share it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from PIL import Image

from msit_jax import tiny_model_config
from msit_jax.models.encoders import ENCODERS
from msit_jax.models.random_init import random_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The command lines' compilation cache (msit_jax.console.enable_compile_cache) stays off
# in tests, and out of the user's home: subprocesses inherit this. Tests of the cache
# unset it themselves.
os.environ.setdefault("MSIT_JAX_NO_COMPILE_CACHE", "1")
PY = sys.executable
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
# Programs that compile faster than this are not worth a cache file (reading and
# checking an entry costs a few ms).
CACHE_MIN_COMPILE_S = 0.2
_TEST_OPTIONS = ("jax_disable_most_optimizations", "jax_compilation_cache_dir",
                 "jax_persistent_cache_min_compile_time_secs")
_NO_OPT_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"  # read by JAX at import: for subprocesses
_SAVED = pytest.StashKey[tuple]()  # (jax options, the environment variable) before


def pytest_configure(config):
    # Before collection, so all of it holds from the first compilation on (JAX
    # decides once per process whether to use the cache).
    config.stash[_SAVED] = ({k: jax.config.values[k] for k in _TEST_OPTIONS},
                            os.environ.get(_NO_OPT_ENV))
    jax.config.update("jax_disable_most_optimizations", True)
    os.environ[_NO_OPT_ENV] = "1"
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="msit-jax-xla-"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)


def pytest_unconfigure(config):
    saved = config.stash.get(_SAVED, None)
    if saved is None:
        return
    options, env = saved
    cache_dir = jax.config.values["jax_compilation_cache_dir"]
    for k, v in options.items():
        jax.config.update(k, v)
    if env is None:
        os.environ.pop(_NO_OPT_ENV, None)
    else:
        os.environ[_NO_OPT_ENV] = env
    shutil.rmtree(cache_dir, ignore_errors=True)


# --- test tiers ---------------------------------------------------------------------------
# `pytest` runs everything; `pytest -m "not slow"` is the quick tier (under 90 s on 2 CPU
# cores). Slow: subprocess CLIs (but those that stop before JAX starts, well under a
# second), multi-process training, big decodes, TFDS preparation, lowering whole
# programs, anything over ~3 s. A module that is slow throughout says so
# itself (`pytestmark = pytest.mark.slow`); a test of a mixed module can carry the mark
# itself, or be listed here, where each entry names the case the quick tier keeps instead.
# Keys: "file::test" (every parametrization) or "file::test[id]" (one).
SLOW_TESTS: dict[str, str] = {
    # subprocess CLIs and scripts
    "test_accel_check.py::test_accel_check_tiny_passes_and_writes_every_section": "script",
    "test_accel_check.py::test_accel_check_failing_tolerance_exits_1": "script",
    "test_accel_check.py::test_accel_check_rejects_cpu_without_allow_cpu": "script",
    "test_accel_check.py::test_compare_torch_quick_ours_alone": "script",
    "test_convert.py::test_convert_cli_round_trip":
        "CLI; test_official_training_checkpoint_loads_with_args stays",
    "test_evaluate.py::test_evaluate_cli_bicubic_reference_figures": "CLI",
    "test_evaluate.py::test_evaluate_cli_published_matlab_figures": "CLI",
    "test_evaluate.py::test_evaluate_cli_msit_outputs_and_failures": "CLI",
    "test_evaluate.py::test_evaluate_cli_usage_errors": "CLI",
    "test_evaluate.py::test_evaluate_cli_data_by_name": "CLI",
    "test_evaluate.py::test_one_evaluation_path_quiet_cli": "a training run and the CLI",
    "test_export.py::test_stablehlo_runner_needs_no_model_code": "subprocess",
    "test_export.py::test_safetensors_hub_folder_loads_without_torch":
        "subprocess; test_safetensors_folded stays",
    "test_export.py::test_cli_and_its_errors": "CLI",
    "test_lower_script.py::test_train_step_report": "script",
    "test_lower_script.py::test_inference_report": "script",
    "test_lower_script.py::test_bad_flags_are_refused": "script",
    "test_upscale_cli.py::test_output_larger_than_4096_squared_in_bounded_memory":
        "CLI, a 4100 x 4100 decode",
    "test_upscale_cli.py::test_console_script_shows_stages_and_no_library_noise":
        "a training run and the console script",
    # worker processes
    "test_data_sources.py::test_pipeline_deterministic_across_workers_hosts_and_restore":
        "grain workers; the training runs' pipeline and test_data_protocol stay",
    # TFDS preparation
    "test_data_sources.py::test_tfds_source_reads_prepared_dataset": "TFDS preparation",
    "test_evaluate.py::test_tfds_source_matches_folder": "TFDS preparation",
    "test_train_loop.py::test_trains_from_a_prepared_tfds_dataset": "TFDS preparation",
    # more training runs; the quick tier keeps a run and its checkpoints, loaded back
    "test_train_loop.py::test_killed_and_resumed_run_is_bit_identical":
        "three more runs; test_checkpoint_faults' SIGINT resume is bit-exact too",
    "test_train_loop.py::test_stage2_from_stage1_workdir_keeps_w_frozen": "two more runs",
    "test_train_loop.py::test_stage2_init_reproduces_stage1_outputs": "stage-2 compiles",
    "test_train_loop.py::test_init_from_rejects_other_architectures": "a dim-64 init",
    "test_train_loop.py::test_stage2_init_from_official_pth":
        "stage-2 compiles; test_convert's official .pth loading stays",
    "test_upscale_faults.py::test_each_input_fails_independently_and_bounds_are_checked_first":
        "decodes",
    # further cases of a parity already in the quick tier
    "test_evaluate.py::test_dtype_override_runs_the_model_in_bfloat16": "bfloat16",
    "test_export.py::test_stablehlo_matches_upscale_on_every_platform_export":
        "test_stablehlo_unfolded_export stays",
    "test_export.py::test_onnx_agrees_with_jax[rdn-auto]": "[edsr-baseline-grid] stays",
    "test_export.py::test_onnx_agrees_with_jax[edsr-baseline-query]":
        "[edsr-baseline-grid] stays",
    "test_export.py::test_pth_round_trip_official_to_official[rim]": "[plain] stays",
    "test_inference.py::test_chunk_size_invariance":
        "test_model_parity's full-grid upscale (3 chunks, the last padded) vs torch stays",
    "test_inference.py::test_grid_decoder_matches_per_query_decoder":
        "test_model_parity's full-grid upscale ('auto' runs the grid decoder at x3.5) vs "
        "torch stays",
    "test_inference.py::test_bfloat16_compute_is_close_to_float32": "bfloat16",
    "test_inference.py::test_bfloat16_grid_decoder_runs_on_cpu_within_stated_db": "bfloat16",
    "test_inference.py::test_fft_multiscale_convs_match_direct":
        "test_ops FFT conv parity stays",
    "test_model_parity.py::test_full_grid_upscale_matches_torch[edsr-baseline-plain]":
        "the RIM models stay; test_reparam checks their folded (plain) forms",
    "test_model_parity.py::test_full_grid_upscale_matches_torch[rdn-plain]":
        "the RIM models stay; test_reparam checks their folded (plain) forms",
    "test_model_parity.py::test_random_queries_match_torch[edsr-baseline-rim-False]":
        "[edsr-baseline-plain-True] stays",
    "test_model_parity.py::test_random_queries_match_torch[edsr-baseline-rim-True]":
        "[edsr-baseline-plain-True] stays",
    "test_model_parity.py::test_random_queries_match_torch[edsr-baseline-plain-False]":
        "[edsr-baseline-plain-True] stays",
    "test_model_parity.py::test_random_queries_match_torch[rdn-rim-False]":
        "[edsr-baseline-plain-True] stays",
    "test_model_parity.py::test_random_queries_match_torch[rdn-rim-True]":
        "[edsr-baseline-plain-True] stays",
    "test_model_parity.py::test_random_queries_match_torch[rdn-plain-False]":
        "[edsr-baseline-plain-True] stays",
    "test_model_parity.py::test_random_queries_match_torch[rdn-plain-True]":
        "[edsr-baseline-plain-True] stays",
    "test_ops.py::test_kernel_gradient_methods_match_reference_autodiff[k1-32to64-g16-dense]":
        "k1-32to64-g1-dense stays",
    "test_ops.py::test_kernel_gradient_methods_match_reference_autodiff[k1-32to64-g8-dense]":
        "k1-32to64-g1-dense stays",
    "test_ops.py::test_kernel_gradient_methods_match_reference_autodiff[k7-8to8-g1-shifts]":
        "k5-6to6-g1-shifts stays",
    "test_ops.py::test_kernel_gradient_methods_match_reference_autodiff[k9-4to4-g1-fft]":
        "k13-4to4-g1-fft and k33-4to4-g1-fft stay",
    "test_ops.py::test_kernel_gradient_methods_match_reference_autodiff[k5-40to40-g1-xla]":
        "the 3x3 xla cases stay",
    "test_ops.py::test_kernel_gradient_methods_match_reference_autodiff[k13-4to4-g1-fft]":
        "k33-4to4-g1-fft stays",
    "test_sampling.py::test_bilinear_matches_grid_sample[False]": "[True] stays",
    "test_bundled_weights.py::test_from_pretrained_by_name_equals_the_file_by_path":
        "test_card_figure_holds_on_a_fresh_evaluation (by name) stays",
    "test_ops.py::test_bf16_backward_of_a_contraction_summing_within_an_operand":
        "test_bf16_backward_rounds_the_cotangent_once_and_accumulates_in_f32 stays",
    "test_ops.py::test_fft_conv_matches_torch_and_direct":
        "on CPU the k=33 convs of test_model_parity's models run as FFTs (vs torch)",
    "test_matlab_resize.py::test_published_set14_bicubic_figures": "Set5 x2-x4 stay",
    "test_reparam.py::test_fold_equivalence[rdn-rim]": "[edsr-baseline-rim] stays",
    "test_reparam.py::test_fold_equivalence[rdn-plain]": "[edsr-baseline-rim] stays",
    "test_reparam.py::test_fold_equivalence[edsr-baseline-plain]": "[edsr-baseline-rim] stays",
    "test_upscale_cli.py::test_tiled_equals_untiled_away_from_the_wrap_border":
        "test_cli_tiled_matches_tiled_api stays",
    "test_upscale_cli.py::test_official_demo_flags":
        "test_sizes_are_read_and_logged_height_first keeps the size flags",
    "test_demo.py::test_large_inputs_use_the_tiled_path":
        "test_upscale_cli's tiled tests stay",
    # subprocesses that import JAX (2-10 s each)
    "test_flags_util.py::test_main_without_argv_runs_absl_app_and_exits":
        "four subprocesses; the in-process flag tests stay",
    "test_evaluate.py::test_plot_without_matplotlib_fails_before_any_work": "subprocess",
    "test_evaluate.py::test_argparse_style_boolean_gets_the_absl_spelling":
        "subprocess; test_flags_util's in-process spelling test stays",
    "test_demo.py::test_without_gradio_one_line_error": "subprocess",
    # a training run (20 s of the quick tier's budget)
    "test_train_loop.py::test_run_writes_checkpoints_logs_and_configs":
        "a training run; test_gradient_clipping_is_applied_before_adam (one step) and "
        "test_checkpoint_faults' retention test (save, verify, restore) stay",
    "test_ensemble.py::test_model_self_ensemble_equals_plain_only_for_a_symmetric_model[grid]":
        "[query] stays",
    "test_ensemble.py::test_tiled_self_ensemble": "[query] of the untiled test stays",
    "test_ensemble.py::test_upscale_and_evaluate_commands_take_self_ensemble":
        "test_model_self_ensemble_equals_plain_only_for_a_symmetric_model[query] stays",
    "test_ensemble.py::test_the_public_upscaler_takes_self_ensemble":
        "test_model_self_ensemble_equals_plain_only_for_a_symmetric_model[query] stays",
}


def _slow_key(item) -> tuple[str, str]:
    """("file::test", "file::test[id]") for a collected test."""
    file = os.path.basename(str(item.path))
    name = getattr(item, "originalname", item.name)
    return f"{file}::{name}", f"{file}::{item.name}"


def _collects_every_case(config, file: str) -> bool:
    """Whether this run collects every case of `file`'s tests: no -k, and the file named
    (if at all) without a test id."""
    if config.getoption("keyword"):
        return False
    return not any("::" in arg and os.path.basename(arg.split("::")[0]) == file
                   for arg in config.args)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(key in SLOW_TESTS for key in _slow_key(item)):
            item.add_marker(pytest.mark.slow)
    # An entry whose test was renamed, or whose case id changed, would silently move it
    # to the quick tier: an entry naming a collected module must name one of its tests,
    # and an entry with a case id one of that test's collected cases.
    modules = {os.path.basename(str(item.path)): item.module for item in items
               if getattr(item, "module", None) is not None}
    collected = {key for item in items for key in _slow_key(item)}
    stale = []
    for key in SLOW_TESTS:
        file, test = key.split("::")
        if file not in modules:
            continue  # a module not collected in this run (a -k, a path)
        if not hasattr(modules[file], test.split("[")[0]):
            stale.append(key)
        elif "[" in test and key not in collected and _collects_every_case(config, file):
            stale.append(key)
    if stale:
        raise pytest.UsageError("tests/conftest.py SLOW_TESTS names no such test: "
                               + ", ".join(stale))


# Every registered encoder. edsr-baseline and rdn keep their tiers (SLOW_TESTS picks
# their slow cases); each case of the others costs seconds (compiling a tiny model),
# more than the quick tier can take, so they run in the slow tier.
_QUICK_TIER_ENCODERS = ("edsr-baseline", "rdn")


@pytest.fixture(params=[name if name in _QUICK_TIER_ENCODERS
                        else pytest.param(name, marks=pytest.mark.slow) for name in ENCODERS])
def encoder(request) -> str:
    """An encoder registry name (msit_jax.models.encoders.ENCODERS)."""
    return request.param


@pytest.fixture
def tiny_cfg():
    return tiny_model_config()


@pytest.fixture
def tiny_vars(tiny_cfg):
    return random_variables(tiny_cfg)


def shared_data(*parts):
    """Path under ../shared/data; skips nothing: a missing folder is a test error."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"test data missing: {path}")
    return path


def import_benchmark(name: str):
    """benchmarks/<name>.py as the module benchmarks.<name> (the repo root, where pytest
    runs, is importable; the scripts import their siblings as `from benchmarks import x`)."""
    return importlib.import_module(f"benchmarks.{name}")


def load_config(name: str = "tiny"):
    """The training config of configs/<name>.py (a fresh ConfigDict per call)."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}",
                                                  os.path.join(REPO, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def tree_digest(path: str) -> dict[str, str]:
    """sha256 of every file under a directory (relative paths)."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# --- shared helpers: subprocesses, one-line errors, trees, damaged files --------------------

def run_python(args, timeout=300, shell_prefix: str = "") -> subprocess.CompletedProcess:
    """python ARGS in the repository on CPU (shell_prefix: bash commands run first, e.g.
    ulimit)."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [PY] + list(args)
    if shell_prefix:
        cmd = ["bash", "-c", f'{shell_prefix} exec "$0" "$@"'] + cmd
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """An `error: ...` line of stderr holds all the needles (the error is that one line;
    per-input failures are followed by a summary line); no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error: ")]
    assert lines, stderr[-3000:]
    hits = [ln for ln in lines if all(n in ln for n in needles)]
    assert hits, (needles, lines)
    return hits[0]


def flat(tree) -> dict[str, np.ndarray]:
    """{'a/b/c': leaf} for any pytree (dicts, optax namedtuples, train states)."""
    def name(e):
        for a in ("key", "name", "idx"):
            if hasattr(e, a):
                return str(getattr(e, a))
        return str(e)

    return {"/".join(name(e) for e in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b) -> None:
    """Same paths, bit-identical leaves."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def largest_file(root: str) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def flip_bytes(path: str, n: int = 64) -> None:
    """Invert n bytes in the middle of a file (a bit-rot stand-in)."""
    b = bytearray(open(path, "rb").read())
    mid = len(b) // 2
    for i in range(mid, min(mid + n, len(b))):
        b[i] ^= 0xFF
    open(path, "wb").write(b)


def strict_json_lines(path: str) -> list[dict]:
    """Parse a JSONL file rejecting NaN/Infinity (what strict JSON readers do)."""
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c} in {path}")

    with open(path) as f:
        return [json.loads(line, parse_constant=bad) for line in f if line.strip()]


def save_img(path, h, w, seed=0) -> str:
    """A random (h, w) RGB PNG."""
    rs = np.random.RandomState(seed)
    Image.fromarray(rs.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(path)
    return str(path)


def wait_for_steps(wd: str, n: int, proc, timeout: float = 240.0) -> None:
    """Wait until `proc` (training into `wd`) has logged n steps; fail if it dies."""
    from msit_jax.training.metrics import read_jsonl

    path = os.path.join(wd, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if os.path.exists(path) and len(read_jsonl(path)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout} s")



def popen_tiny_train(wd: str, *extra: str) -> subprocess.Popen:
    """train.py on configs/tiny.py into `wd`, running (almost) forever: stop it yourself."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([PY, "train.py", "--config", "configs/tiny.py", "--workdir", wd,
                             "--config.total_steps=1000000", "--config.lr.warmup_steps=10",
                             "--config.checkpoint.every_steps=100000", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An uninterrupted 4-step run of configs/tiny.py (checkpoints at 2 and 4, keep=2):
    (config, workdir, TrainResult). Copy it (`copy_run`) before changing it."""
    from msit_jax.training import train_and_evaluate

    cfg = load_config()
    wd = str(tmp_path_factory.mktemp("base") / "run")
    return cfg, wd, train_and_evaluate(cfg, wd)


def copy_run(run, tmp_path) -> str:
    """A private copy of a `tiny_run` workdir."""
    dst = str(tmp_path / "run")
    shutil.copytree(run[1], dst)
    return dst


def micro_model_config():
    """The smallest config with every component: fast enough to decode 16.8 M output
    pixels in CI."""
    cfg = tiny_model_config()
    cfg.dim, cfg.heads, cfg.radius = 8, 1, 0
    cfg.msno_heads, cfg.qk_heads, cfg.mlp_hidden, cfg.posenc_dims = 1, 1, (8,), 8
    cfg.edsr.n_feats = 4
    return cfg


@pytest.fixture(scope="module")
def make_model_folder(tmp_path_factory):
    """make(seed=0, encoder="edsr-baseline", conv="rim") -> (path, config, variables): a
    msit-jax model folder of the tiny config with random weights (`random_variables(cfg,
    seed)`), written once per test module and arguments. The one place tests write a
    tiny checkpoint folder; a test that alters the folder copies it first."""
    from msit_jax.io import model_dir as mdir

    made: dict = {}

    def make(seed: int = 0, encoder: str = "edsr-baseline", conv: str = "rim"):
        key = (seed, encoder, conv)
        if key not in made:
            cfg = tiny_model_config(encoder, conv)
            v = random_variables(cfg, seed)
            root = tmp_path_factory.mktemp(f"{encoder}-{conv}-{seed}")
            made[key] = (mdir.save_model(str(root / "ckpt"), cfg, v), cfg, v)
        return made[key]

    return make


@pytest.fixture(scope="module")
def rim_folder(make_model_folder):
    """A msit-jax model folder of the tiny edsr-baseline RIM config (random weights, seed 7):
    (path, config, variables)."""
    return make_model_folder(7)


@pytest.fixture(scope="module")
def rim_up(rim_folder):
    """`msit_jax.Upscaler.from_pretrained` of `rim_folder` (folded), 128 queries per call."""
    import msit_jax

    return msit_jax.Upscaler.from_pretrained(rim_folder[0], chunk=128)


@pytest.fixture(scope="module")
def tiny_model_dir(make_model_folder):
    """A msit-jax model folder of the tiny config with random weights (seed 0): (path, config)."""
    path, cfg, _ = make_model_folder(0)
    return path, cfg
