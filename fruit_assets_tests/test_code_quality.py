"""The linter and the type checker, run by the test command so that CI and a developer's run both
hold the code to them (configuration: [tool.ruff] and [tool.pyright] in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    result = _run(str(BIN / "ruff"), "check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_pyright_finds_nothing_in_the_package():
    result = _run(str(BIN / "pyright"))
    assert result.returncode == 0, result.stdout + result.stderr


MAX_FUNCTION_LINES = 40  # issue 25: a function of the package reads on one screen, its docstring included


def test_no_function_of_the_package_is_over_40_lines():
    import ast

    long = []
    for path in sorted((REPO / "fruit_assets").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)
