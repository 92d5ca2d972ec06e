"""The layers stay visible: who may import what, and how large a module or function may grow
(docs/architecture.md). Read from the source with `ast`; nothing is imported or run."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

import pytest

from testkit.server import ROOT

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_MODULES = 12
# the edge: the app mounts the MCP transport and serves HTTP; the CLI starts it
EDGE = {"kernelpool/app.py", "kernelpool/cli.py"}
WEB = ("mcp", "mcp_types", "starlette", "uvicorn", "sse_starlette")


def _sources(*tops: str) -> Iterator[str]:
    for top in tops:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(folder, name), ROOT)


def _imports(path: str) -> set[str]:
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("path", sorted(_sources("sandbox")))
def test_sandbox_imports_nothing_of_kernelpool(path: str) -> None:
    assert not {m for m in _imports(path) if _top(m) == "kernelpool"}, path


@pytest.mark.parametrize("path", sorted(_sources("kernelpool")))
def test_only_the_tool_layer_and_the_edge_speak_mcp_and_http(path: str) -> None:
    if path.startswith(("kernelpool/mcp/", "kernelpool/web/")) or path in EDGE:
        return
    web = sorted(m for m in _imports(path) if _top(m) in WEB)
    assert not web, f"{path} imports {web}: services stay free of the MCP SDK and the web stack"


@pytest.mark.parametrize("path", sorted(_sources("kernelpool", "sandbox")))
def test_modules_and_functions_stay_small(path: str) -> None:
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path} has {lines} lines (at most {MAX_MODULE_LINES}): split it by concern"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text, path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_kernelpool_top_level_stays_small() -> None:
    top = sorted(n for n in os.listdir(os.path.join(ROOT, "kernelpool")) if n.endswith(".py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules directly in kernelpool/: {top}"


def test_package_inits_import_nothing_heavy() -> None:
    """The fork server's child and every kernel import modules below kernelpool.kernels: the
    packages on the way must not drag the server's dependencies in."""
    for path in _sources("kernelpool"):
        if path.endswith("__init__.py") and path != "kernelpool/__init__.py":
            assert not _imports(path), f"{path} imports {_imports(path)}"
