"""The block library (pipeline/models, pipeline/ops) raises only pipeline.errors types or Python builtins, so a
caller's ``except ValueError`` (or ``except PipelineError``) sees every error it can act on."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

import pipeline.errors

PACKAGE = Path(pipeline.errors.__file__).parent
ALLOWED = {name for name, obj in vars(pipeline.errors).items() if isinstance(obj, type)} | {
    name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)}
SOURCES = sorted([*(PACKAGE / "models").glob("*.py"), *(PACKAGE / "ops").glob("*.py")])


def _raised(tree: ast.AST):
    """``(line, name)`` of every ``raise X(...)`` / ``raise X`` whose exception is named in the source;
    a bare ``raise`` and re-raising a caught variable are not new errors."""
    caught = {h.name for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.name}
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id not in caught:
                yield node.lineno, exc.id
            elif isinstance(exc, ast.Attribute):
                yield node.lineno, exc.attr


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_block_library_raises_only_pipeline_errors_or_builtins(source):
    tree = ast.parse(source.read_text())
    helpers = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}  # raise self._error(...) etc.
    bad = [(line, name) for line, name in _raised(tree) if name not in ALLOWED and name not in helpers]
    assert not bad, f"{source}: raises {bad}; use pipeline.errors (DataError, UsageError) or a builtin"


def test_the_errors_users_act_on_are_value_errors():
    assert issubclass(pipeline.errors.DataError, ValueError) and issubclass(pipeline.errors.UsageError, ValueError)
