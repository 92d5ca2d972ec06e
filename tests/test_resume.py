"""Resumable streams (the event store): a client whose SSE stream drops mid-call reconnects with
`Last-Event-ID` and gets what it missed and the result; the execution is not cancelled by the drop.

Driven with raw HTTP (the wire as the specification writes it), with the official TypeScript SDK
through a TCP proxy the test controls (it cuts the connection mid-call; the SDK's transport
reconnects on its own), and with the Python SDK client through the same proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import nbformat
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from testkit.server import KernelpoolServer
from tests import node_env

PROTOCOL = "2025-11-25"
SLOW = "import time\nfor i in range(6):\n    print('tick', i, flush=True)\n    time.sleep(1)\n'done'"


def _headers(token: str, session: str | None = None) -> dict[str, str]:
    h = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
         "Content-Type": "application/json"}
    if session:
        h |= {"mcp-session-id": session, "mcp-protocol-version": PROTOCOL}
    return h


async def _events(response: Any) -> AsyncIterator[dict[str, Any]]:
    """SSE events of a streaming response: {'id', 'retry', 'data'} (data parsed when JSON)."""
    event: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line == "":
            if event:
                data = event.get("data", "")
                event["data"] = json.loads(data) if data else None
                yield event
            event = {}
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data":
            event["data"] = event.get("data", "") + value
        elif key in ("id", "retry", "event"):
            event[key] = value


async def _open_session(http: httpx2.AsyncClient, url: str, token: str) -> str:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    async with http.stream("POST", url, json=init, headers=_headers(token)) as r:
        assert r.status_code == 200
        session = r.headers["mcp-session-id"]
        async for ev in _events(r):
            if ev["data"] and ev["data"].get("id") == 1:
                break
    r2 = await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=_headers(token, session))
    assert r2.status_code == 202
    return session


async def _call(http: httpx2.AsyncClient, url: str, token: str, session: str, rid: int, name: str,
                args: dict[str, Any]) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": name, "arguments": args}}
    async with http.stream("POST", url, json=body, headers=_headers(token, session)) as r:
        async for ev in _events(r):
            if ev["data"] and ev["data"].get("id") == rid:
                return ev["data"]
    raise AssertionError("no response")


def _on_disk(kp: KernelpoolServer, user: str, path: str) -> nbformat.NotebookNode:
    nb = nbformat.read(os.path.join(kp.data_dir, "users", user, path), as_version=4)
    nbformat.validate(nb)
    return nb


async def test_dropped_stream_resumes_with_last_event_id(kp: KernelpoolServer) -> None:
    token = kp.tokens["alice"]
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as http:
        session = await _open_session(http, kp.url, token)
        r = await _call(http, kp.url, token, session, 2, "use_notebook", {"notebook": "resume.ipynb", "mode": "create"})
        assert not r["result"].get("isError"), r
        body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "insert_execute_code_cell", "_meta": {"progressToken": "p3"},
            "arguments": {"notebook": "resume.ipynb", "cell_index": -1, "cell_source": SLOW}}}
        seen: list[dict[str, Any]] = []
        started = time.monotonic()
        async with http.stream("POST", kp.url, json=body, headers=_headers(token, session)) as stream:
            async for ev in _events(stream):
                seen.append(ev)
                if time.monotonic() - started > 1.5:
                    break  # leaving the block closes the connection: the stream drops mid-call
        priming = seen[0]
        assert priming["data"] is None and priming.get("id"), "the stream starts with a priming event id"
        assert int(priming["retry"]) == 2000, "and a retry hint"
        assert all(ev.get("id") for ev in seen), "every event carries an id"
        assert not any(ev["data"] and ev["data"].get("id") == 3 for ev in seen), "the result had not come yet"
        last = seen[-1]["id"]

        await asyncio.sleep(2)  # the cell goes on running while nobody listens
        async with http.stream("GET", kp.url, headers=_headers(token, session) | {"Last-Event-ID": last}) as replay:
            assert replay.status_code == 200
            resumed: list[dict[str, Any]] = []
            async for ev in _events(replay):
                resumed.append(ev)
                if ev["data"] and ev["data"].get("id") == 3:
                    break
        result = resumed[-1]["data"]["result"]
        assert result["structuredContent"]["status"] == "ok", result
        text = "".join(c["text"] for c in result["content"] if c["type"] == "text")
        assert all(f"tick {i}" in text for i in range(6)) and "'done'" in text, "not interrupted by the drop"
        progress = [ev["data"] for ev in seen + resumed if ev["data"] and ev["data"].get("method") == "notifications/progress"]
        assert len(progress) >= 3, "the progress notifications missed while away are replayed"
        ids = [ev["id"] for ev in seen + resumed if ev.get("id") and ev["data"] is not None]
        assert len(ids) == len(set(ids)), "nothing is delivered twice"

        # another session of another user cannot replay alice's events
        bob = kp.tokens["bob"]
        bob_session = await _open_session(http, kp.url, bob)
        stolen: list[dict[str, Any]] = []
        with anyio.move_on_after(5):
            async with http.stream("GET", kp.url, headers=_headers(bob, bob_session) | {"Last-Event-ID": priming["id"]}) as replay:
                async for ev in _events(replay):
                    stolen.append(ev)
        assert not [ev for ev in stolen if ev["data"] is not None], stolen
        r2 = await http.get(kp.url, headers=_headers(bob, session) | {"Last-Event-ID": priming["id"]})
        assert r2.status_code == 404, "alice's session id with bob's token is refused by the SDK"
    nb = _on_disk(kp, "alice", "resume.ipynb")
    assert nb.cells[0].outputs[-1]["data"]["text/plain"] == "'done'"


async def test_explicit_cancellation_still_interrupts(kp: KernelpoolServer) -> None:
    """notifications/cancelled (what an MCP client sends to cancel) interrupts the kernel; outputs are saved."""
    token = kp.tokens["bob"]
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as http:
        session = await _open_session(http, kp.url, token)
        await _call(http, kp.url, token, session, 2, "use_notebook", {"notebook": "cancel-raw.ipynb", "mode": "create"})
        code = "import time\nfor i in range(100):\n    print('tick', i, flush=True)\n    time.sleep(0.1)"
        body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "insert_execute_code_cell", "arguments": {"notebook": "cancel-raw.ipynb", "cell_index": -1, "cell_source": code}}}
        async with http.stream("POST", kp.url, json=body, headers=_headers(token, session)) as stream:
            async def cancel_soon() -> None:
                await asyncio.sleep(1.5)
                cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 3, "reason": "test"}}
                assert (await http.post(kp.url, json=cancel, headers=_headers(token, session))).status_code == 202

            task = asyncio.create_task(cancel_soon())
            async for ev in _events(stream):
                if ev["data"] and ev["data"].get("id") == 3:
                    break
            await task
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        nb = _on_disk(kp, "bob", "cancel-raw.ipynb")
        if nb.cells[0].outputs:
            break
        await asyncio.sleep(0.2)
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    assert "tick 0" in text and "tick 99" not in text, "the kernel was interrupted, and what it printed is saved"


# ---- through a TCP proxy the test controls ----------------------------------------------------

class CuttingProxy:
    """Forwards 127.0.0.1:port to the server; `cut()` closes every connection open at that moment."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.cuts = 0

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self) -> None:
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()
        self.cuts += 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._conns |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._conns -= {writer, up_writer}


