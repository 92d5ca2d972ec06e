"""The layers stay visible: who may import what, and how large a module or function may grow
(docs/architecture.md). Read from the source with `ast`; nothing is imported or run.

Every import statement counts, wherever it stands: at the top, inside a function, and under
`if TYPE_CHECKING:`. A type-only import is a dependency all the same (the module cannot be read,
type-checked or moved without the other), and a cycle made of one is a cycle of the design.
Imports by a string (`importlib.import_module`) are not seen."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from testkit.server import ROOT

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_MODULES = 12
# the edge: the app mounts the MCP transport and serves HTTP; the CLI (its commands in
# kernelpool/commands/) starts it
EDGE = {"kernelpool/app.py", "kernelpool/cli.py", "kernelpool/commands/serve.py"}
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
    long = [(node.name, (node.end_lineno or node.lineno) - node.lineno + 1) for node in ast.walk(ast.parse(text, path))
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


# ---- the layers, for every import between our own modules ---------------------------------------

@dataclass(frozen=True)
class Layer:
    name: str
    units: tuple[str, ...]  # folders ("kernelpool/mcp/") and files: each module belongs to one
    peers: bool = False  # whether its units may import each other (within a unit, always)


# top to bottom: a module imports modules of its own unit and of the layers below its own, no other
# (docs/architecture.md, "Layers", says the same in words)
LAYERS = (
    Layer("edge", ("kernelpool/app.py", "kernelpool/cli.py", "kernelpool/commands/", "kernelpool/__main__.py",
                   "kernelpool/disk.py"), peers=True),
    # two edges over the same services, at the same height: neither imports the other
    Layer("tool layer and web layer", ("kernelpool/mcp/", "kernelpool/web/")),
    # one replica among several: placement, moves, HAProxy's maps (over the kernels and users it moves)
    Layer("replicas", ("kernelpool/replicas/",)),
    Layer("executions", ("kernelpool/executions/",)),
    Layer("notebooks", ("kernelpool/notebooks/",)),
    Layer("kernels", ("kernelpool/kernels/",)),
    Layer("users", ("kernelpool/users/",)),
    Layer("foundation", ("kernelpool/store.py", "kernelpool/rows.py", "kernelpool/db/", "kernelpool/schema.py",
                         "kernelpool/config.py", "kernelpool/settings/", "kernelpool/errors.py", "kernelpool/metrics.py",
                         "kernelpool/logs.py", "kernelpool/__init__.py"), peers=True),
    Layer("mechanism", ("sandbox/",)),
)


def _place(path: str) -> tuple[int, str]:
    """(the layer's rank, 0 at the top; the unit) of the module at `path`."""
    for rank, layer in enumerate(LAYERS):
        for unit in layer.units:
            if path == unit or (unit.endswith("/") and path.startswith(unit)):
                return rank, unit
    raise AssertionError(f"{path} is in no layer: add it to LAYERS here and to docs/architecture.md")


def _modules() -> dict[str, str]:
    """Dotted name -> path of every module of kernelpool/ and sandbox/ (a package: its __init__.py)."""
    found = {}
    for path in _sources("kernelpool", "sandbox"):
        parts = path[:-len(".py")].split("/")
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The path of our module `name` or, for a name below a module (an attribute), of that module."""
    while name:
        if name in MODULES:
            return MODULES[name]
        name = name.rpartition(".")[0]
    return None


def _own_imports(path: str, source: str | None = None) -> dict[str, int]:
    """The paths of our modules that `path` imports, each with the line of its first import: `import
    a.b`, `from a import b` (the submodule b when there is one, else a) and relative imports."""
    if source is None:
        with open(os.path.join(ROOT, path)) as f:
            source = f.read()
    package = path[:-len(".py")].split("/")[:-1]  # what a relative import starts from (for __init__.py: its own)
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(source, path)):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            resolved = _resolve(target) if _top(target) in ("kernelpool", "sandbox") else None
            if resolved is not None and resolved != path:
                found.setdefault(resolved, node.lineno)
    return found


GRAPH = {path: _own_imports(path) for path in MODULES.values()}


@pytest.mark.parametrize("path", sorted(GRAPH))
def test_every_import_goes_down_the_layers(path: str) -> None:
    rank, unit = _place(path)
    wrong = []
    for target, line in sorted(GRAPH[path].items()):
        their_rank, their_unit = _place(target)
        if their_rank > rank or their_unit == unit or (their_rank == rank and LAYERS[rank].peers):
            continue
        wrong.append(f"line {line}: {target} ({LAYERS[their_rank].name})")
    assert not wrong, f"{path} ({LAYERS[rank].name}) imports what is not below it: {wrong}"


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle() -> None:
    assert not _cycles(GRAPH), f"import cycles (each list imports itself round): {_cycles(GRAPH)}"


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself, on a made-up graph: a cycle of three through a type-only import, and a
    module that only leads into it (not part of it)."""
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_imports_are_seen_wherever_they_stand() -> None:
    """Imports inside a function, under TYPE_CHECKING and relative ones are edges of the graph too."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kernelpool.store import Store\n"
        "def f():\n    from kernelpool.kernels import registry\n    import sandbox.fs\n"
        "from . import cells\nfrom .paths import check_notebook_path\nfrom kernelpool import errors, __version__\n"
    )
    assert set(_own_imports("kernelpool/notebooks/service.py", source)) == {
        "kernelpool/store.py", "kernelpool/kernels/registry.py", "sandbox/fs.py", "kernelpool/notebooks/cells.py",
        "kernelpool/notebooks/paths.py", "kernelpool/errors.py", "kernelpool/__init__.py"}
    # kernelpool/mcp/server.py's `from kernelpool.mcp import cells, ...` names the submodules, not the package
    assert {"kernelpool/mcp/cells.py", "kernelpool/mcp/execution.py"} <= set(GRAPH["kernelpool/mcp/server.py"])
