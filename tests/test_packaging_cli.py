"""What a pip user gets (issue 20, items 5 and 6): packaged configs, console scripts,
extras, license metadata, install hints, the usage lines, the compilation cache,
directory and glob inputs of msit-upscale, and no third-party log noise."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys

import pytest

from msit_jax import configs, console, errors
from msit_jax.training import cli as train_cli

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the project runs on 3.11)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


# --- package data, license ---------------------------------------------------------------

def test_configs_ship_in_the_package_once():
    """msit_jax/configs is a package (its .py files go into the wheel as modules), and the
    checkout's configs/ is the same folder: one copy of each file."""
    assert os.path.isfile(os.path.join(configs.DIR, "__init__.py"))
    assert os.path.dirname(configs.DIR) == os.path.join(REPO, "msit_jax")
    assert {"default", "tiny", "msit_lite", "msit_edsr_stage1", "msit_edsr_stage2_rim"} <= set(
        configs.names())
    for name in configs.names():
        assert os.path.samefile(os.path.join(REPO, "configs", f"{name}.py"), configs.path(name))
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    assert any(fnmatch.fnmatch("msit_jax.configs", g) for g in find["include"])


def test_py_typed_license_and_metadata():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(REPO, "LICENSE")) as f:
        text = f.read()
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 The msit-jax authors" in text
    assert os.path.isfile(os.path.join(REPO, "msit_jax", "py.typed"))
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["msit_jax"]
    assert any(fnmatch.fnmatch("py.typed", g) for g in globs)


def test_model_cards_state_the_license():
    from msit_jax import weights

    for name in weights.available():
        with open(weights.card_path(name)) as f:
            card = f.read()
        section = card.split("## License", 1)[1]
        assert "Apache-2.0" in section.split("\n## ", 1)[0], name


# --- --config NAME --------------------------------------------------------------------

def test_config_names_resolve_to_the_packaged_files(tmp_path, monkeypatch):
    default = configs.path("default")
    assert train_cli.resolve_config_args(["p", "--config", "default", "--workdir", "w"]) == [
        "p", "--config", default, "--workdir", "w"]
    assert train_cli.resolve_config_args(["p", "--config=msit_edsr_stage1"]) == [
        "p", f"--config={configs.path('msit_edsr_stage1')}"]
    # outside a checkout, configs/NAME.py is the packaged NAME
    monkeypatch.chdir(tmp_path)
    assert train_cli.resolve_config_args(["p", "--config", "configs/tiny.py"])[2] == \
        configs.path("tiny")
    # an existing path always wins, even one named like a packaged config
    own = tmp_path / "default.py"
    own.write_text("def get_config():\n    return None\n")
    assert train_cli.resolve_config_args(["p", "--config", "default.py"])[2] == "default.py"
    # overrides and the flags after `--` are left alone
    args = ["p", "--config", str(own), "--config.seed=1", "--", "--config", "nosuch"]
    assert train_cli.resolve_config_args(args) == args
    with pytest.raises(errors.ConfigError, match=r"--config nosuch: no such file, and no "
                       r"packaged config of that name \(default, "):
        train_cli.resolve_config_args(["p", "--config", "nosuch"])


def test_config_by_name_loads_through_the_training_flags():
    args = ["--config", "tiny", "--workdir", "unused", "--config.seed=7"]
    fv = train_cli.define_flags([train_cli.PROG] + args)
    train_cli.parse_flags(fv, [train_cli.PROG] + args)
    assert fv.config.seed == 7 and fv.config.model.dim == 16  # configs/tiny.py's


# --- install hints ----------------------------------------------------------------------

def test_install_hints_name_the_extra_and_the_checkout_file():
    assert console.install_hint("plot") == ('pip install "msit-jax[plot]" (in a checkout: '
                                            "pip install -r requirements-plot.txt)")
    assert console.install_hint("train").endswith("pip install -r requirements.txt)")
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra in extras:
        if extra == "all":
            continue
        hint = console.install_hint(extra)
        assert f'"msit-jax[{extra}]"' in hint and "\n" not in hint
        assert os.path.isfile(os.path.join(REPO, hint.rsplit(" ", 1)[1].rstrip(")"))), hint


def test_no_hint_names_only_a_requirements_file():
    """No module but the hint's own (console.py) spells "pip install -r requirements...":
    the others say `console.install_hint(extra)`, which a wheel user can follow."""
    bad = []
    for dirpath, _, files in os.walk(os.path.join(REPO, "msit_jax")):
        for f in files:
            if f.endswith(".py") and os.path.join(dirpath, f) != console.__file__:
                with open(os.path.join(dirpath, f)) as fh:
                    for i, line in enumerate(fh, 1):
                        if "pip install -r requirements" in line:
                            bad.append(f"{f}:{i}")
    assert bad == []


