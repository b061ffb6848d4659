"""The tree is the architecture: imports point down the layers, and everything below ``smt.lightning`` runs without
Lightning.

Layers, lowest first; a module imports from its own layer and the ones below, never above:

    0  smt.kernels              block geometry (``BlockGrid``, ``BlockPlan``) and the kernels over it
    1  smt.core                 the method in pure torch
    2  smt.adapters  smt.eval   taking Δ out of a model · evaluation protocols (side by side, not importing each other)
    3  smt.lightning            the callback, the LightningModule, its data, checkpoints, the ``smt`` command
    4  smt                      the public names (``smt/__init__.py``) and the alias modules at old import paths

Every import counts, also one inside a function. A new module must sit in one of these packages (a flat
``smt/<name>.py`` may only be an alias: imports, ``__all__``, nothing else).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "smt"
LAYERS = {"smt.kernels": 0, "smt.core": 1, "smt.adapters": 2, "smt.eval": 2, "smt.lightning": 3}
TOP = 4
LIGHTNING = ("lightning", "pytorch_lightning")
LIGHTNING_FREE = [name for name, layer in LAYERS.items() if layer < LAYERS["smt.lightning"]]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_alias(name: str) -> bool:
    """A flat ``smt/<name>.py``: the old import path of a moved module."""
    return name.count(".") == 1 and name.split(".")[1] not in {package.split(".")[1] for package in LAYERS}


def layer_of(name: str) -> int | None:
    if name == "smt" or is_alias(name):
        return TOP
    return next((layer for package, layer in LAYERS.items() if name == package or name.startswith(package + ".")), None)


def package_of(name: str) -> str:
    return next((package for package in LAYERS if name == package or name.startswith(package + ".")), name)


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file, at any depth (``from smt.x import y`` gives ``smt.x.y`` when
    ``smt.x.y`` is a module, else ``smt.x``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            known = sources()
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else node.module))
    return found


def offending_imports() -> list[str]:
    problems = []
    for name, path in sources().items():
        here = layer_of(name)
        where = path.relative_to(PACKAGE.parent)
        if here is None:
            problems.append(f"{where} is in no layer: move it into one of {', '.join(LAYERS)} (or add its package)")
            continue
        for line, target in imports(path):
            if target.split(".")[0] in LIGHTNING and here < LAYERS["smt.lightning"]:
                problems.append(f"{where}:{line} imports {target}: only smt.lightning may import Lightning")
            if target.split(".")[0] != "smt":
                continue
            there = layer_of(target)
            if here < TOP and is_alias(target):
                problems.append(f"{where}:{line} imports {target}, an old path kept for users: import the new module")
            elif there is not None and there > here:
                problems.append(f"{where}:{line} imports {target}: layer {there} is above {name}'s layer {here}")
            elif there == here < TOP and package_of(target) != package_of(name):
                problems.append(f"{where}:{line} imports {target}: {package_of(name)} and {package_of(target)} are "
                                "side by side, neither imports the other")  # fmt: skip
    return problems


def test_every_import_points_down_the_layers():
    assert offending_imports() == []


def test_the_check_names_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a core module importing the callback, or Lightning, is named with its line."""
    fake = tmp_path / "smt"
    (fake / "core").mkdir(parents=True)
    (fake / "lightning").mkdir()
    (fake / "core" / "model.py").write_text("import torch\n\ndef f():\n    from smt.lightning import callback\n")
    (fake / "core" / "layer.py").write_text("from lightning.pytorch import Callback\n")
    (fake / "lightning" / "callback.py").write_text("from smt.model import inject\n")
    (fake / "model.py").write_text('"""alias"""\n\nfrom smt.core.model import f\n')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert offending_imports() == [
        "smt/core/layer.py:1 imports lightning.pytorch: only smt.lightning may import Lightning",
        "smt/core/model.py:4 imports smt.lightning.callback: layer 3 is above smt.core.model's layer 1",
        "smt/lightning/callback.py:1 imports smt.model, an old path kept for users: import the new module",
    ]


def test_alias_modules_only_re_export():
    """``smt/<old>.py`` holds a docstring, imports from smt, ``__all__`` (and ``smt.cli`` its ``python -m`` guard)."""
    for name, path in sources().items():
        if not is_alias(name):
            continue
        tree = ast.parse(path.read_text())
        body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body  # the docstring
        for node in body:
            allowed = (
                isinstance(node, ast.ImportFrom) and node.module.startswith("smt.")
                or isinstance(node, ast.Import) and [a.name for a in node.names] == ["sys"]
                or isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
                or isinstance(node, ast.If) and name == "smt.cli" and ast.unparse(node.test) == "__name__ == '__main__'"
            )  # fmt: skip
            assert allowed, f"{path.relative_to(PACKAGE.parent)}:{node.lineno} is more than a re-export"
        module = __import__(name, fromlist=["__all__"])
        assert module.__all__ and all(hasattr(module, attribute) for attribute in module.__all__), name


@pytest.mark.parametrize("package", ["smt", *LIGHTNING_FREE])
def test_importing_below_lightning_loads_no_lightning(package):
    """Every module of the package imported in a fresh interpreter; ``lightning`` must not be in ``sys.modules``."""
    root = PACKAGE / package.removeprefix("smt").strip(".").replace(".", "/") if package != "smt" else None
    names = [package] if root is None else [n for n, p in sources().items() if p.is_relative_to(root)]
    names = [n for n in names if not n.startswith("smt.kernels.triton")]  # needs a GPU or TRITON_INTERPRET
    code = f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\n" + (
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not loaded, loaded[:5]"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]
