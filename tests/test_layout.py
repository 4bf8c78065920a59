"""The shape rules of the code (#25), made executable beside import-linter's contracts
(pyproject.toml, `make lint`): a module of trainer/ stays small enough to read in one
sitting, imports its own modules at the top (so `lint-imports` sees every dependency and
no cycle hides in a function body), and dispatches on our types with isinstance, not by
sniffing attributes."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

MAX_LINES = 400
MODULES = sorted((REPO / "trainer").rglob("*.py"))


def _tree(path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_the_rules_see_every_module():
    assert len(MODULES) > 60 and REPO / "trainer" / "data" / "pipeline.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(REPO)))
def test_no_module_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines; split it by concern"


def _own_imports_in_bodies(tree: ast.Module) -> list[str]:
    """`from trainer... import` / `import trainer...` inside a function (TYPE_CHECKING blocks
    at module level are fine: they are not in a function)."""
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("trainer", "launch"):
                found.append(f"line {node.lineno}: from {node.module}")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("trainer", "launch") for a in node.names):
                found.append(f"line {node.lineno}: import {node.names[0].name}")
    return found


def test_no_function_imports_our_own_modules():
    deferred = {str(p.relative_to(REPO)): _own_imports_in_bodies(_tree(p)) for p in MODULES}
    assert {path: found for path, found in deferred.items() if found} == {}


def test_the_checks_catch_what_they_forbid():
    deferred = ast.parse("def f():\n    from trainer.data import plan\n    import trainer.files\n")
    assert _own_imports_in_bodies(deferred) == ["line 2: from trainer.data", "line 3: import trainer.files"]
    assert _hasattr_calls(ast.parse("if hasattr(split, 'shards'):\n    pass\n")) == ["line 1"]


def _hasattr_calls(tree: ast.Module) -> list[str]:
    return [
        f"line {node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
    ]


def test_no_hasattr_dispatch_outside_feature_checks_of_the_platform():
    """hasattr(socket, "SO_REUSEPORT") asks the platform; on our own types it is forbidden."""
    allowed = {"trainer/launcher.py", "trainer/rendezvous.py"}  # socket.SO_REUSEPORT only
    calls = {str(p.relative_to(REPO)): _hasattr_calls(_tree(p)) for p in MODULES}
    assert {path: found for path, found in calls.items() if found and path not in allowed} == {}
    for path in allowed:
        assert "hasattr(socket, " in (REPO / path).read_text()