# --- usage lines ------------------------------------------------------------------------

def test_usage_names_the_program_as_invoked():
    from msit_jax import flags_util
    from msit_jax.inference import cli as upscale

    pkg = os.path.join(REPO, "msit_jax")
    assert flags_util.invoked_program("/venv/bin/msit-upscale") == "msit-upscale"
    assert flags_util.invoked_program(os.path.join(pkg, "inference", "__main__.py")) == \
        "python -m msit_jax.inference"
    assert flags_util.invoked_program(os.path.join(pkg, "inference", "cli.py")) == \
        "python -m msit_jax.inference.cli"
    assert flags_util.invoked_program(os.path.join(pkg, "eval", "cli.py")) == \
        "python -m msit_jax.eval.cli"
    assert flags_util.invoked_program("evaluate.py") == "python evaluate.py"
    assert flags_util.invoked_program("-c") is None
    from absl import flags

    fv = flags.FlagValues()
    upscale.define_flags(fv)
    for prog in ("msit-upscale", "python -m msit_jax.inference"):
        text = flags_util.help_text(fv, upscale.USAGE, prog)
        assert text.startswith(f"usage: {prog} [flags] INPUT...\n")
    assert flags_util.help_text(fv, "usage: python evaluate.py --x\n\nDoc.", "msit-evaluate") \
        .startswith("usage: msit-evaluate --x\n\nDoc.\n\nflags:\n")
    assert flags_util.help_text(fv, upscale.USAGE).startswith(upscale.USAGE.strip())