async def _cut_after(proxy: CuttingProxy, after: float) -> None:
    await asyncio.sleep(after)
    proxy.cut()


@pytest.mark.skipif(node_env.missing() is not None, reason=f"Node tests: {node_env.missing()}")
async def test_typescript_client_reconnects_and_gets_the_result(kp: KernelpoolServer) -> None:
    node_env.ensure_installed()
    async with CuttingProxy(kp.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/mcp"
        proc = await asyncio.create_subprocess_exec(
            "node", "resume.mjs", url, kp.tokens["alice"], "ts/resume.ipynb", SLOW,
            cwd=node_env.NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert json.loads(line) == {"calling": True}, line
        await asyncio.sleep(2)
        proxy.cut()  # mid-call: ticks 0-1 printed, four seconds to go
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out)
    assert report["execute"]["isError"] is False
    assert report["execute"]["structuredContent"]["status"] == "ok", report
    text = "".join(report["execute"]["text"])
    assert all(f"tick {i}" in text for i in range(6)) and "'done'" in text
    assert report["progress"] >= 3, "progress notifications before and after the cut reached the client"
    assert proxy.cuts >= 1
    nb = _on_disk(kp, "alice", "ts/resume.ipynb")
    assert nb.cells[0].outputs[-1]["data"]["text/plain"] == "'done'"


async def test_python_client_reconnects_and_gets_the_result(kp: KernelpoolServer) -> None:
    async with CuttingProxy(kp.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/mcp"
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {kp.tokens['bob']}"}, timeout=httpx2.Timeout(30, read=120))
        reported: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            reported.append(progress)

        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as c:
            await c.call_tool("use_notebook", {"notebook": "py-resume.ipynb", "mode": "create"})
            cutter = asyncio.create_task(_cut_after(proxy, 2))
            r = await c.call_tool("insert_execute_code_cell", {"notebook": "py-resume.ipynb", "cell_index": -1,
                                                               "cell_source": SLOW}, progress_callback=on_progress)
            await cutter
            assert proxy.cuts == 1
            assert r.structured_content["status"] == "ok", r
            text = "".join(b.text for b in r.content if b.type == "text")
            assert all(f"tick {i}" in text for i in range(6)) and "'done'" in text
            assert len(reported) >= 3
