"""Real MCP clients for a kernelpool server (the SDK's streamable HTTP client), and a few
shortcuts over them. Used by the end-to-end tests, the benchmarks and scripts/conformance.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from testkit.server import KernelpoolServer


@contextlib.asynccontextmanager
async def mcp_client(url: str, token: str | None, mode: str = "legacy") -> AsyncIterator[Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        yield client


def text(result: Any) -> str:
    """The text blocks of a tool result, joined."""
    return "".join(c.text for c in result.content if c.type == "text")


async def run_code(server: KernelpoolServer, user: str, notebook: str, code: str) -> str:
    """Run `code` in `user`'s kernel for `notebook` (created if new); its output, stripped."""
    async with mcp_client(server.url, server.tokens[user], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": notebook, "mode": "create"})
        if r.is_error and "already exists" not in text(r):
            raise AssertionError(text(r))
        r = await c.call_tool("execute_code", {"notebook": notebook, "code": code})
        assert not r.is_error, text(r)
        return text(r).strip()


async def run_json(server: KernelpoolServer, user: str, code: str, notebook: str) -> Any:
    """`run_code` for code that prints one JSON line last: that line, parsed."""
    return json.loads((await run_code(server, user, notebook, code)).splitlines()[-1])

