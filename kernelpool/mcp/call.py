"""What every tool gets and gives back: the call (who, from which MCP session, the services),
the shape of a result, the annotations, and the list a tool module registers its tools in.

Callers: the tool modules (`notebooks`, `cells`, `execution`, `kernels`) and `server`, which
builds the `Call` for each request once it knows who is calling.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, TextContent, ToolAnnotations

from kernelpool.errors import NoNotebook
from kernelpool.mcp.services import Services
from kernelpool.notebooks.paths import check_notebook_path

READ = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
EDIT = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
RUN = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True)


@dataclass(frozen=True)
class Call:
    """One tool call: the authenticated user, the request's context, the server's services."""

    services: Services
    user: str
    ctx: Context

    @property
    def session_id(self) -> str | None:
        headers = self.ctx.headers
        return headers.get("mcp-session-id") if headers else None

    def notebook(self, given: str | None) -> str:
        """The notebook a tool works on: `given` (checked), else the session's active notebook.
        Never a shared fallback: without either the call fails (`NoNotebook`)."""
        if given is not None:
            return check_notebook_path(given)
        active = self.services.sessions.active_notebook(self.user, self.session_id)
        if active is None:
            raise NoNotebook()
        return active


ToolFunction = Callable[..., Awaitable[CallToolResult]]


@dataclass(frozen=True)
class Tool:
    fn: ToolFunction  # (call, **arguments); its keyword-only parameters after `call` are the tool's arguments
    name: str
    description: str
    annotations: ToolAnnotations

    @property
    def arguments(self) -> list[str]:
        """The names of the tool's arguments, in order."""
        return list(inspect.signature(self.fn).parameters)[1:]


class Tools(list[Tool]):
    """A tool module's tools, in the order clients list them."""

    def add(self, name: str, description: str, annotations: ToolAnnotations) -> Callable[[ToolFunction], ToolFunction]:
        def register(fn: ToolFunction) -> ToolFunction:
            self.append(Tool(fn, name, description, annotations))
            return fn

        return register


def result(text: str, data: dict[str, Any], extra: list[Any] | None = None) -> CallToolResult:
    content: list[Any] = [TextContent(type="text", text=text)]
    content.extend(extra or [])
    return CallToolResult(content=content, structured_content=data)
