"""The server driven by the official TypeScript MCP SDK (npm `@modelcontextprotocol/sdk`, run
with the machine's Node.js): the streamable HTTP transport, bearer auth and a session proven
against an implementation other than the server's own."""

from __future__ import annotations

import json
import os
import subprocess

import nbformat
import pytest

from testkit.server import KernelpoolServer
from tests import node_env

pytestmark = pytest.mark.skipif(node_env.missing() is not None, reason=f"Node tests: {node_env.missing()}")


def test_typescript_sdk_creates_and_runs_a_notebook(kp: KernelpoolServer) -> None:
    node_env.ensure_installed()
    out = subprocess.run(
        ["node", "client.mjs", kp.url, kp.tokens["alice"], "ts/first.ipynb"],
        cwd=node_env.NODE_DIR, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)

    assert report["server"]["name"] == "kernelpool"
    assert report["sessionId"]  # the TS SDK negotiates a session protocol
    assert {"use_notebook", "insert_execute_code_cell", "execute_code", "read_notebook"} <= set(report["tools"])
    assert report["useNotebook"] == {"isError": False, "structuredContent": report["useNotebook"]["structuredContent"]}
    assert report["useNotebook"]["structuredContent"]["active"] is True

    run = report["execute"]
    assert run["isError"] is False
    assert run["text"] == ["2"]
    data = run["structuredContent"]
    assert data["notebook"] == "ts/first.ipynb" and data["status"] == "ok" and data["saved"] is True
    assert data["execution_count"] == 1

    path = os.path.join(kp.data_dir, "users", "alice", "ts", "first.ipynb")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert [c.source for c in nb.cells] == ["1+1"]
    cell = nb.cells[0]
    assert cell.id == data["cell_id"] and cell.execution_count == 1
    assert cell.outputs[0]["output_type"] == "execute_result"
    assert cell.outputs[0]["data"]["text/plain"] == "2"
