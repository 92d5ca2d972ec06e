"""Notebooks and outputs as MCP resources, completion, subscriptions and the logging capability,
against a real server with the real Python client (protocol 2025-11-25: sessions)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.types import LoggingMessageNotificationParams, ResourceTemplateReference, TextResourceContents

from testkit.server import KernelpoolServer
from tests.conftest import METRICS_TOKEN
from tests.test_resume import _events, _headers, _open_session


async def _call_raw(http: httpx2.AsyncClient, url: str, token: str, session: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.stream("POST", url, json=body, headers=_headers(token, session)) as r:
        async for ev in _events(r):
            if ev["data"] and ev["data"].get("id") == body["id"]:
                return ev["data"]
    raise AssertionError("no response")

# logging/setLevel and resources/subscribe are deprecated in protocol 2026-07-28 (the client warns),
# but current in 2025-11-25, which today's clients negotiate
pytestmark = pytest.mark.filterwarnings("ignore::mcp.MCPDeprecationWarning")


class Heard:
    """What one client was told on its own: log messages and resource updates."""

    def __init__(self) -> None:
        self.logs: list[LoggingMessageNotificationParams] = []
        self.updated: list[str] = []

    async def log(self, params: LoggingMessageNotificationParams) -> None:
        self.logs.append(params)

    async def message(self, message: Any) -> None:
        if getattr(message, "method", None) == "notifications/resources/updated":
            self.updated.append(message.params.uri)

    def texts(self) -> list[str]:
        return [str(p.data.get("message") if isinstance(p.data, dict) else p.data) for p in self.logs]

    async def wait_for(self, what: str, seconds: float = 15) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [t for t in self.texts() if what in t]
            if found:
                return found
            await asyncio.sleep(0.1)
        raise AssertionError(f"never heard {what!r}; heard {self.texts()}")


@contextlib.asynccontextmanager
async def client(kp: KernelpoolServer, user: str, heard: Heard | None = None) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {kp.tokens[user]}"}, timeout=httpx2.Timeout(30, read=300))
    extra: dict[str, Any] = {}
    if heard is not None:
        extra = {"logging_callback": heard.log, "message_handler": heard.message}
    async with http, Client(streamable_http_client(kp.url, http_client=http), mode="legacy", **extra) as c:
        yield c


def text_of(result: Any) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


async def test_capabilities_are_declared(kp: KernelpoolServer) -> None:
    async with client(kp, "alice") as c:
        caps = c.session.initialize_result.capabilities  # type: ignore[union-attr]
        assert caps.logging is not None and caps.completions is not None
        assert caps.resources is not None and caps.resources.subscribe is True


async def test_notebooks_are_listed_read_and_completed_per_user(kp: KernelpoolServer) -> None:
    async with client(kp, "alice") as c:
        await c.call_tool("use_notebook", {"notebook": "res/one.ipynb", "mode": "create"})
        await c.call_tool("use_notebook", {"notebook": "res/two words.ipynb", "mode": "create"})
        await c.call_tool("insert_cell", {"notebook": "res/one.ipynb", "cell_index": -1, "cell_type": "markdown",
                                          "cell_source": "# Title"})
        await c.call_tool("insert_execute_code_cell", {"notebook": "res/one.ipynb", "cell_index": -1,
                                                       "cell_source": "print('hello'); 6*7"})
        listed = {r.uri: r for r in (await c.list_resources()).resources}
        assert {"notebook://res/one.ipynb", "notebook://res/two%20words.ipynb"} <= set(listed)
        assert listed["notebook://res/one.ipynb"].mime_type == "application/x-ipynb+json"
        templates = {t.uri_template for t in (await c.list_resource_templates()).resource_templates}
        assert {"notebook://{path}{?format}", "file://{path}{?offset}",
                "output://{notebook}/{cell_id}/{index}{?offset}"} == templates

        read = await c.read_resource("notebook://res/one.ipynb")
        content = read.contents[0]
        assert content.mime_type == "application/x-ipynb+json"
        nb = json.loads(content.text)  # type: ignore[union-attr]
        assert ["".join(cell["source"]) for cell in nb["cells"]] == ["# Title", "print('hello'); 6*7"]
        md = (await c.read_resource("notebook://res/one.ipynb?format=markdown")).contents[0]
        assert md.mime_type == "text/markdown"
        assert "# Title" in md.text and "```python" in md.text and "> hello" in md.text and "> 42" in md.text  # type: ignore[union-attr]
        assert (await c.read_resource("notebook://res/two%20words.ipynb")).contents[0].mime_type == "application/x-ipynb+json"

        done = await c.complete(ResourceTemplateReference(uri="notebook://{path}{?format}"), {"name": "path", "value": "res/t"})
        assert done.completion.values == ["res/two words.ipynb"]
        done = await c.complete(ResourceTemplateReference(uri="output://{notebook}/{cell_id}/{index}{?offset}"),
                                {"name": "notebook", "value": "res/o"})
        assert done.completion.values == ["res/one.ipynb"]
        cell_id = nb["cells"][1]["id"]
        done = await c.complete(ResourceTemplateReference(uri="output://{notebook}/{cell_id}/{index}{?offset}"),
                                {"name": "cell_id", "value": ""}, {"notebook": "res/one.ipynb"})
        assert done.completion.values == [cell_id]

        for bad in ("notebook://res/missing.ipynb", "notebook://../bob/x.ipynb", "notebook:///etc/passwd",
                    "file:///etc/passwd", "notebook://res/one.ipynb?format=html"):
            with pytest.raises(MCPError) as err:
                await c.read_resource(bad)
            assert "not found" in str(err.value) or "invalid format" in str(err.value), (bad, err.value)

    # bob: none of alice's notebooks, by listing, reading, completing or subscribing
    async with client(kp, "bob") as b:
        uris = {r.uri for r in (await b.list_resources()).resources}
        assert not any("res/" in u for u in uris), uris
        for uri in ("notebook://res/one.ipynb", f"output://res/one.ipynb/{cell_id}/0",
                    "notebook://../alice/res/one.ipynb", "notebook://%2E%2E/alice/res/one.ipynb"):
            with pytest.raises(MCPError) as err:
                await b.read_resource(uri)
            assert "not found" in str(err.value), (uri, err.value)
        with pytest.raises(MCPError, match="not found"):
            await b.subscribe_resource("notebook://res/one.ipynb")
        done = await b.complete(ResourceTemplateReference(uri="notebook://{path}{?format}"), {"name": "path", "value": "res"})
        assert done.completion.values == []


async def test_large_outputs_are_links_read_in_pages(kp: KernelpoolServer) -> None:
    async with client(kp, "alice") as c:
        await c.call_tool("use_notebook", {"notebook": "big.ipynb", "mode": "create"})
        code = "print(''.join(f'{i:06d}' for i in range(10000)))"
        r = await c.call_tool("insert_execute_code_cell", {"notebook": "big.ipynb", "cell_index": -1, "cell_source": code})
        links = [b for b in r.content if b.type == "resource_link"]
        assert len(links) == 1 and links[0].uri.startswith("output://big.ipynb/"), r.content
        whole, pages = "", 0
        uri: str | None = links[0].uri
        while uri is not None:
            page = (await c.read_resource(uri)).contents[0]
            assert isinstance(page, TextResourceContents), page
            whole += page.text
            uri = page.meta["next"] if page.meta else None
            pages += 1
        assert whole == "".join(f"{i:06d}" for i in range(10000)) + "\n"
        assert pages == 4, "60001 characters in pages of max_output_chars (20000)"

        big = f"import base64, os\ndisplay({{'image/png': base64.b64encode(os.urandom({3 * 2**20})).decode()}}, raw=True)"
        r = await c.call_tool("insert_execute_code_cell", {"notebook": "big.ipynb", "cell_index": -1, "cell_source": big})
        links = [b for b in r.content if b.type == "resource_link"]
        assert len(links) == 1 and links[0].mime_type == "image/png"
        # over the Python client's 1 MiB limit for one SSE event: read it with raw HTTP
        async with httpx2.AsyncClient(timeout=60) as http:
            session = await _open_session(http, kp.url, kp.tokens["alice"])
            body = {"jsonrpc": "2.0", "id": 9, "method": "resources/read", "params": {"uri": links[0].uri}}
            read = await _call_raw(http, kp.url, kp.tokens["alice"], session, body)
        blob = read["result"]["contents"][0]
        assert blob["mimeType"] == "image/png" and len(base64.b64decode(blob["blob"])) == 3 * 2**20
        small = await c.call_tool("insert_execute_code_cell", {"notebook": "big.ipynb", "cell_index": -1, "cell_source": "1+1"})
        assert not [b for b in small.content if b.type == "resource_link"]
    async with client(kp, "bob") as b:
        with pytest.raises(MCPError, match="not found"):
            await b.read_resource(links[0].uri)


async def test_subscribers_hear_of_changes_to_their_notebook_only(kp: KernelpoolServer) -> None:
    alice_heard, bob_heard = Heard(), Heard()
    async with client(kp, "alice", alice_heard) as watcher, client(kp, "alice") as editor, \
            client(kp, "bob", bob_heard) as bob:
        await editor.call_tool("use_notebook", {"notebook": "watched.ipynb", "mode": "create"})
        await editor.call_tool("use_notebook", {"notebook": "other.ipynb", "mode": "create"})
        await bob.call_tool("use_notebook", {"notebook": "watched.ipynb", "mode": "create"})
        await watcher.subscribe_resource("notebook://watched.ipynb")
        await bob.subscribe_resource("notebook://watched.ipynb")  # bob's own notebook of the same name
        await editor.call_tool("insert_cell", {"notebook": "other.ipynb", "cell_index": -1, "cell_type": "code", "cell_source": "0"})
        await editor.call_tool("insert_execute_code_cell", {"notebook": "watched.ipynb", "cell_index": -1, "cell_source": "1"})
        await _heard(alice_heard, 1)
        await asyncio.sleep(0.5)
        assert alice_heard.updated == ["notebook://watched.ipynb"], "a quick cell is saved once, with its outputs"
        await editor.call_tool("insert_execute_code_cell", {"notebook": "watched.ipynb", "cell_index": -1,
                                                            "cell_source": "import time; time.sleep(1)"})
        await _heard(alice_heard, 3)
        assert alice_heard.updated[:3] == ["notebook://watched.ipynb"] * 3, "a slow cell is saved, then its outputs"
        assert bob_heard.updated == [], "alice's edits never reach bob, whatever his notebook is called"
        await watcher.unsubscribe_resource("notebook://watched.ipynb")
        before = len(alice_heard.updated)
        await editor.call_tool("insert_cell", {"notebook": "watched.ipynb", "cell_index": -1, "cell_type": "code", "cell_source": "2"})
        await asyncio.sleep(1)
        assert len(alice_heard.updated) == before


async def _heard(heard: Heard, updates: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(heard.updated) < updates:
        await asyncio.sleep(0.1)


async def test_log_messages_go_to_their_user_at_the_level_asked(kp: KernelpoolServer) -> None:
    alice_heard, bob_heard = Heard(), Heard()
    async with client(kp, "alice", alice_heard) as c, client(kp, "bob", bob_heard) as b:
        await c.set_logging_level("debug")
        await b.set_logging_level("debug")
        await c.call_tool("use_notebook", {"notebook": "logs.ipynb", "mode": "create"})
        await b.call_tool("use_notebook", {"notebook": "logs.ipynb", "mode": "create"})
        r = await c.call_tool("execute_code", {"notebook": "logs.ipynb", "code": "import time; time.sleep(5)", "timeout": 1})
        assert r.structured_content["status"] == "timeout"
        await alice_heard.wait_for("hit its timeout")
        await c.call_tool("execute_code", {"notebook": "logs.ipynb", "code": "print('x' * 30000)"})
        await alice_heard.wait_for("truncated")
        r = await c.call_tool("execute_code", {"notebook": "logs.ipynb", "code": "import os; os._exit(3)"})
        assert r.structured_content["status"] == "died"
        died = await alice_heard.wait_for("died")
        assert "exited with code 3" in died[0]
        await c.call_tool("restart_notebook", {"notebook": "logs.ipynb"})
        await alice_heard.wait_for("was restarted")
        assert all(p.logger == "kernelpool" for p in alice_heard.logs)

        await c.set_logging_level("error")
        count = len(alice_heard.logs)
        await c.call_tool("execute_code", {"notebook": "logs.ipynb", "code": "import time; time.sleep(5)", "timeout": 1})
        await asyncio.sleep(0.5)
        assert len(alice_heard.logs) == count, "a warning is below the level this session asked for"
        await b.call_tool("execute_code", {"notebook": "logs.ipynb", "code": "1"})
    assert bob_heard.logs == [], f"bob heard alice's events: {bob_heard.texts()}"


async def test_near_a_limit_and_shutdown_are_announced(fresh_server: KernelpoolServer, server_args: list[str]) -> None:
    kp = fresh_server
    kp.env |= {"KERNELPOOL_MAX_KERNELS_PER_USER": "2", "KERNELPOOL_POOL_SIZE": "0", "KERNELPOOL_RESUME_BYTES_PER_USER": "64K",
               "KERNELPOOL_METRICS_TOKEN": METRICS_TOKEN}
    kp.add_user("lee")
    kp.add_user("max")
    kp.start(*server_args)
    lee_heard, max_heard = Heard(), Heard()
    async with client(kp, "lee", lee_heard) as c, client(kp, "max", max_heard) as m:
        await m.set_logging_level("info")
        await c.call_tool("use_notebook", {"notebook": "a.ipynb", "mode": "create"})
        assert not [t for t in lee_heard.texts() if "near a limit" in t]
        await c.call_tool("use_notebook", {"notebook": "b.ipynb", "mode": "create"})
        near = await lee_heard.wait_for("near a limit")
        assert "kernels at 2 of 2" in near[0]
        for _ in range(3):  # 20000 characters a reply: the events kept for lee pass 80% of 64 KiB
            await c.call_tool("execute_code", {"notebook": "a.ipynb", "code": "print('y' * 30000)"})
        near = await lee_heard.wait_for("bytes kept for stream resumption")
        assert "of 65536" in near[0]
        metrics = httpx2.get(f"{kp.base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        assert "kernelpool_resume_events " in metrics
        await asyncio.sleep(0.5)  # both clients' standalone GET streams are open by now
        stopper = asyncio.get_running_loop().run_in_executor(None, kp.stop, signal.SIGTERM)
        await lee_heard.wait_for("shutting down")
        await max_heard.wait_for("shutting down")
        assert not [t for t in max_heard.texts() if "near a limit" in t]
        await stopper


async def test_sessionless_clients_hear_about_their_call_when_they_opt_in(kp: KernelpoolServer) -> None:
    """Protocol 2026-07-28 has no logging/setLevel: a request opts in with `_meta` (the client's `log_level`)."""
    heard = Heard()
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {kp.tokens['bob']}"}, timeout=httpx2.Timeout(30, read=300))
    async with http, Client(streamable_http_client(kp.url, http_client=http), mode="auto",
                            logging_callback=heard.log, log_level="warning") as c:
        await c.call_tool("use_notebook", {"notebook": "modern-logs.ipynb", "mode": "create"})
        r = await c.call_tool("execute_code", {"notebook": "modern-logs.ipynb", "code": "import time; time.sleep(5)",
                                               "timeout": 1})
        assert r.structured_content["status"] == "timeout"
        await heard.wait_for("hit its timeout")
