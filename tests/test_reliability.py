"""Faults, long runs, big output, restarts: provoked for real against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import anyio
import httpx2
import nbformat
import psutil
import pytest

from testkit.client import mcp_client
from testkit.server import KernelpoolServer
from tests.conftest import SANDBOX_SKIP


def texts(result) -> list[str]:
    return [c.text for c in result.content if c.type == "text"]


def on_disk(kp: KernelpoolServer, user: str, path: str) -> nbformat.NotebookNode:
    nb = nbformat.read(os.path.join(kp.data_dir, "users", user, path), as_version=4)
    nbformat.validate(nb)
    return nb


@pytest.mark.parametrize("how, cause", [
    ("import os; os._exit(3)", "exited with code 3"),
    ("import ctypes; ctypes.string_at(0)", "SIGSEGV"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
])
async def test_kernel_dying_mid_cell(kp: KernelpoolServer, how: str, cause: str) -> None:
    nbp = f"die-{abs(hash(how)) % 1000}.ipynb"
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": nbp, "mode": "create"})
        await c.call_tool("execute_code", {"notebook": nbp, "code": "x = 1"})
        r = await c.call_tool("insert_execute_code_cell", {
            "notebook": nbp, "cell_index": -1, "cell_source": f"print('before', flush=True)\nimport time; time.sleep(0.3)\n{how}"})
        assert r.is_error and r.structured_content["status"] == "died"
        assert cause in r.structured_content["message"], r.structured_content
        assert "before\n" in texts(r), "outputs seen before the death are kept"
        r = await c.call_tool("execute_code", {"notebook": nbp, "code": "'x' in dir()"})
        assert texts(r) == ["False"], "the next call gets a fresh kernel"
    nb = on_disk(kp, "alice", nbp)
    assert nb.cells[0].outputs[0].text == "before\n"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_cancelled_request_interrupts_and_saves(kp: KernelpoolServer, mode: str) -> None:
    """An MCP cancellation interrupts the kernel, and what the cell printed is saved. The Python client,
    when the caller gives up, sends `notifications/cancelled` on a session (legacy); in the sessionless
    2026-07-28 protocol, closing the response stream is the cancellation (it has no resumption). A
    stream that merely drops on a session is no cancellation: the execution goes on and the client
    resumes it from the event store (tests/test_resume.py)."""
    nbp = f"cancel-{mode}.ipynb"
    async with mcp_client(kp.url, kp.tokens["bob"], mode=mode) as c:
        await c.call_tool("use_notebook", {"notebook": nbp, "mode": "create"})
        code = "import time\nfor i in range(100):\n    print('tick', i, flush=True)\n    time.sleep(0.1)"
        with anyio.move_on_after(1.5):
            await c.call_tool("insert_execute_code_cell", {"notebook": nbp, "cell_index": -1, "cell_source": code})
            pytest.fail("the call should have been cancelled")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        nb = on_disk(kp, "bob", nbp)
        if nb.cells[0].outputs:
            break
        await asyncio.sleep(0.2)
    outputs = nb.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "tick 0" in text, outputs
    assert "tick 99" not in text, "the kernel was interrupted, not left to run"
    async with mcp_client(kp.url, kp.tokens["bob"], mode="auto") as c:
        r = await c.call_tool("execute_code", {"notebook": nbp, "code": "'still here'"})
        assert texts(r) == ["'still here'"]


async def test_background_execution_and_cancel(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "bg.ipynb", "mode": "create"})
        r = await c.call_tool("insert_execute_code_cell", {
            "notebook": "bg.ipynb", "cell_index": -1, "cell_source": "import time; time.sleep(2); 'slow result'",
            "background": True})
        sc = r.structured_content
        assert sc["status"] == "running"
        job = sc["execution_id"]
    # a new connection comes back for the result
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        r = await c.call_tool("get_execution", {"execution_id": job})
        assert r.structured_content["status"] in ("running", "ok")
        r = await c.call_tool("get_execution", {"execution_id": job, "wait": 30})
        assert r.structured_content["status"] == "ok" and texts(r) == ["'slow result'"]
        assert r.structured_content["saved"] is True
        r = await c.call_tool("execute_code", {"notebook": "bg.ipynb", "code": "import time; time.sleep(60)", "background": True})
        job2 = r.structured_content["execution_id"]
        await asyncio.sleep(1)
        r = await c.call_tool("cancel_execution", {"execution_id": job2})
        assert r.structured_content["interrupted"] is True
        r = await c.call_tool("get_execution", {"execution_id": job2, "wait": 20})
        assert r.structured_content["status"] == "interrupted"
    async with mcp_client(kp.url, kp.tokens["bob"], mode="auto") as b:
        r = await b.call_tool("get_execution", {"execution_id": job})
        assert r.is_error, "another user's execution is not found"
    nb = on_disk(kp, "alice", "bg.ipynb")
    assert nb.cells[0].outputs[0].data["text/plain"] == "'slow result'"


async def test_huge_output_is_bounded(kp: KernelpoolServer) -> None:
    server = psutil.Process(kp.pid)
    rss_before = server.memory_info().rss
    code = "import sys\nline = 'y' * 999 + '\\n'\nfor i in range(200_000):\n    sys.stdout.write(line)\nprint('THE END')"
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "huge.ipynb", "mode": "create"})
        r = await c.call_tool("insert_execute_code_cell", {"notebook": "huge.ipynb", "cell_index": -1, "cell_source": code,
                                                           "timeout": 120})
        shown = "".join(texts(r))
        assert len(shown) < 25_000 and "characters cut" in shown and shown.rstrip().endswith("THE END")
        big = "import base64, os\ndisplay({'image/png': base64.b64encode(os.urandom(%d)).decode()}, raw=True)"
        r = await c.call_tool("insert_execute_code_cell", {"notebook": "huge.ipynb", "cell_index": -1,
                                                           "cell_source": big % (3 * 2**20)})
        assert not [b for b in r.content if b.type == "image"], "over the inline limit: referenced, not inlined"
        assert "not inlined" in texts(r)[0]
        r = await c.call_tool("insert_execute_code_cell", {"notebook": "huge.ipynb", "cell_index": -1,
                                                           "cell_source": big % (12 * 2**20)})
        assert "not inlined" in texts(r)[0] or "dropped" in texts(r)[0]
    rss_growth = server.memory_info().rss - rss_before
    assert rss_growth < 250 * 2**20, f"server grew by {rss_growth / 2**20:.0f} MiB for 200 MB of output"
    nb = on_disk(kp, "alice", "huge.ipynb")
    text = nb.cells[0].outputs[0].text
    assert len(text) < 2_100_000 and "characters of output dropped" in text and text.endswith("THE END\n")
    assert "image/png" in nb.cells[1].outputs[0].data, "a 3 MiB image is kept in the notebook"
    assert "image/png" not in nb.cells[2].outputs[0].data and "dropped" in nb.cells[2].outputs[0].data["text/plain"]
    assert os.path.getsize(os.path.join(kp.data_dir, "users", "alice", "huge.ipynb")) < 10 * 2**20


async def test_read_cell_pages_through_long_output(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["bob"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "page.ipynb", "mode": "create"})
        await c.call_tool("insert_execute_code_cell", {"notebook": "page.ipynb", "cell_index": -1,
                                                       "cell_source": "print(''.join(f'{i:05d}' for i in range(10000)))"})
        collected, offset = "", 0
        while offset is not None:
            r = await c.call_tool("read_cell", {"notebook": "page.ipynb", "cell_index": 0, "output_offset": offset,
                                                "max_chars": 7000})
            sc = r.structured_content
            collected += sc["output_text"]
            offset = sc["next_offset"]
        assert collected == "".join(f"{i:05d}" for i in range(10000)) + "\n"


async def test_bad_input_gets_clear_errors_and_changes_nothing(kp: KernelpoolServer) -> None:
    users_dir = os.path.join(kp.data_dir, "users", "alice")
    with open(os.path.join(users_dir, "corrupt.ipynb"), "w") as f:
        f.write('{"cells": [oops')
    with open(os.path.join(users_dir, "notanb.ipynb"), "w") as f:
        json.dump({"hello": "world"}, f)
    snapshot = {n: Path(os.path.join(users_dir, n)).read_text() for n in ("corrupt.ipynb", "notanb.ipynb")}
    headers = {"Authorization": f"Bearer {kp.tokens['alice']}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    async with httpx2.AsyncClient(timeout=30) as http:
        r = await http.post(kp.url, content=b"{not json", headers=headers)
        assert r.status_code == 400
        # a name that is not valid UTF-8 (a lone surrogate, which no well-behaved client can send)
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
        r = await http.post(kp.url, json=init, headers=headers)
        session = headers | {"mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        await http.post(kp.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        raw = (b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "use_notebook", '
               b'"arguments": {"notebook": "bad\\udc80name.ipynb", "mode": "create"}}}')
        r = await http.post(kp.url, content=raw, headers=session)
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
        r = await http.post(kp.url, content=raw.replace(b"\\udc80", b"\xff"), headers=session)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32700, r.text
        r = await http.post(kp.url, content=b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x", '
                            + b'"arguments": {"code": "' + b"a" * (5 * 2**20) + b'"}}}', headers=headers)
        assert r.status_code == 413
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "valid.ipynb", "mode": "create"})
        cases = [
            ("read_notebook", {"notebook": "corrupt.ipynb"}, "not a valid notebook"),
            ("insert_cell", {"notebook": "corrupt.ipynb", "cell_index": -1, "cell_type": "code", "cell_source": "1"}, "not a valid notebook"),
            ("read_notebook", {"notebook": "notanb.ipynb"}, "not a valid notebook"),
            ("use_notebook", {"notebook": "corrupt.ipynb"}, "not a valid notebook"),
            ("read_notebook", {"notebook": "missing.ipynb"}, "not found"),
            ("no_such_tool", {}, "Unknown tool"),
            ("insert_cell", {"notebook": "corrupt.ipynb", "cell_index": "zero", "cell_type": "code", "cell_source": "1"}, "cell_index"),
            ("insert_cell", {"notebook": "x.ipynb", "cell_index": 0, "cell_type": "python", "cell_source": "1"}, "cell_type"),
            ("read_notebook", {"notebook": 42}, "notebook"),
            ("execute_code", {"notebook": "valid.ipynb", "code": "1", "timeout": 10**9}, "timeout"),
            ("read_cell", {"notebook": "valid.ipynb", "cell_index": 3}, "no cell at index 3"),
        ]
        for tool, args, expected in cases:
            r = await c.call_tool(tool, args)
            assert r.is_error, (tool, args)
            assert expected.lower() in texts(r)[0].lower(), (tool, texts(r))
    assert {n: Path(os.path.join(users_dir, n)).read_text() for n in snapshot} == snapshot
    assert not os.path.exists(os.path.join(users_dir, "x.ipynb"))
    assert httpx2.get(f"{kp.base}/healthz").status_code == 200


async def test_kernel_limit_per_user(fresh_server: KernelpoolServer, server_args: list[str]) -> None:
    kp = fresh_server
    kp.env["KERNELPOOL_MAX_KERNELS_PER_USER"] = "2"
    kp.env["KERNELPOOL_POOL_SIZE"] = "0"
    kp.add_user("hal")
    kp.start(*server_args)
    async with mcp_client(kp.url, kp.tokens["hal"], mode="auto") as c:
        for i in range(2):
            assert not (await c.call_tool("use_notebook", {"notebook": f"n{i}.ipynb", "mode": "create"})).is_error
        r = await c.call_tool("use_notebook", {"notebook": "n2.ipynb", "mode": "create"})
        assert r.is_error and "kernels per user limit reached (2)" in texts(r)[0]
        await c.call_tool("unuse_notebook", {"notebook": "n0.ipynb"})
        assert not (await c.call_tool("use_notebook", {"notebook": "n2.ipynb"})).is_error


async def test_idle_kernels_are_culled(fresh_server: KernelpoolServer, server_args: list[str]) -> None:
    kp = fresh_server
    kp.env |= {"KERNELPOOL_KERNEL_IDLE_TIMEOUT": "2", "KERNELPOOL_HOUSEKEEPING_INTERVAL": "0.5", "KERNELPOOL_POOL_SIZE": "1"}
    kp.add_user("ida")
    kp.start(*server_args)
    async with mcp_client(kp.url, kp.tokens["ida"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "idle.ipynb", "mode": "create"})
        await c.call_tool("execute_code", {"notebook": "idle.ipynb", "code": "v = 5"})
        warm_seen = False
        for _ in range(30):  # the refill runs in the background, within the idle timeout
            listed = (await c.call_tool("list_kernels", {})).structured_content
            if listed["warm"] == 1:
                warm_seen = True
                break
            await asyncio.sleep(0.05)
        assert warm_seen, "the pool refilled after the first kernel was handed out"
        pid = listed["kernels"][0]["pid"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (await c.call_tool("list_kernels", {})).structured_content["kernels"]:
            await asyncio.sleep(0.3)
        listed = (await c.call_tool("list_kernels", {})).structured_content
        assert listed["kernels"] == []
        assert _gone(pid, 10), "the culled kernel's process ends"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (await c.call_tool("list_kernels", {})).structured_content["warm"]:
            await asyncio.sleep(0.3)
        assert (await c.call_tool("list_kernels", {})).structured_content["warm"] == 0, "an inactive user's warm kernel retires"
        r = await c.call_tool("execute_code", {"notebook": "idle.ipynb", "code": "'v' in dir()"})
        assert texts(r) == ["False"]


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def _kernel_pids(kp: KernelpoolServer) -> list[int]:
    """Kernel processes of this server: they, and only they, run in the users' folders."""
    users = os.path.join(kp.data_dir, "users") + "/"
    found = []
    for proc in psutil.process_iter():
        try:
            if (proc.cwd() + "/").startswith(users) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _cgroup_dirs(kp: KernelpoolServer) -> list[str]:
    prefix = kp.env["KERNELPOOL_CGROUP_PREFIX"]
    out = []
    for top in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/cpu"):
        for dirpath, dirnames, _ in os.walk(top):
            if os.path.basename(dirpath) == prefix:
                out.append(dirpath)
                dirnames[:] = []
    return out


