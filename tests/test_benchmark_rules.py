"""benchmarks/ use the package as users do (issue 11): no sys.path edits, no calls of another object's private
methods (`obj._name(...)`; namedtuple's `_replace` / `_asdict` / `_make` are its public API)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_make", "_fields"}


def _violations(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        if isinstance(node.value, ast.Attribute) and node.value.attr == "path" and node.attr in ("insert", "append"):
            if isinstance(node.value.value, ast.Name) and node.value.value.id == "sys":
                out.append(f"{path.name}:{node.lineno}: sys.path.{node.attr}")
        name = node.attr
        private = name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORE
        if private and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            out.append(f"{path.name}:{node.lineno}: .{name}")
    return out


def test_there_are_benchmarks():
    assert len(BENCH) >= 10


@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.name)
def test_benchmark_uses_public_api_only(path):
    assert _violations(path) == []


def test_the_check_catches_both(tmp_path):
    bad = tmp_path / "b.py"
    bad.write_text("import sys\nsys.path.insert(0, '.')\nr.runner._batch(1)\nc._replace(a=1)\nself._x()\n")
    assert _violations(bad) == ["b.py:2: sys.path.insert", "b.py:3: ._batch"]