@pytest.mark.slow
def test_console_scripts_print_their_own_usage(tmp_path):
    """As console scripts (argv[0] the script's name), `--help` says that name; the demo's
    help needs no gradio."""
    code = ("import sys, runpy; sys.argv[0] = sys.argv.pop(1); "
            "mod, fn = sys.argv.pop(1).split(':'); "
            "sys.modules['gradio'] = None; "
            "getattr(__import__(mod, fromlist=[fn]), fn)()")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    scripts = _pyproject()["project"]["scripts"]
    for name in ("msit-upscale", "msit-evaluate", "msit-export", "msit-demo", "msit-train"):
        p = subprocess.run([sys.executable, "-c", code, f"/somewhere/bin/{name}",
                            scripts[name], "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.startswith(f"usage: {name} "), (name, p.stdout[:200])


# --- the persistent compilation cache -----------------------------------------------------

def test_compile_cache_place_and_switches(tmp_path, monkeypatch):
    """The folder follows XDG_CACHE_HOME (else ~/.cache); the env var and the flag turn it
    off before JAX is configured (nothing is created)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert console.compile_cache_dir() == str(tmp_path / "xdg" / "msit-jax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert console.compile_cache_dir() == str(tmp_path / "home" / ".cache" / "msit-jax" / "jax")
    for value, off in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv(console.NO_COMPILE_CACHE_ENV, value)
        assert console.compile_cache_disabled() is off
    monkeypatch.setenv(console.NO_COMPILE_CACHE_ENV, "1")
    assert console.enable_compile_cache(directory=str(tmp_path / "c")) is None
    monkeypatch.delenv(console.NO_COMPILE_CACHE_ENV)
    assert console.enable_compile_cache(False, directory=str(tmp_path / "c")) is None
    assert not (tmp_path / "c").exists() and not (tmp_path / "home").exists()
    assert console.active_compile_cache() is None  # JAX's config untouched
    from absl import flags

    from msit_jax import demo

    from msit_jax.inference import cli as upscale
    from msit_jax.eval import cli as eval_cli

    for define in (upscale.define_flags, eval_cli.define_flags, demo.define_flags,
                   lambda fv: None):
        fv = train_cli.define_flags(["p"]) if define is None else flags.FlagValues()
        if define is not None:
            define(fv)
        if "compile_cache" in fv:
            fv(["p", "--nocompile_cache"])
            assert fv.compile_cache is False
    assert "compile_cache" in train_cli.define_flags(["p"])


_CACHE_CODE = """
import sys, jax, jax.numpy as jnp
from msit_jax import console
cache = console.enable_compile_cache(directory=sys.argv[1])
f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1)
f(jnp.ones((8, 8))).block_until_ready()
print(cache.hits, cache.written, cache.entries(), cache.requests)
"""


@pytest.mark.slow
def test_compile_cache_writes_into_the_given_folder_and_is_read_back(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # cache even tiny programs
    env.pop(console.NO_COMPILE_CACHE_ENV, None)
    runs = [subprocess.run([sys.executable, "-c", _CACHE_CODE, str(tmp_path / "c")], env=env,
                           capture_output=True, text=True, timeout=120) for _ in range(2)]
    for p in runs:
        assert p.returncode == 0, p.stderr[-2000:]
    first, second = ([int(v) for v in p.stdout.split()] for p in runs)
    assert first[0] == 0 and first[1] >= 1 and first[2] >= 1  # compiled and written
    assert second[0] == second[3] >= 1 and second[1] == 0 and second[2] == first[2]  # loaded


@pytest.mark.slow
def test_a_second_upscale_of_the_same_size_loads_its_programs(tmp_path):
    """Two `python -m msit_jax.inference` runs (the bundled msit-lite, its default cache
    threshold): the second loads the encoder and decoder programs the first compiled,
    and writes the same bytes. MSIT_JAX_NO_COMPILE_CACHE=1: no cache at all."""
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    src = tmp_path / "in.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 48, 3)).astype(np.uint8)
                    ).save(src)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop(console.NO_COMPILE_CACHE_ENV, None)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    # conftest's faster, unoptimised compilation would put programs under the threshold
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    cache_dir = tmp_path / "xdg" / "msit-jax" / "jax"

    def run(name, **extra):
        p = subprocess.run([sys.executable, "-m", "msit_jax.inference", str(src), "--scale", "3",
                            "-o", str(tmp_path / name), "--noprogress"], cwd=tmp_path,
                           env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stderr

    import re

    def counts(err):
        m = re.search(r"compilation cache: (\d+) of (\d+) program\(s\) loaded, (\d+) "
                      r"compiled, (\d+) written", err)
        assert m, err
        return tuple(int(g) for g in m.groups())

    first, second = run("a.png"), run("b.png")
    loaded1, requests1, compiled1, written1 = counts(first)
    loaded2, requests2, compiled2, written2 = counts(second)
    assert loaded1 == 0 and written1 >= 1 and requests1 == compiled1 >= 2
    assert f"({cache_dir}: 0 -> {written1} entries)" in first
    assert f"({cache_dir}: {written1} -> {written1} entries)" in second
    # the programs written (the encoder's at least) are loaded, not compiled
    assert loaded2 == written1 and written2 == 0 and compiled2 == compiled1 - written1
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    off = run("c.png", MSIT_JAX_NO_COMPILE_CACHE="1")
    assert "compilation cache" not in off
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "a.png").read_bytes()


# --- no third-party log noise through the API ---------------------------------------------

def test_reading_a_workdir_logs_no_orbax_warnings(tmp_path, caplog, monkeypatch):
    """A read-only open of a workdir's checkpoints: Orbax's two absl warnings are not
    shown, unless a command line asked for them (--verbose)."""
    import logging

    from msit_jax.io.workdir import CheckpointReader

    (tmp_path / "checkpoints").mkdir()
    caplog.set_level(logging.WARNING, logger="absl")
    CheckpointReader(str(tmp_path))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    monkeypatch.setattr(console, "_VERBOSE", True)  # what quiet_logs(verbose=True) sets
    CheckpointReader(str(tmp_path))
    shown = " ".join(r.getMessage() for r in caplog.records)
    assert "read only" in shown and "save_interval_steps=0" in shown
    assert logging.getLogger("absl").level == logging.WARNING  # levels restored


@pytest.mark.slow
def test_api_and_onnx_loads_print_nothing(tmp_path, tiny_run, tiny_cfg, tiny_vars, capfd):
    """Upscaler.from_pretrained on a training workdir and the ONNX runner (session and a
    call) write nothing to stdout or stderr (at the file-descriptor level: onnxruntime
    logs from C++); the ONNX session logs errors only unless verbose."""
    import numpy as np

    from msit_jax import Upscaler

    from msit_jax.export import cli as export_cli
    from msit_jax.export import onnx_runner

    pytest.importorskip("onnxruntime")
    capfd.readouterr()
    up = Upscaler.from_pretrained(tiny_run[1])
    up(np.zeros((8, 8, 3), np.uint8), scale=2)
    out = str(tmp_path / "onnx")
    export_cli.export_variables(tiny_cfg, tiny_vars, out, "onnx")
    capfd.readouterr()
    runner = onnx_runner.load(out)
    runner(np.zeros((8, 8, 3), np.uint8), scale=2.5)
    assert capfd.readouterr() == ("", "")
    assert runner.session.get_session_options().log_severity_level == 3
    assert onnx_runner.load(out, verbose=True).session.get_session_options() \
        .log_severity_level == 2
