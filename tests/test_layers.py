"""The package's layers (see ``planner/__init__.py``): every import, lazy ones inside functions
included, runs from a higher layer to a lower one, never back up; cost and loss never import
each other; nothing below the CLI imports ground truth; every subpackage says what it owns."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import planner

PACKAGE_DIR = Path(planner.__file__).parent

LAYER = {
    "planner.errors": 0,
    "planner.units": 0,
    "planner.specs": 1,
    "planner.cost": 2,
    "planner.loss": 2,
    "planner.search": 3,
    "planner.io": 4,
    "planner.truth": 5,
    "planner.cli": 6,
    "planner.__main__": 6,
}
SIBLINGS_APART = {("planner.cost", "planner.loss"), ("planner.loss", "planner.cost")}
MAX_MODULE_LINES = 400
NOT_YET_SPLIT: set[str] = set()


def _area(module: str) -> str | None:
    for area in sorted(LAYER, key=len, reverse=True):
        if module == area or module.startswith(area + "."):
            return area
    return None


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        name = ".".join(rel.parts)
        out.append((name.removesuffix(".__init__"), path))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported planner module) of every import statement, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "planner":
                found += [(node.lineno, f"planner.{alias.name}") for alias in node.names]
            elif node.module.startswith("planner."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("planner.")]
    return found


def _violations() -> list[str]:
    bad = []
    for module, path in _modules():
        here = _area(module)
        if here is None:
            continue
        for line, target in _imports(path):
            there = _area(target)
            if there is None or there == here:
                continue
            if LAYER[there] > LAYER[here] or (here, there) in SIBLINGS_APART:
                bad.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line} {module} imports {target}")
    return bad


def test_imports_run_down_the_layers():
    assert _violations() == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The rule can fail: a cost module importing the search is reported."""
    fake = tmp_path / "planner" / "cost"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from planner.search import plan\n")
    monkeypatch.setattr(__name__ + ".PACKAGE_DIR", tmp_path / "planner")
    assert _violations() == ["planner/cost/bad.py:2 planner.cost.bad imports planner.search"]


def test_every_module_belongs_to_a_layer():
    loose = [m for m, _ in _modules() if m != "planner" and _area(m) is None]
    assert loose == []


@pytest.mark.parametrize("package", sorted(m for m, path in _modules() if path.name == "__init__.py" and m != "planner"))
def test_subpackage_says_what_it_owns(package):
    doc = importlib.import_module(package).__doc__ or ""
    assert "Owns" in doc or "owns" in doc, f"{package}.__init__ docstring should say what it owns"
    assert "import" in doc, f"{package}.__init__ docstring should say what it may import"


def test_no_module_over_the_size_limit():
    """Small pieces: a module over the limit must say why in a ``# size:`` comment at its top."""
    long = []
    for module, path in _modules():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES and "# size:" not in text[:3000] and module not in NOT_YET_SPLIT:
            long.append(f"{module}: {text.count(chr(10))} lines")
    assert long == []


def test_every_module_imports():
    for info in pkgutil.walk_packages(planner.__path__, "planner."):
        if not info.name.endswith("__main__"):  # running the CLI is not importing it
            importlib.import_module(info.name)
