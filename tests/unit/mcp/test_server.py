"""The tool layer in-process: the MCP server `build_mcp` makes, over the server's own services, called
through the SDK's `MCPServer.call_tool` (the argument checks it makes from each tool's signature,
then `kernelpool.mcp.server._run`: who calls, the one mapping of errors to tool errors, the audit
row, the metric). The HTTP transport around it is what tests/test_e2e.py drives; here the request
is a Starlette `Request` made from an ASGI scope, carrying the headers a client would send."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult
from starlette.requests import Request

from kernelpool.config import Settings
from kernelpool.executions.jobs import JobService
from kernelpool.executions.service import ExecutionService
from kernelpool.mcp.auth import StoreTokenVerifier
from kernelpool.mcp.notices import Notices
from kernelpool.mcp.server import build_mcp
from kernelpool.mcp.services import Services
from kernelpool.metrics import Metrics
from kernelpool.notebooks.files import FileService
from kernelpool.notebooks.filework import FileWork
from kernelpool.notebooks.quota import DiskQuota
from kernelpool.notebooks.service import NotebookService
from kernelpool.notebooks.workspace import Workspace
from kernelpool.store import Store
from kernelpool.users.accounts import UserService
from kernelpool.users.sessions import SessionContexts
from kernelpool.users.tokens import create_token
from sandbox import SafeRoot
from tests.unit.fakes import registry_with_fake_launcher


@dataclass
class Tools:
    server: MCPServer
    services: Services
    tokens: dict[str, str]  # user -> a bearer token of theirs
    live: set[str]  # the MCP session ids the SDK holds open

    async def call(self, user: str | None, name: str, arguments: dict[str, Any], session: str | None = None) -> CallToolResult:
        """`name` as the SDK's transport calls it for a request with `user`'s token (None: none)."""
        access = await StoreTokenVerifier(self.services.store).verify_token(self.tokens[user]) if user else None
        headers = [(b"mcp-session-id", session.encode())] if session else []
        request = Request({"type": "http", "method": "POST", "path": "/mcp", "headers": headers})
        ctx: Context = Context(mcp_server=self.server, request_context=ServerRequestContext(
            session=None, lifespan_context=None, protocol_version="2025-11-25", method="tools/call",  # type: ignore[arg-type]
            request_id=1, request=request))
        auth = auth_context_var.set(AuthenticatedUser(access) if access is not None else None)
        try:
            result = await self.server.call_tool(name, arguments, ctx)
        finally:
            auth_context_var.reset(auth)
        assert isinstance(result, CallToolResult)
        return result

    def open_session(self, user: str, session: str) -> None:
        """What the session gate does when the SDK opens a session for `user` (kernelpool.mcp.guards)."""
        self.services.sessions.reserve(user)
        self.services.sessions.opened(user, session)
        self.live.add(session)

    async def audit(self, user: str) -> list[tuple[str, str, str | None]]:
        await self.services.store.flush_audit()
        return [(row["tool"], row["outcome"], row["detail"]) for row in await self.services.store.read_audit(user=user)]

    def calls(self, tool: str, outcome: str) -> float:
        return self.services.metrics.registry.get_sample_value(
            "kernelpool_tool_calls_total", {"tool": tool, "outcome": outcome}) or 0.0


def roots_of(users: UserService) -> Callable[[str], SafeRoot]:
    def root(user: str) -> SafeRoot:
        if user == "bob":  # a bug deep in a service, as the wrapper meets one: an exception it does not know
            raise RuntimeError("the disk is on fire")
        return SafeRoot(users.folder(user))

    return root


@pytest.fixture
async def tools(make_settings: Callable[..., Settings], store: Store, users: UserService) -> AsyncIterator[Tools]:
    settings = make_settings(pool_size=0)
    metrics = Metrics()
    files = FileWork()
    live: set[str] = set()
    notebooks = NotebookService(roots_of(users), files, settings.max_notebook_bytes)
    quota = DiskQuota(roots_of(users), settings.user_disk_quota_bytes)
    kernels, _ = registry_with_fake_launcher(settings, store, users, metrics=metrics)
    sessions = SessionContexts(settings.session_idle_timeout, settings.max_sessions_per_user, live=lambda: live)
    jobs = JobService(settings, kernels, notebooks, users, metrics)
    services = Services(
        settings=settings, store=store, users=users, notebooks=notebooks,
        files=FileService(roots_of(users), files, notebooks, quota, settings.max_file_bytes),
        workspace=Workspace(notebooks, kernels, users, sessions), kernels=kernels, jobs=jobs,
        executions=ExecutionService(settings, jobs, notebooks), sessions=sessions, metrics=metrics,
        notices=Notices(settings.session_idle_timeout), events=None)
    tokens = {user: (await create_token(store, user))[1] for user in ("alice", "bob")}
    try:
        yield Tools(build_mcp(services, None, None), services, tokens, live)
    finally:
        await jobs.close()
        await kernels.close()
        await files.aclose()


async def test_each_tool_lists_the_arguments_of_its_function(tools: Tools) -> None:
    listed = {tool.name: tool.input_schema for tool in await tools.server.list_tools()}
    assert {"use_notebook", "insert_cell", "read_cell", "execute_code", "get_execution", "list_kernels"} <= set(listed)
    for schema in listed.values():
        assert not {"ctx", "call"} & set(schema.get("properties", {})), "the call's context is not an argument"
    insert = listed["insert_cell"]
    assert set(insert["required"]) == {"cell_index", "cell_type", "cell_source"}
    assert set(insert["properties"]) == {"cell_index", "cell_type", "cell_source", "notebook"}
    assert insert["properties"]["cell_type"]["enum"] == ["code", "markdown", "raw"]
    assert listed["use_notebook"]["properties"]["mode"]["enum"] == ["connect", "create"]
    assert listed["get_execution"]["required"] == ["execution_id"]


@pytest.mark.parametrize("arguments, words", [
    ({"cell_index": 0, "cell_type": "python", "cell_source": "x"}, "cell_type"),
    ({"cell_index": "first", "cell_type": "code", "cell_source": "x"}, "cell_index"),
    ({"cell_index": 0, "cell_type": "code"}, "cell_source"),
])
async def test_arguments_that_do_not_fit_the_signature_are_refused_before_the_tool_runs(
        tools: Tools, arguments: dict[str, Any], words: str) -> None:
    await tools.call("alice", "use_notebook", {"notebook": "n.ipynb", "mode": "create"})
    before = await tools.services.notebooks.load("alice", "n.ipynb")
    with pytest.raises(ToolError, match=words):
        await tools.call("alice", "insert_cell", {"notebook": "n.ipynb", **arguments})
    assert (await tools.services.notebooks.load("alice", "n.ipynb")).cells == before.cells == []


async def test_a_call_is_audited_and_counted(tools: Tools) -> None:
    created = await tools.call("alice", "use_notebook", {"notebook": "n.ipynb", "mode": "create"})
    assert not created.is_error and created.structured_content is not None
    assert created.structured_content["notebook"] == "n.ipynb" and created.structured_content["active"] is False
    inserted = await tools.call("alice", "insert_cell", {"notebook": "n.ipynb", "cell_index": -1, "cell_type": "code",
                                                          "cell_source": "1 + 1"})
    assert inserted.structured_content is not None and inserted.structured_content["cell_index"] == 0
    assert await tools.audit("alice") == [("use_notebook", "ok", None), ("insert_cell", "ok", None)]
    assert tools.calls("insert_cell", "ok") == 1


async def test_our_errors_become_tool_errors_with_their_words(tools: Tools) -> None:
    with pytest.raises(ToolError) as refused:
        await tools.call("alice", "read_notebook", {"notebook": "../bob/n.ipynb"})
    words = "path refused: '../bob/n.ipynb': '..' is not allowed"
    assert str(refused.value) == f"Error executing tool read_notebook: {words}"  # as the client reads it
    with pytest.raises(ToolError, match="notebook not found: 'missing.ipynb'"):
        await tools.call("alice", "read_cell", {"notebook": "missing.ipynb", "cell_index": 0})
    audit = await tools.audit("alice")
    assert audit[0] == ("read_notebook", "refused", words) and audit[1][:2] == ("read_cell", "refused")
    assert tools.calls("read_notebook", "refused") == 1


async def test_an_unexpected_exception_is_a_tool_error_that_names_it(tools: Tools) -> None:
    with pytest.raises(ToolError, match="internal error in list_notebooks: RuntimeError: the disk is on fire"):
        await tools.call("bob", "list_notebooks", {})
    assert await tools.audit("bob") == [("list_notebooks", "failed", "RuntimeError: the disk is on fire")]
    assert tools.calls("list_notebooks", "failed") == 1


async def test_a_call_without_a_token_is_refused(tools: Tools) -> None:
    with pytest.raises(ToolError, match="not authenticated"):
        await tools.call(None, "list_notebooks", {})


async def test_the_active_notebook_is_the_sessions_own(tools: Tools) -> None:
    with pytest.raises(ToolError, match="no notebook given: pass `notebook`"):
        await tools.call("alice", "read_notebook", {}, session="s1")  # no active notebook yet
    tools.open_session("alice", "s1")
    opened = await tools.call("alice", "use_notebook", {"notebook": "work/a.ipynb", "mode": "create"}, session="s1")
    assert opened.structured_content is not None and opened.structured_content["active"] is True
    added = await tools.call("alice", "insert_cell", {"cell_index": -1, "cell_type": "markdown", "cell_source": "# a"},
                             session="s1")
    assert added.structured_content is not None and added.structured_content["notebook"] == "work/a.ipynb"
    with pytest.raises(ToolError, match="no notebook given"):
        await tools.call("bob", "read_notebook", {}, session="s1")  # alice's session id, bob's token
    with pytest.raises(ToolError, match="no notebook given"):
        await tools.call("alice", "read_notebook", {}, session="made-up")
    read = await tools.call("alice", "read_notebook", {}, session="s1")
    assert read.structured_content is not None and read.structured_content["total_cells"] == 1
