"""OAuth clients not written by us, with no token configured, against kernelpool by its URL alone:
mcp-remote 0.15.1 (what Claude Desktop and other stdio-only clients run) and the official
TypeScript SDK's OAuth client, by DCR and by a client metadata document. Their browser step is
tests/oauth_browser.py: a real headless Chromium that signs in with a token and presses Allow.
The npm packages are pinned in tests/node (package-lock.json)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from testkit import browser
from testkit.client import text
from testkit.server import ROOT, KernelpoolServer, make_data_dir, server_env
from tests import node_env
from tests.oauth_flow import DocumentHost

pytestmark = [
    pytest.mark.skipif(node_env.missing() is not None, reason=f"Node tests: {node_env.missing()}"),
    pytest.mark.skipif(browser.missing() is not None, reason=f"browser tests: {browser.missing()}"),
]


@pytest.fixture(scope="module")
def folder() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kp-oauth-clients-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def documents(folder: str) -> Iterator[DocumentHost]:
    host = DocumentHost(folder)
    try:
        yield host
    finally:
        host.close()


@pytest.fixture(scope="module")
def clients_kp(server_args: list[str], documents: DocumentHost) -> Iterator[KernelpoolServer]:
    node_env.ensure_installed()
    server = KernelpoolServer(make_data_dir(), server_env(KERNELPOOL_POOL_SIZE="0", **documents.env()))
    try:
        server.add_user("dana")
        server.start(*server_args)
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def browser_command(folder: str, clients_kp: KernelpoolServer) -> str:
    """A browser command for the clients: runs tests/oauth_browser.py with this venv's python."""
    path = os.path.join(folder, "browser")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec {sys.executable} {ROOT}/tests/oauth_browser.py "$1"\n')
    os.chmod(path, stat.S_IRWXU)
    return path


def person_env(kp: KernelpoolServer) -> dict[str, str]:
    return {"KP_TEST_USER": "dana", "KP_TEST_TOKEN": kp.tokens["dana"]}


async def test_mcp_remote_with_no_header_signs_in_and_runs_code(clients_kp: KernelpoolServer, browser_command: str,
                                                              folder: str) -> None:
    proxy = os.path.join(node_env.NODE_DIR, "node_modules", "mcp-remote", "dist", "proxy.js")
    env = {**person_env(clients_kp), "BROWSER": browser_command, "MCP_REMOTE_CONFIG_DIR": os.path.join(folder, "mcp-auth"),
           "PATH": os.environ["PATH"], "HOME": folder}
    params = StdioServerParameters(command="node", args=[proxy, clients_kp.url], env=env)
    with open(os.path.join(folder, "mcp-remote.log"), "w+") as errlog:
        try:
            async with Client(stdio_client(params, errlog=errlog)) as client:  # type: ignore[arg-type]
                tools = {t.name for t in (await client.list_tools()).tools}
                assert {"execute_code", "use_notebook"} <= tools
                r = await client.call_tool("use_notebook", {"notebook": "remote.ipynb", "mode": "create"})
                assert not r.is_error, text(r)
                r = await client.call_tool("execute_code", {"notebook": "remote.ipynb", "code": "1+1"})
                assert not r.is_error and text(r) == "2", text(r)
        finally:
            errlog.seek(0)
            log = errlog.read()
    assert "Browser opened automatically" in log and "Auth code received" in log, log[-3000:]
    listed = clients_kp.cli("tokens", "list", "dana").stdout
    assert "oauth client='MCP CLI Proxy'" in listed, listed


def run_ts(kp: KernelpoolServer, command: str, *extra: str) -> dict[str, object]:
    out = subprocess.run(["node", "oauth-client.mjs", kp.url, command, *extra], cwd=node_env.NODE_DIR,
                         capture_output=True, text=True, timeout=180, env={**os.environ, **person_env(kp)})
    assert out.returncode == 0, out.stderr[-3000:]
    report: dict[str, object] = json.loads(out.stdout)
    return report


def test_typescript_sdk_signs_in_by_dcr(clients_kp: KernelpoolServer, browser_command: str) -> None:
    report = run_ts(clients_kp, browser_command)
    assert report["iss"] == clients_kp.base and report["tokenPrefix"] == "kp_" and report["hasRefresh"] is True
    assert report["execute"] == {"isError": False, "text": ["2"]}
    assert "kernelpool test (TypeScript SDK)" in clients_kp.cli("tokens", "list", "dana").stdout


def test_typescript_sdk_signs_in_by_client_metadata_document(clients_kp: KernelpoolServer, browser_command: str,
                                                            documents: DocumentHost) -> None:
    url = documents.publish("/ts-client.json", client_name="kernelpool test (TypeScript SDK, CIMD)",
                            redirect_uris=["http://127.0.0.1/callback"], token_endpoint_auth_method="none")
    report = run_ts(clients_kp, browser_command, url)
    assert report["clientId"] == url
    assert report["execute"] == {"isError": False, "text": ["2"]}
    assert "kernelpool test (TypeScript SDK, CIMD)" in clients_kp.cli("tokens", "list", "dana").stdout
