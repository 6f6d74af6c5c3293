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
    from msit_jax import flags_util, upscale

    pkg = os.path.join(REPO, "msit_jax")
    assert flags_util.invoked_program("/venv/bin/msit-upscale") == "msit-upscale"
    assert flags_util.invoked_program(os.path.join(pkg, "upscale.py")) == \
        "python -m msit_jax.upscale"
    assert flags_util.invoked_program(os.path.join(pkg, "eval", "cli.py")) == \
        "python -m msit_jax.eval.cli"
    assert flags_util.invoked_program("evaluate.py") == "python evaluate.py"
    assert flags_util.invoked_program("-c") is None
    from absl import flags

    fv = flags.FlagValues()
    upscale.define_flags(fv)
    for prog in ("msit-upscale", "python -m msit_jax.upscale"):
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