@pytest.mark.parametrize("fork_server", ["0", "1"])
async def test_sigkill_then_restart_leaves_nothing_behind(fresh_server: KernelpoolServer, server_args: list[str],
                                                          fork_server: str) -> None:
    kp = fresh_server
    kp.env["KERNELPOOL_POOL_SIZE"] = "1"
    kp.env["KERNELPOOL_FORK_SERVER"] = fork_server
    kp.add_user("jo")
    kp.start(*server_args)

    async def writer(i: int) -> None:
        async with mcp_client(kp.url, kp.tokens["jo"], mode="auto") as c:
            await c.call_tool("use_notebook", {"notebook": f"w{i}.ipynb", "mode": "create"})
            for n in range(1000):
                await c.call_tool("insert_cell", {"notebook": f"w{i}.ipynb", "cell_index": -1, "cell_type": "code",
                                                  "cell_source": f"# {n}\n" + "z" * 2000})

    tasks = [asyncio.create_task(writer(i)) for i in range(3)]
    await asyncio.sleep(4)
    assert len(_kernel_pids(kp)) >= 3
    kp.stop(signal.SIGKILL)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    left = _kernel_pids(kp)
    if fork_server == "1":
        # the fork server dies with its server and takes its kernels with it
        assert all(_gone(pid, 10) for pid in left), "kernels of the fork server end with it"
    else:
        assert left, "directly spawned kernels outlive a killed server (sessions of their own)"
    kp.start(*server_args)
    assert "left behind by a previous server" in kp.log()
    assert _kernel_pids(kp) == [] or set(_kernel_pids(kp)).isdisjoint(left)
    for pid in left:
        assert _gone(pid, 5), f"kernel {pid} of the dead server was reaped"
    live = kp.kernel_folders("jo")
    assert len(live) <= 1, f"only the new pool kernel's folder remains: {live}"
    for i in range(3):
        nb = on_disk(kp, "jo", f"w{i}.ipynb")  # valid: old or new content, never half
        assert all(c.source.startswith("# ") for c in nb.cells)
    async with mcp_client(kp.url, kp.tokens["jo"], mode="auto") as c:
        r = await c.call_tool("execute_code", {"notebook": "w0.ipynb", "code": "1+1"})
        assert texts(r) == ["2"]


async def test_sigterm_shuts_everything_down(fresh_server: KernelpoolServer, server_args: list[str]) -> None:
    kp = fresh_server
    kp.add_user("kim")
    kp.start(*server_args)
    async with mcp_client(kp.url, kp.tokens["kim"], mode="auto") as c:
        for i in range(2):
            await c.call_tool("use_notebook", {"notebook": f"t{i}.ipynb", "mode": "create"})
            await c.call_tool("insert_execute_code_cell", {"notebook": f"t{i}.ipynb", "cell_index": -1, "cell_source": "1"})
    assert _kernel_pids(kp)
    # uvicorn re-raises the signal once its graceful shutdown is done, as init systems expect
    assert kp.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in kp.log()
    assert _kernel_pids(kp) == []
    if SANDBOX_SKIP is None:
        assert _cgroup_dirs(kp) == []
    assert kp.kernel_folders("kim") == []
