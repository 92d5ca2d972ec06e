"""Every tool refuses an argument it does not take, names it and what it takes, and changes
nothing: a real server, the real MCP client, every tool the server lists."""

from __future__ import annotations

import os
from typing import Any

import pytest

from testkit.client import mcp_client, text
from testkit.server import KernelpoolServer

NOTEBOOK = "args.ipynb"


def _value(name: str, schema: dict[str, Any]) -> Any:
    """A value of the type `schema` asks for (the first of a union that is not null)."""
    if "enum" in schema:
        return schema["enum"][0]
    for option in schema.get("anyOf", []):
        if option.get("type") != "null":
            return _value(name, option)
    kind = schema.get("type")
    if kind == "string":
        return NOTEBOOK if name == "notebook" else "x"
    return {"integer": 0, "number": 1, "boolean": False, "array": [], "object": {}}[kind]


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    """Every path below the user's folder with its size and modification time."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            seen[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return seen


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_every_tool_refuses_an_argument_it_does_not_take(kp: KernelpoolServer, mode: str) -> None:
    folder = os.path.join(kp.data_dir, "users", "alice")
    async with mcp_client(kp.url, kp.tokens["alice"], mode=mode) as c:
        r = await c.call_tool("use_notebook", {"notebook": NOTEBOOK, "mode": "create"})
        assert not r.is_error or "already exists" in text(r), text(r)
        await c.call_tool("insert_cell", {"notebook": NOTEBOOK, "cell_index": -1, "cell_type": "code", "cell_source": "1"})
        tools = (await c.list_tools()).tools
        assert len(tools) > 15
        before = _snapshot(folder)
        kernels = (await c.call_tool("list_kernels", {})).structured_content["kernels"]  # warm ones refill meanwhile
        for tool in tools:
            schema = tool.input_schema
            assert schema.get("additionalProperties") is False, tool.name
            props = schema.get("properties", {})
            args = {name: _value(name, props[name]) for name in schema.get("required", [])}
            args["kernal"] = "ir"
            r = await c.call_tool(tool.name, args)
            message = text(r)
            assert r.is_error, (tool.name, message)
            assert "'kernal'" in message and "nothing was done" in message, (tool.name, message)
            for name in props:
                assert name in message.split("takes:")[-1], (tool.name, name, message)
            # two at once, and one that looks like the wrapper's own key: named too
            r = await c.call_tool(tool.name, {**args, "_unknown_arguments": ["notebook"], "ctx": 1})
            assert r.is_error and "'_unknown_arguments'" in text(r) and "'ctx'" in text(r), (tool.name, text(r))
        assert _snapshot(folder) == before
        assert (await c.call_tool("list_kernels", {})).structured_content["kernels"] == kernels


async def test_the_issues_example_creates_nothing(kp: KernelpoolServer) -> None:
    folder = os.path.join(kp.data_dir, "users", "bob")
    async with mcp_client(kp.url, kp.tokens["bob"], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": "sh.ipynb", "mode": "create", "kernal": "bash"})
        assert r.is_error
        assert "use_notebook does not take the argument 'kernal'; nothing was done." in text(r), text(r)
        assert "notebook, mode" in text(r)
        assert not os.path.exists(os.path.join(folder, "sh.ipynb"))
        # the same call without the misspelling goes through
        r = await c.call_tool("use_notebook", {"notebook": "sh.ipynb", "mode": "create"})
        assert not r.is_error, text(r)
