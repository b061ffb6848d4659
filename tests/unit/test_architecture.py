"""The tree is the architecture: imports point down the layers, and everything below ``smt.lightning`` runs without
Lightning.

Layers, lowest first; a module imports from its own layer and the ones below, never above:

    0  smt.kernels              block geometry (``BlockGrid``, ``BlockPlan``) and the kernels over it
    1  smt.core  smt.data       the method in pure torch · records, prompts, tokens, loss masks, loaders (side by side)
    2  smt.adapters  smt.eval   taking Δ out of a model · evaluation protocols (side by side, not importing each other)
    3  smt.lightning            the callback, the LightningModule, its data, checkpoints, the ``smt`` command
    4  smt                      the public names (``smt/__init__.py``) and ``python -m smt`` (``smt/__main__.py``)

Every import counts, also one inside a function. A new module must sit in one of these packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "smt"
LAYERS = {"smt.kernels": 0, "smt.core": 1, "smt.data": 1, "smt.adapters": 2, "smt.eval": 2, "smt.lightning": 3}
TOP = 4
TOP_MODULES = ("smt", "smt.__main__")
LIGHTNING = ("lightning", "pytorch_lightning")
LIGHTNING_FREE = [name for name, layer in LAYERS.items() if layer < LAYERS["smt.lightning"]]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int | None:
    if name in TOP_MODULES:
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
            if there is not None and there > here:
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
    (fake / "lightning" / "callback.py").write_text("from lightning.pytorch import Callback\n")
    (fake / "flat.py").write_text("import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert offending_imports() == [
        "smt/core/layer.py:1 imports lightning.pytorch: only smt.lightning may import Lightning",
        "smt/core/model.py:4 imports smt.lightning.callback: layer 3 is above smt.core.model's layer 1",
        "smt/flat.py is in no layer: move it into one of smt.kernels, smt.core, smt.data, smt.adapters, smt.eval, "
        "smt.lightning "
        "(or add its package)",
    ]


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
