"""The package's layering: ``maskreg.engine`` is the only package that imports torch, and the torch-free modules
reach it through ``maskreg.register`` only (``maskreg/__init__.py``'s lazy attribute)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "maskreg"
ENGINE = SRC / "engine"
# the flat, torch-free modules and the qc package (everything under src/maskreg outside engine/)
OUTSIDE = sorted(p for p in SRC.rglob("*.py") if ENGINE not in p.parents)
LIMITS = {"module_lines": 600, "function_lines": 80}


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement of ``path`` names, at any depth (lazy imports
    inside functions included); ``from maskreg import engine`` counts as ``maskreg.engine``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: str(p.relative_to(SRC)))
def test_only_the_package_init_reaches_into_the_engine(path: Path) -> None:
    names = _imported_modules(path)
    engine = sorted(n for n in names if n == "maskreg.engine" or n.startswith("maskreg.engine."))
    torch = sorted(n for n in names if n == "torch" or n.startswith("torch."))
    assert not torch, f"{path.name} imports torch ({torch}); torch code belongs in maskreg/engine/"
    if path == SRC / "__init__.py":  # its lazy attributes: register, RegistrationResult, train_model
        assert engine and all(n in ("maskreg.engine", "maskreg.engine.learn") for n in engine), engine
    else:
        assert not engine, f"{path.name} imports {engine}; outside maskreg/engine/ only maskreg/__init__ may"


def test_torch_free_modules_import_without_torch() -> None:
    """The modules every non-registration job imports load neither torch nor the engine (checked in a fresh
    interpreter, so nothing this test process imported hides it)."""
    flat = [p.stem for p in SRC.glob("*.py") if p.stem != "__init__"]
    code = "\n".join(
        [f"import maskreg.{m}" for m in flat]
        + ["import maskreg.qc.metrics, maskreg.qc.flags, maskreg.qc.evaluate, maskreg.qc.figures", "import sys"]
        + ["print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('maskreg.engine')))"]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - first + 1
            if n > LIMITS["function_lines"]:
                out.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_modules_and_functions_stay_short() -> None:
    """No module under src/ over 600 lines and no function over 80 (issue 26's bound): a long one is a set of
    named steps waiting to be written."""
    long_modules = [
        f"{p.relative_to(SRC)} ({n} lines)"
        for p in sorted(SRC.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > LIMITS["module_lines"]
    ]
    long_functions = [f for p in sorted(SRC.rglob("*.py")) for f in _long_functions(p)]
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)


def _private_uses(path: Path) -> list[str]:
    """Names beginning with ``_`` that ``path`` imports from maskreg or reads as attributes of a maskreg module
    it imported (``module._name``); dunder names excepted."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()  # local names bound to maskreg modules
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "maskreg":
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    out.append(f"{path.name}:{node.lineno} from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "maskreg":
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                out.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return out


def test_tests_use_public_names_only() -> None:
    """Tests check behaviour through public names: no ``_private`` import from maskreg, no ``module._name``."""
    found = [u for p in sorted((SRC.parents[1] / "tests").glob("*.py")) for u in _private_uses(p)]
    assert not found, "\n".join(found)
