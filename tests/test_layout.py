"""Import rules of the package layout, checked statically (ast, no imports run).

(a) msit_jax/models/ imports nothing of msit_jax but msit_jax.models, msit_jax.ops
    and msit_jax.geometry, so the architecture reads on its own;
(b) nothing in msit_jax/io/ imports msit_jax.training (weights in and out must
    not pull in the trainer);
(c) no module imports another module's private name (`from msit_jax.x import _y`)
    or reaches one through a module (`x._y`, `msit_jax.x._y`);
(d) no import of msit_jax inside a function or class: a lazy import hides a
    dependency cycle or a layering problem. Lazy imports of optional heavy
    third-party packages (torch, tensorflow_datasets, onnx, gradio, ...) are not
    msit_jax imports and are fine; LAZY_ALLOWED lists the msit_jax exceptions.
(e) imports go down the layers (LAYERS), never up: the foundations (errors,
    geometry, images, ops, ...) know nothing of the model, models/ and ops/ know
    nothing of io/, inference/ or export/, the running model and the exports know
    nothing of training or evaluation, and only the command-line surfaces sit on top;
(f) nothing in msit_jax/inference/ imports msit_jax.training or msit_jax.eval (the
    running model needs no trainer, whatever layer a module is put in);
(g) the module import graph (module-level imports, `if TYPE_CHECKING:` blocks left
    out: they never run) has no cycle.
"""

from __future__ import annotations

import ast
import dataclasses
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "msit_jax"

MODELS_MAY_IMPORT = ("msit_jax.models", "msit_jax.ops", "msit_jax.geometry")
# Rule (e): a module's layer is that of the longest prefix listed; a module imports only
# its own layer or lower ones. 0 foundations, 1 the model, 2 weights and data in and out,
# 3 the running model and its exports, 4 training, evaluation and lowering checks,
# 5 the command-line surfaces (and the package face, which names everything lazily).
LAYERS: dict[str, int] = {
    "msit_jax.errors": 0, "msit_jax.geometry": 0, "msit_jax.console": 0, "msit_jax.images": 0,
    "msit_jax.weights": 0, "msit_jax.ops": 0, "msit_jax.hlo": 0,
    "msit_jax.models": 1,
    "msit_jax.io": 2, "msit_jax.data": 2,
    "msit_jax.inference": 3, "msit_jax.export": 3,
    "msit_jax.eval": 4, "msit_jax.training": 4, "msit_jax.lowering": 4, "msit_jax.configs": 4,
    "msit_jax": 5, "msit_jax.flags_util": 5, "msit_jax.demo": 5, "msit_jax.convert": 5,
    "msit_jax.pretrained": 5, "msit_jax.reparam": 5, "msit_jax.io.convert": 5,
    "msit_jax.inference.cli": 5, "msit_jax.inference.__main__": 5, "msit_jax.export.cli": 5,
    "msit_jax.export.__main__": 5, "msit_jax.eval.cli": 5, "msit_jax.training.cli": 5,
}
# (importing module, imported module) pairs allowed as function-level imports, each
# with its reason: an optional dependency stands behind the msit_jax module. None of
# them works around a cycle (rule (d) finds any other).
LAZY_ALLOWED: dict[tuple[str, str], str] = {
    ("msit_jax.training.cli", "msit_jax.training"):
        "the loop needs the `train` extra (grain, TFDS); the CLI reports it missing in one line",
}


