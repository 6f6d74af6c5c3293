"""Packaging: what `pip install msit-jax` (no extras) can do, and pyproject's declarations.

The inference-only check runs in a subprocess in which the training and optional
packages cannot be imported (their sys.modules entries are None), which is how
an install without the `train`, `torch`, `plot` and `export` extras behaves.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from msit_jax import weights
from msit_jax.io import model_dir

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the project runs on 3.11)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages that only training, the PyTorch reader, plots or TFDS bring in.
NOT_FOR_INFERENCE = ("tensorflow_datasets", "tensorflow", "grain", "pyarrow", "array_record",
                     "matplotlib", "torch", "safetensors")
EXTRAS = {"train", "tensorboard", "torch", "plot", "demo", "export", "all"}
# extra -> the requirements file that pins it (core + train: requirements.txt).
REQUIREMENT_FILES = {"tensorboard": "requirements-tensorboard.txt",
                     "torch": "requirements-torch.txt", "plot": "requirements-plot.txt",
                     "export": "requirements-export.txt", "demo": "requirements-demo.txt"}


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(req).name).lower()


def _pins(filename: str) -> dict[str, str]:
    """{normalised name: version} of a requirements file's `name==version` lines."""
    out = {}
    with open(os.path.join(REPO, filename)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            req = Requirement(line)
            (spec,) = req.specifier  # exact pins only
            assert spec.operator == "==", (filename, line)
            out[_name(line)] = spec.version
    return out


def _lower_bounds(reqs: list[str]) -> dict[str, str]:
    out = {}
    for r in reqs:
        (spec,) = Requirement(r).specifier
        assert spec.operator == ">=", r  # lower bounds, never exact pins
        out[_name(r)] = spec.version
    return out


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_inference_needs_no_training_or_optional_packages(tmp_path, tiny_cfg, tiny_vars):
    model = str(tmp_path / "model")
    model_dir.save_model(model, tiny_cfg, tiny_vars)
    code = f"""
import json, sys
for name in {NOT_FOR_INFERENCE!r}:
    sys.modules[name] = None  # `import name` now fails, as without the package
import numpy as np
from msit_jax import Upscaler
up = Upscaler.from_pretrained({model!r})
lr = np.random.RandomState(0).randint(0, 256, (10, 14, 3)).astype(np.uint8)
sr = up(lr, scale=2)
loaded = sorted(m for m in sys.modules if sys.modules[m] is not None
                and m.split(".")[0] in {NOT_FOR_INFERENCE!r})
light = sorted(m for m in ("msit_jax.training.loop", "msit_jax.data.pipeline",
                           "msit_jax.training.checkpoints") if m in sys.modules)
print(json.dumps(dict(shape=list(sr.shape), dtype=str(sr.dtype), finite=bool(np.isfinite(
    sr.astype(np.float32)).all()), loaded=loaded, training=light)))
"""
    p = _run(code)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["shape"] == [20, 28, 3] and out["dtype"] == "uint8" and out["finite"]
    assert out["loaded"] == [] and out["training"] == []


@pytest.mark.slow
def test_training_without_the_train_extra_says_what_to_install(tmp_path):
    wd = str(tmp_path / "run")
    code = f"""
import sys
sys.modules["grain"] = None
from msit_jax.training.cli import main
sys.exit(main(["--config", "configs/tiny.py", "--workdir", {wd!r}]))
"""
    p = _run(code)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ['error: training needs the grain package: pip install "msit-jax[train]" '
                      "(in a checkout: pip install -r requirements.txt)"]
    assert not os.path.exists(wd)


def test_console_scripts_point_at_zero_argument_mains():
    scripts = _pyproject()["project"]["scripts"]
    assert scripts == {"msit-train": "msit_jax.training.cli:main",
                       "msit-evaluate": "msit_jax.eval.cli:main",
                       "msit-upscale": "msit_jax.inference.cli:main",
                       "msit-convert": "msit_jax.io.convert:main",
                       "msit-export": "msit_jax.export.cli:main",
                       "msit-demo": "msit_jax.demo:main"}
    for name, target in scripts.items():
        module, func = target.split(":")
        fn = getattr(importlib.import_module(module), func, None)
        assert callable(fn), f"{name}: {module} has no {func}()"
        required = [p.name for p in inspect.signature(fn).parameters.values()
                    if p.default is inspect.Parameter.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not required, f"{name}: {target} must be callable without arguments"
    # the repo-root train.py is a thin wrapper of the console script's main
    with open(os.path.join(REPO, "train.py")) as f:
        assert "from msit_jax.training.cli import main" in f.read()


def test_dependencies_and_extras_match_the_pinned_requirements():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    assert set(extras) == EXTRAS
    core = _lower_bounds(project["dependencies"])
    assert {"jax", "flax", "orbax-checkpoint", "ml-collections", "numpy", "pillow",
            "absl-py", "safetensors"} <= set(core)
    assert not {"grain", "tensorflow-datasets", "array-record", "torch"} & set(core)
    assert set(_lower_bounds(extras["train"])) == {"tensorflow-datasets", "array-record",
                                                   "grain", "tensorboardx"}
    # requirements.txt (the README's install) pins core + train at the lower bounds, then
    # installs the package itself. A core dependency may still be pinned by an extra's
    # file instead (safetensors, core since it is the recommended weights format, by
    # requirements-export.txt), at the same version: the README installs both.
    pins = {f: _pins(f) for f in ["requirements.txt", *REQUIREMENT_FILES.values()]}
    train = _lower_bounds(extras["train"])
    assert set(pins["requirements.txt"]) <= set(core) | set(train)
    for name, version in {**core, **train}.items():
        where = [f for f, p in pins.items() if name in p]
        assert where and all(pins[f][name] == version for f in where), (name, where)
    with open(os.path.join(REPO, "requirements.txt")) as f:
        assert [ln.strip() for ln in f if ln.strip()][-1] == "-e ."
    for extra, filename in REQUIREMENT_FILES.items():
        bounds = _lower_bounds(extras[extra])
        assert {k: v for k, v in pins[filename].items() if k not in core} == bounds, filename
    # `all` is every other extra, through the package itself
    (everything,) = extras["all"]
    req = Requirement(everything)
    assert _name(everything) == "msit-jax" and not req.specifier
    assert req.extras == EXTRAS - {"all"}


def test_bundled_weights_are_package_data():
    """Every file of msit_jax/weights that the registry needs is matched by pyproject's
    package-data globs (the wheel carries exactly what setuptools' globs match)."""
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["msit_jax.weights"]
    for name in weights.available():
        for path in (weights.weights_path(name), weights.card_path(name)):
            assert any(fnmatch.fnmatch(os.path.basename(path), g) for g in globs), path
    # the figures the card is made from ship too
    assert any(fnmatch.fnmatch(f"{weights.DEFAULT}.json", g) for g in globs)
