"""End to end: a real server process, the real MCP client over HTTP, real kernels and files."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import httpx2
import nbformat
import pytest

from testkit.client import mcp_client
from testkit.server import KernelpoolServer
from tests.conftest import METRICS_TOKEN

MODES = ["legacy", "auto"]


def texts(result) -> list[str]:
    return [c.text for c in result.content if c.type == "text"]


def on_disk(kp: KernelpoolServer, user: str, path: str) -> nbformat.NotebookNode:
    with open(os.path.join(kp.data_dir, "users", user, path)) as f:
        nb = nbformat.read(f, as_version=4)
    nbformat.validate(nb)
    return nb


@pytest.mark.parametrize("mode", MODES)
async def test_one_plus_one_lands_in_the_notebook(kp: KernelpoolServer, mode: str) -> None:
    nb_path = f"first-{mode}.ipynb"
    async with mcp_client(kp.url, kp.tokens["alice"], mode=mode) as c:
        r = await c.call_tool("use_notebook", {"notebook": nb_path, "mode": "create"})
        assert not r.is_error, texts(r)
        r = await c.call_tool("insert_execute_code_cell", {"notebook": nb_path, "cell_index": -1, "cell_source": "1+1"})
        assert not r.is_error, texts(r)
        assert texts(r) == ["2"]
        sc = r.structured_content
        assert sc["status"] == "ok" and sc["execution_count"] == 1 and sc["saved"] is True
    nb = on_disk(kp, "alice", nb_path)
    assert [c.source for c in nb.cells] == ["1+1"]
    cell = nb.cells[0]
    assert cell.execution_count == 1
    assert cell.outputs[0].output_type == "execute_result"
    assert cell.outputs[0].data["text/plain"] == "2"
    assert cell.id == sc["cell_id"]


async def test_active_notebook_is_per_session(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["alice"], mode="legacy") as a1, \
            mcp_client(kp.url, kp.tokens["alice"], mode="legacy") as a2:
        assert not (await a1.call_tool("use_notebook", {"notebook": "s1.ipynb", "mode": "create"})).is_error
        # a second session of the same user has no active notebook until it picks one
        r = await a2.call_tool("execute_code", {"code": "1"})
        assert r.is_error and "no notebook given" in texts(r)[0]
        assert not (await a2.call_tool("use_notebook", {"notebook": "s2.ipynb", "mode": "create"})).is_error
        r1 = await a1.call_tool("insert_execute_code_cell", {"cell_index": -1, "cell_source": "'from-s1'"})
        r2 = await a2.call_tool("insert_execute_code_cell", {"cell_index": -1, "cell_source": "'from-s2'"})
        assert r1.structured_content["notebook"] == "s1.ipynb"
        assert r2.structured_content["notebook"] == "s2.ipynb"
        listed = (await a1.call_tool("list_notebooks", {})).structured_content
        assert listed["active"] == "s1.ipynb"
    assert [c.source for c in on_disk(kp, "alice", "s1.ipynb").cells] == ["'from-s1'"]
    assert [c.source for c in on_disk(kp, "alice", "s2.ipynb").cells] == ["'from-s2'"]


async def test_sessionless_client_must_name_the_notebook(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": "nosession.ipynb", "mode": "create"})
        assert not r.is_error
        assert r.structured_content["active"] is False
        r = await c.call_tool("execute_code", {"code": "1"})
        assert r.is_error and "no notebook given" in texts(r)[0]
        r = await c.call_tool("execute_code", {"code": "6*7", "notebook": "nosession.ipynb"})
        assert texts(r) == ["42"]


async def test_no_cross_talk_between_users_and_sessions(kp: KernelpoolServer) -> None:
    """Two users and two sessions of one user, each with its own active notebook, executing
    interleaved and concurrently: every cell lands in its own notebook and its own kernel."""
    actors = [("alice", "x1.ipynb"), ("alice", "x2.ipynb"), ("bob", "x1.ipynb"), ("bob", "x3.ipynb")]
    rounds = 6

    async def actor(i: int, user: str, path: str) -> list[int]:
        pids = []
        async with mcp_client(kp.url, kp.tokens[user], mode="legacy") as c:
            r = await c.call_tool("use_notebook", {"notebook": path, "mode": "create"})
            assert not r.is_error, texts(r)
            r = await c.call_tool("execute_code", {"code": f"TAG = {f'{user}:{path}'!r}"})
            assert not r.is_error, texts(r)
            for n in range(rounds):
                r = await c.call_tool("insert_execute_code_cell", {
                    "cell_index": -1, "cell_source": f"import os; print(TAG, {n}, os.getpid())",
                })
                assert not r.is_error, texts(r)
                tag, num, pid = texts(r)[0].split()
                assert (tag, int(num)) == (f"{user}:{path}", n)
                pids.append(int(pid))
                await asyncio.sleep(0.01 * (i + 1))
        return pids

    results = await asyncio.gather(*(actor(i, u, p) for i, (u, p) in enumerate(actors)))
    kernel_pids = [set(p) for p in results]
    assert all(len(p) == 1 for p in kernel_pids), "one kernel per notebook throughout"
    assert len(set.union(*kernel_pids)) == len(actors), "no two notebooks share a kernel"
    for user, path in actors:
        nb = on_disk(kp, user, path)
        assert len(nb.cells) == rounds
        for n, cell in enumerate(nb.cells):
            assert cell.outputs[0].text.split()[:2] == [f"{user}:{path}", str(n)]


async def test_outputs_streams_errors_markdown_images(kp: KernelpoolServer) -> None:
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    code = (
        "import sys, base64\n"
        "from IPython.display import display, Markdown, Image\n"
        "print('out'); print('err', file=sys.stderr)\n"
        "display(Markdown('**bold**'))\n"
        f"display(Image(data=base64.b64decode('{png}'), format='png'))\n"
    )
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "out.ipynb", "mode": "create"})
        r = await c.call_tool("insert_execute_code_cell", {"notebook": "out.ipynb", "cell_index": -1, "cell_source": code})
        kinds = [b.type for b in r.content]
        assert "image" in kinds
        image = next(b for b in r.content if b.type == "image")
        assert image.mime_type == "image/png" and image.data == png
        assert "out\n" in texts(r) and "err\n" in texts(r) and "**bold**" in texts(r)
        r = await c.call_tool("insert_execute_code_cell", {"notebook": "out.ipynb", "cell_index": -1,
                                                           "cell_source": "def f():\n    raise ValueError('boom')\nf()"})
        assert r.structured_content["status"] == "error"
        tb = texts(r)[0]
        assert "ValueError" in tb and "boom" in tb and "\x1b[" not in tb
        nb = on_disk(kp, "alice", "out.ipynb")
        assert nb.cells[1].outputs[0].output_type == "error" and nb.cells[1].outputs[0].ename == "ValueError"


async def test_timeout_interrupts_and_keeps_the_kernel(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["bob"], mode="legacy") as c:
        await c.call_tool("use_notebook", {"notebook": "slow.ipynb", "mode": "create"})
        await c.call_tool("execute_code", {"code": "keep = 41"})
        code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
        r = await c.call_tool("insert_execute_code_cell", {"cell_index": -1, "cell_source": code, "timeout": 2})
        sc = r.structured_content
        assert sc["status"] == "timeout"
        assert "timeout of 2 s" in sc["message"]
        assert "started\n" in texts(r)
        assert sc["duration_ms"] < 15000
        r = await c.call_tool("execute_code", {"code": "keep + 1"})
        assert texts(r) == ["42"], "the interrupted kernel keeps its state"
        nb = on_disk(kp, "bob", "slow.ipynb")
        assert nb.cells[0].outputs[0].text == "started\n"


async def test_progress_is_reported_during_long_executions(kp: KernelpoolServer) -> None:
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with mcp_client(kp.url, kp.tokens["bob"], mode="legacy") as c:
        await c.call_tool("use_notebook", {"notebook": "progress.ipynb", "mode": "create"})
        r = await c.call_tool("execute_code", {"code": "import time; time.sleep(3.5); 'done'"},
                              progress_callback=on_progress)
        assert texts(r) == ["'done'"]
    assert len(seen) >= 2, seen  # the module's server reports every second
    assert all(b[0] > a[0] for a, b in zip(seen, seen[1:], strict=False)), "progress increases"


async def test_kernels_are_listed_per_user_and_can_be_restarted(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["alice"], mode="legacy") as a, \
            mcp_client(kp.url, kp.tokens["bob"], mode="legacy") as b:
        await a.call_tool("use_notebook", {"notebook": "k.ipynb", "mode": "create"})
        await b.call_tool("use_notebook", {"notebook": "kb.ipynb", "mode": "create"})
        mine = (await a.call_tool("list_kernels", {})).structured_content["kernels"]
        theirs = (await b.call_tool("list_kernels", {})).structured_content["kernels"]
        assert "k.ipynb" in {k["notebook"] for k in mine}
        assert not {k["kernel_id"] for k in mine} & {k["kernel_id"] for k in theirs}
        assert "kb.ipynb" not in {k["notebook"] for k in mine}
        await a.call_tool("execute_code", {"code": "v = 1"})
        r = await a.call_tool("restart_notebook", {})
        assert not r.is_error
        r = await a.call_tool("execute_code", {"code": "'v' in dir()"})
        assert texts(r) == ["False"]
        r = await a.call_tool("unuse_notebook", {})
        assert r.structured_content["kernel_stopped"] is True
        r = await a.call_tool("execute_code", {"code": "1"})
        assert r.is_error, "unuse_notebook also clears the session's active notebook"


async def test_interrupt_kernel_stops_a_running_cell(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "intr.ipynb", "mode": "create"})
        run = asyncio.create_task(c.call_tool("execute_code", {"notebook": "intr.ipynb", "code": "import time; time.sleep(60)"}))
        await asyncio.sleep(1.5)
        async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as other:
            r = await other.call_tool("interrupt_kernel", {"notebook": "intr.ipynb"})
            assert r.structured_content["interrupted"] is True
        r = await asyncio.wait_for(run, 20)
        assert "KeyboardInterrupt" in " ".join(texts(r))


async def test_unauthenticated_requests_get_401(kp: KernelpoolServer) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with httpx2.AsyncClient() as http:
        assert (await http.get(f"{kp.base}/healthz")).status_code == 200
        r = await http.post(kp.url, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = await http.post(kp.url, json=body, headers=headers | {"Authorization": "Bearer kp_nope_nope"})
        assert r.status_code == 401
        # a revoked token
        token = kp.cli("tokens", "create", "alice").stdout.strip()
        r = await http.post(kp.url, json=body, headers=headers | {"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        await _revocation_counts_within_a_second(kp, http, token, body, headers)
        # an expired token
        token = kp.cli("tokens", "create", "alice", "--expires", "2001-01-01T00:00:00").stdout.strip()
        r = await http.post(kp.url, json=body, headers=headers | {"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


async def _revocation_counts_within_a_second(kp: KernelpoolServer, http: httpx2.AsyncClient, token: str,
                                             body: dict, headers: dict) -> None:
    """Tokens are remembered by the server; a revocation by the CLI must still count within 1 s,
    also while the token is in constant use (so that it stays remembered)."""
    auth = headers | {"Authorization": f"Bearer {token}"}
    statuses: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def hammer() -> None:
        # until the first refusal: failures count towards the throttle on bad logins
        while not stop.is_set() and (not statuses or statuses[-1][1] == 200):
            r = await http.post(kp.url, json=body, headers=auth)
            statuses.append((time.monotonic(), r.status_code))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(hammer())
    try:
        await asyncio.sleep(0.3)
        assert statuses and all(code == 200 for _, code in statuses), statuses
        await asyncio.to_thread(kp.cli, "tokens", "revoke", token)
        revoked_at = time.monotonic()  # the CLI has committed and exited
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        await task
    after = [(t - revoked_at, code) for t, code in statuses if t > revoked_at]
    assert after and after[-1][1] == 401, after[-3:]
    assert after[-1][0] <= 1.0, f"the revoked token still worked {after[-2][0]:.2f} s after the CLI revoked it"
    r = await http.post(kp.url, json=body, headers=auth)
    assert r.status_code == 401


@pytest.mark.parametrize("path", ["../bob/x.ipynb", "/etc/passwd.ipynb", "a/../../bob/x.ipynb", "x\x00.ipynb", "notes.txt"])
async def test_paths_outside_the_users_folder_are_refused(kp: KernelpoolServer, path: str) -> None:
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        for tool, args in [("use_notebook", {"notebook": path, "mode": "create"}), ("read_notebook", {"notebook": path}),
                           ("execute_code", {"notebook": path, "code": "1"})]:
            r = await c.call_tool(tool, args)
            assert r.is_error and "path refused" in texts(r)[0], (tool, texts(r))
    assert not os.path.exists(os.path.join(kp.data_dir, "users", "bob", "x.ipynb"))


async def test_another_users_notebook_is_out_of_reach(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["bob"], mode="auto") as b:
        await b.call_tool("use_notebook", {"notebook": "secret.ipynb", "mode": "create"})
        await b.call_tool("insert_cell", {"notebook": "secret.ipynb", "cell_index": -1, "cell_type": "code", "cell_source": "s=1"})
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as a:
        r = await a.call_tool("read_notebook", {"notebook": "secret.ipynb"})
        assert r.is_error and "not found" in texts(r)[0]
        listed = (await a.call_tool("list_notebooks", {})).structured_content["notebooks"]
        assert "secret.ipynb" not in {n["path"] for n in listed}
        r = await a.call_tool("list_files", {"path": ".."})
        assert r.is_error


async def test_editing_tools_round_trip(kp: KernelpoolServer) -> None:
    nbp = "edit.ipynb"
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        async def call(tool: str, **args):
            r = await c.call_tool(tool, {"notebook": nbp, **args})
            return r

        await call("use_notebook", mode="create")
        ids = []
        for src in ["a = 1", "b = 2", "# title"]:
            r = await call("insert_cell", cell_index=-1, cell_type="markdown" if src.startswith("#") else "code", cell_source=src)
            ids.append(r.structured_content["cell_id"])
        await call("insert_cell", cell_index=0, cell_type="raw", cell_source="raw text")
        await call("overwrite_cell_source", cell_id=ids[0], cell_source="a = 10")
        r = await call("edit_cell_source", cell_index=2, old_string="2", new_string="20")
        assert r.structured_content["replacements"] == 1
        await call("move_cell", cell_id=ids[2], new_index=0)
        await call("execute_cell", cell_id=ids[0])
        before = on_disk(kp, "alice", nbp)
        # bad input changes nothing
        refused: list[tuple[str, dict[str, object]]] = [
            ("delete_cell", {"cell_index": 99}), ("move_cell", {"cell_index": 0, "new_index": 42}),
            ("edit_cell_source", {"cell_index": 1, "old_string": "zzz", "new_string": ""}),
            ("insert_cell", {"cell_index": 17, "cell_type": "code", "cell_source": "x"}),
            ("overwrite_cell_source", {"cell_id": "no-such-id", "cell_source": "x"}),
            ("execute_cell", {"cell_index": 0}),
            ("insert_execute_code_cell", {"cell_index": -1, "cell_source": "1", "timeout": -5})]
        for tool, args in refused:
            r = await call(tool, **args)
            assert r.is_error, (tool, texts(r))
        assert on_disk(kp, "alice", nbp) == before
        await call("clear_cell_output", cell_id=ids[0])
        await call("delete_cell", cell_index=-1)
        r = await call("read_notebook", response_format="detailed")
        cells = r.structured_content["cells"]
    nb = on_disk(kp, "alice", nbp)
    assert [c.cell_type for c in nb.cells] == ["markdown", "raw", "code"]
    assert [c.source for c in nb.cells] == ["# title", "raw text", "a = 10"]
    assert nb.cells[2].outputs == [] and nb.cells[2].execution_count is None
    assert [c["id"] for c in cells] == [c.id for c in nb.cells]
    assert [c["source"] for c in cells] == [c.source for c in nb.cells]
    # what the tools wrote re-reads identically
    with open(os.path.join(kp.data_dir, "users", "alice", nbp)) as f:
        raw = f.read()
    assert nbformat.writes(nbformat.reads(raw, as_version=4)) == raw


async def test_files_belong_to_the_user(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "sub/dir/own.ipynb", "mode": "create"})
        r = await c.call_tool("execute_code", {"notebook": "sub/dir/own.ipynb", "code": "import os; print(os.getcwd())"})
        assert texts(r)[0].strip().endswith("/users/alice/sub/dir"), "a notebook's code runs in its folder"
        r = await c.call_tool("list_files", {"path": "sub/dir"})
        assert [f["path"] for f in r.structured_content["files"]] == ["sub/dir/own.ipynb"]
    st = os.stat(os.path.join(kp.data_dir, "users", "alice", "sub", "dir", "own.ipynb"))
    folder = os.stat(os.path.join(kp.data_dir, "users", "alice"))
    assert (st.st_uid, st.st_gid) == (folder.st_uid, folder.st_gid)


async def test_healthz_and_metrics(kp: KernelpoolServer) -> None:
    async with mcp_client(kp.url, kp.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "metrics.ipynb", "mode": "create"})
        await c.call_tool("insert_execute_code_cell", {"notebook": "metrics.ipynb", "cell_index": -1, "cell_source": "1"})
    async with httpx2.AsyncClient() as http:
        health = (await http.get(f"{kp.base}/healthz")).json()
        assert health["status"] == "ok"
        assert health["disk"]["free_bytes"] > health["disk"]["floor_bytes"] > 0 and not health["disk"]["low"]
        for headers in ({}, {"Authorization": f"Bearer {kp.tokens['alice']}"}, {"Authorization": "Bearer wrong"}):
            r = await http.get(f"{kp.base}/metrics", headers=headers)
            assert r.status_code == 401 and "alice" not in r.text, "no user names without the metrics token"
        r = await http.get(f"{kp.base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert r.status_code == 200
        metrics = r.text
        assert "kernelpool_tool_calls_total" in metrics
        assert 'kernelpool_kernels{state="idle",user="alice"}' in metrics
        assert re.search(r'kernelpool_user_memory_bytes\{user="alice"\} [1-9]', metrics), metrics
        assert 'kernelpool_executions_total{status="ok"}' in metrics
        assert "kernelpool_execution_seconds_bucket" in metrics
        # counters, named as Prometheus names counters (_total)
        assert re.search(r"^kernelpool_pool_misses_total [1-9]", metrics, re.M), metrics
        assert re.search(r"^kernelpool_pool_hits_total \d", metrics, re.M), metrics
        assert re.search(r'^kernelpool_kernel_starts_total\{source="(fork_server|stock)"\} [1-9]', metrics, re.M), metrics
        # the garbage collector's pauses are timed (kernelpool serve tunes and watches it)
        assert re.search(r'^kernelpool_gc_pause_seconds_count\{generation="[012]"\} [1-9]', metrics, re.M), metrics
    rows = [json.loads(line) for line in kp.cli("audit", "--user", "alice", "--json").stdout.splitlines()]
    assert rows and {r["user"] for r in rows} == {"alice"}
    assert {"use_notebook", "insert_execute_code_cell"} <= {r["tool"] for r in rows}


async def test_changes_made_on_disk_are_seen(kp: KernelpoolServer) -> None:
    """The server keeps parsed notebooks in memory; a file changed by someone else (here the
    user's own kernel) is read again, not served stale."""
    async with mcp_client(kp.url, kp.tokens["bob"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "ext.ipynb", "mode": "create"})
        await c.call_tool("insert_cell", {"notebook": "ext.ipynb", "cell_index": -1, "cell_type": "code", "cell_source": "a"})
        assert [x["id"] for x in (await c.call_tool("read_notebook", {"notebook": "ext.ipynb"})).structured_content["cells"]]
        code = ("import nbformat\nnb = nbformat.read('ext.ipynb', as_version=4)\n"
                "nb.cells.append(nbformat.v4.new_markdown_cell('written by the kernel'))\n"
                "nbformat.write(nb, 'ext.ipynb')")
        r = await c.call_tool("execute_code", {"notebook": "ext.ipynb", "code": code})
        assert not r.is_error, texts(r)
        r = await c.call_tool("read_notebook", {"notebook": "ext.ipynb", "response_format": "detailed"})
        assert [x["source"] for x in r.structured_content["cells"]] == ["a", "written by the kernel"]
        await c.call_tool("insert_cell", {"notebook": "ext.ipynb", "cell_index": -1, "cell_type": "code", "cell_source": "b"})
    assert [x.source for x in on_disk(kp, "bob", "ext.ipynb").cells] == ["a", "written by the kernel", "b"]