@dataclasses.dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. msit_jax.io.pretrained
    path: str  # its file, relative to the tree root
    line: int
    target: str  # the imported msit_jax module, e.g. msit_jax.training.checkpoints
    names: tuple[str, ...]  # names taken from it by `from ... import`; () for `import`
    lazy: bool  # inside a def or class
    typing_only: bool = False  # inside `if TYPE_CHECKING:` (never executed)

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _is_module(root: str, dotted: str) -> bool:
    base = os.path.join(root, *dotted.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


class _Scanner(ast.NodeVisitor):
    """Collects one file's msit_jax imports and its private uses through modules."""

    def __init__(self, root: str, path: str):
        self.root, self.path = root, path
        self.rel = os.path.relpath(path, root)
        self.module = _module_name(root, path)
        self.is_package = os.path.basename(path) == "__init__.py"
        self.depth = 0  # enclosing defs / classes
        self.typing_only = 0  # enclosing `if TYPE_CHECKING:` blocks
        self.imports: list[Import] = []
        self.module_aliases: dict[str, str] = {}  # local name -> msit_jax module
        self.private_uses: list[tuple[int, str]] = []  # (line, "msit_jax.x._y")

    def _scoped(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scoped

    def visit_If(self, node: ast.If):
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name != "TYPE_CHECKING":
            return self.generic_visit(node)
        self.typing_only += 1
        for child in node.body:
            self.visit(child)
        self.typing_only -= 1
        for child in node.orelse:
            self.visit(child)

    def _record(self, node, target: str, names: tuple[str, ...]):
        self.imports.append(Import(self.module, self.rel, node.lineno, target, names,
                                   self.depth > 0, self.typing_only > 0))

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if not _in_package(alias.name):
                continue
            self._record(node, alias.name, ())
            if alias.asname:
                self.module_aliases[alias.asname] = alias.name
            else:  # `import msit_jax.a.b` binds `msit_jax`; attribute chains resolve below
                self.module_aliases[PACKAGE] = PACKAGE

    def visit_ImportFrom(self, node: ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            parts = self.module.split(".")
            keep = len(parts) - node.level + (1 if self.is_package else 0)
            base = ".".join(parts[:keep] + ([base] if base else []))
        if not _in_package(base):
            return
        attrs = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if _is_module(self.root, sub):  # `from msit_jax.io import pretrained`
                self._record(node, sub, ())
                self.module_aliases[alias.asname or alias.name] = sub
                if _private(alias.name):
                    attrs.append(alias.name)
            else:
                attrs.append(alias.name)
        if attrs:
            self._record(node, base, tuple(attrs))

    def visit_Attribute(self, node: ast.Attribute):
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in self.module_aliases:
            # the longest module prefix of the chain; the next name is an attribute of it
            dotted = [self.module_aliases[value.id]] + chain[::-1]
            mod, i = dotted[0], 1
            while i < len(dotted) and _is_module(self.root, f"{mod}.{dotted[i]}"):
                mod, i = f"{mod}.{dotted[i]}", i + 1
            if i < len(dotted) and _private(dotted[i]) and mod != self.module:
                self.private_uses.append((node.lineno, f"{mod}.{dotted[i]}"))
            return  # the whole chain is handled here
        self.generic_visit(node)


def scan(root: str) -> list[_Scanner]:
    """One scanner per .py file of `root`/msit_jax, sorted by path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), filename=path)
                s = _Scanner(root, path)
                s.visit(tree)
                out.append(s)
    return out


def layer(module: str) -> int:
    """Rule (e)'s layer of a msit_jax module: that of its longest prefix in LAYERS."""
    best = max((p for p in LAYERS if _under(module, p)), key=len)
    return LAYERS[best]


def import_cycles(scanners: list[_Scanner]) -> list[list[str]]:
    """The cycles of the module graph (module-level, executed imports): each strongly
    connected component of more than one module, sorted (Tarjan's algorithm)."""
    graph = {s.module: sorted({i.target for i in s.imports if not i.lazy and not i.typing_only
                               and i.target != s.module})
             for s in scanners}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def violations(root: str) -> dict[str, list[str]]:
    """Rule letter -> offender lines ('path:line: what'), for the tree at `root`."""
    found: dict[str, list[str]] = {r: [] for r in "abcdefg"}
    scanners = scan(root)
    for s in scanners:
        for imp in s.imports:
            if layer(imp.target) > layer(s.module):
                found["e"].append(f"{imp.where()}: {s.module} (layer {layer(s.module)}) "
                                  f"imports {imp.target} (layer {layer(imp.target)})")
            if (_under(s.module, "msit_jax.inference")
                    and any(_under(imp.target, p) for p in ("msit_jax.training",
                                                            "msit_jax.eval"))):
                found["f"].append(f"{imp.where()}: {s.module} imports {imp.target}")
            if (_under(s.module, "msit_jax.models")
                    and not any(_under(imp.target, p) for p in MODELS_MAY_IMPORT)):
                found["a"].append(f"{imp.where()}: {s.module} imports {imp.target}")
            if _under(s.module, "msit_jax.io") and _under(imp.target, "msit_jax.training"):
                found["b"].append(f"{imp.where()}: {s.module} imports {imp.target}")
            for name in imp.names:
                if _private(name) and imp.target != s.module:
                    found["c"].append(f"{imp.where()}: {s.module} imports {imp.target}.{name}")
            if imp.lazy and (s.module, imp.target) not in LAZY_ALLOWED:
                found["d"].append(f"{imp.where()}: {s.module} imports {imp.target} "
                                  "inside a function")
        for line, name in s.private_uses:
            found["c"].append(f"{s.rel}:{line}: {s.module} uses {name}")
    for cycle in import_cycles(scanners):
        found["g"].append("import cycle: " + " <-> ".join(cycle))
    return found


RULES = {
    "a": "msit_jax/models/ imports msit_jax outside models, ops and geometry",
    "b": "msit_jax/io/ imports msit_jax.training",
    "c": "a module imports or uses another module's private name",
    "d": "msit_jax is imported inside a function (not in LAZY_ALLOWED)",
    "e": "a module imports one of a higher layer (LAYERS)",
    "f": "msit_jax/inference/ imports msit_jax.training or msit_jax.eval",
    "g": "the module import graph has a cycle",
}


def report(found: dict[str, list[str]]) -> str:
    lines = []
    for rule, offenders in found.items():
        if offenders:
            lines.append(f"({rule}) {RULES[rule]}: {len(offenders)}")
            lines.extend(f"    {o}" for o in offenders)
    return "\n".join(lines)


def test_package_follows_the_import_rules():
    found = violations(REPO)
    if any(found.values()):
        pytest.fail("import rule violations:\n" + report(found), pytrace=False)


# --- the checker itself, on fixture trees ------------------------------------------------

CLEAN = {
    "__init__.py": "",
    "geometry.py": "def _helper():\n    return 1\n\ndef public():\n    return _helper()\n",
    "models/__init__.py": "",
    "models/layers.py": "from msit_jax import geometry\nfrom msit_jax.ops import conv\n",
    "models/model.py": ("from msit_jax.models import layers\nimport msit_jax.ops.conv\n"
                        "from . import layers as same\n\n"
                        "def f():\n    import torch  # optional heavy dependency: fine\n"
                        "    return msit_jax.ops.conv.public, same\n"),
    "ops/__init__.py": "",
    "ops/conv.py": "import numpy as np\n\ndef public():\n    return np.zeros(1)\n",
    "io/__init__.py": "",
    "io/pretrained.py": ("from msit_jax.models import model\n"
                         "from msit_jax.geometry import public\n"),
    "training/__init__.py": "",
    "training/loop.py": ("from msit_jax.io import pretrained\nfrom msit_jax import geometry as g\n"
                         "x = g.public()\n"),
    "inference/__init__.py": "",
    "inference/engine.py": "from msit_jax.models import model\nfrom msit_jax.io import pretrained\n",
    "inference/cli.py": "from msit_jax.inference import engine\nfrom msit_jax import flags_util\n",
    "export/__init__.py": "",
    "export/stablehlo.py": "from msit_jax.inference import engine\n",
    "eval/__init__.py": "",
    "eval/runner.py": ("from typing import TYPE_CHECKING\nfrom msit_jax.eval import reports\n"
                       "from msit_jax.inference import engine\n"),
    "eval/reports.py": ("from typing import TYPE_CHECKING\n"
                        "if TYPE_CHECKING:  # types only: not a cycle\n"
                        "    from msit_jax.eval import runner\n"),
    "flags_util.py": "from msit_jax.inference import engine\n",
}


def _write(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = root / "msit_jax" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_checker_passes_a_clean_tree(tmp_path):
    found = violations(_write(tmp_path, CLEAN))
    assert not any(found.values()), report(found)


# Rules a case breaks as well as its own: importing a higher layer (e) is what (a) and (b)
# forbid too, and an import up to a module that imports back down closes a cycle (g).
ALSO = {"models-imports-training": ("e", "g"), "models-imports-io-package": ("e",),
        "io-imports-training": ("e", "g"), "models-imports-export": ("a",)}
VIOLATIONS = {  # id: (rule, module file, its text, the one offender line expected)
    "models-imports-training": (
        "a", "models/layers.py", "from msit_jax.training import loop\n",
        "models/layers.py:1: msit_jax.models.layers imports msit_jax.training.loop"),
    "models-imports-io-package": (
        "a", "models/model.py", "from msit_jax import io\n",
        "models/model.py:1: msit_jax.models.model imports msit_jax.io"),
    "io-imports-training": (
        "b", "io/pretrained.py", "import msit_jax.training.loop\n",
        "io/pretrained.py:1: msit_jax.io.pretrained imports msit_jax.training.loop"),
    "private-from-import": (
        "c", "training/loop.py", "from msit_jax.geometry import _helper\n",
        "training/loop.py:1: msit_jax.training.loop imports msit_jax.geometry._helper"),
    "private-via-module": (
        "c", "training/loop.py", "from msit_jax import geometry\ngeometry._helper()\n",
        "training/loop.py:2: msit_jax.training.loop uses msit_jax.geometry._helper"),
    "private-via-dotted-path": (
        "c", "training/loop.py", "import msit_jax.geometry\nmsit_jax.geometry._helper()\n",
        "training/loop.py:2: msit_jax.training.loop uses msit_jax.geometry._helper"),
    "private-via-relative-import": (
        "c", "io/pretrained.py", "from ..ops import conv as c\nc._private = 1\n",
        "io/pretrained.py:2: msit_jax.io.pretrained uses msit_jax.ops.conv._private"),
    "ops-imports-inference": (
        "e", "ops/conv.py", "from msit_jax import inference\n",
        "ops/conv.py:1: msit_jax.ops.conv (layer 0) imports msit_jax.inference (layer 3)"),
    "models-imports-export": (
        "e", "models/model.py", "import msit_jax.export\n",
        "models/model.py:1: msit_jax.models.model (layer 1) imports msit_jax.export (layer 3)"),
    "io-imports-flags": (
        "e", "io/workdir.py", "from msit_jax import flags_util\n",
        "io/workdir.py:1: msit_jax.io.workdir (layer 2) imports msit_jax.flags_util (layer 5)"),
    "inference-cli-imports-training": (
        "f", "inference/cli.py", "from msit_jax.training import loop\n",
        "inference/cli.py:1: msit_jax.inference.cli imports msit_jax.training.loop"),
    "function-level-import": (
        "d", "training/loop.py", "def f():\n    from msit_jax.io import pretrained\n",
        "training/loop.py:2: msit_jax.training.loop imports msit_jax.io.pretrained inside a "
        "function"),
}


def test_checker_reports_an_import_cycle(tmp_path):
    """A runtime import back from reports to runner closes a cycle (rule g); the same
    import under `if TYPE_CHECKING:` (the clean tree) does not."""
    files = dict(CLEAN)
    files["eval/reports.py"] = "from msit_jax.eval import runner\n"
    found = violations(_write(tmp_path, files))
    assert found["g"] == ["import cycle: msit_jax.eval.reports <-> msit_jax.eval.runner"], \
        report(found)
    assert all(not v for r, v in found.items() if r != "g"), report(found)


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_checker_reports_a_deliberate_violation(tmp_path, case):
    rule, rel, text, expected = VIOLATIONS[case]
    files = dict(CLEAN)
    files[rel] = text  # the module, rewritten with the violation
    found = violations(_write(tmp_path, files))
    assert found[rule] == ["msit_jax/" + expected], report(found)
    also = ALSO.get(case, ())
    assert all(not v for r, v in found.items() if r != rule and r not in also), report(found)
    assert all(found[r] for r in also), report(found)
