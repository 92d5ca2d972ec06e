"""The official MCP conformance suite against a real server, compared with the baseline
(tests/conformance-baseline.yml; reasons in tests/conformance-baseline.md)."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from testkit.client import mcp_client
from testkit.server import ROOT, KernelpoolServer
from tests import node_env


async def _give_a_notebook(url: str, token: str) -> None:
    async with mcp_client(url, token, mode="auto") as client:
        await client.call_tool("use_notebook", {"notebook": "conformance.ipynb", "mode": "create"})

pytestmark = pytest.mark.skipif(node_env.missing() is not None, reason=f"Node tests: {node_env.missing()}")

APPLY = {"server-initialize", "ping", "tools-list", "server-sse-multiple-streams", "dns-rebinding-protection",
         "logging-set-level", "completion-complete", "resources-list"}


def _baseline_table() -> dict[str, str]:
    with open(os.path.join(ROOT, "tests", "conformance-baseline.md")) as f:
        rows = re.findall(r"^\| ([a-z0-9-]+) \| (pass|pass \(vacuous\)|fail) \|", f.read(), re.M)
    return dict(rows)


def _baseline_failures() -> set[str]:
    with open(os.path.join(ROOT, "tests", "conformance-baseline.yml")) as f:
        return set(re.findall(r"^\s+- ([a-z0-9-]+)\s*$", f.read(), re.M))


def test_baseline_files_agree_with_the_suite() -> None:
    node_env.ensure_installed()
    listed = subprocess.run([os.path.join(node_env.NODE_DIR, "node_modules", ".bin", "conformance"), "list"],
                            cwd=node_env.NODE_DIR, capture_output=True, text=True, timeout=60, check=True).stdout
    server_part = listed.split("Client scenarios")[0]
    scenarios = set(re.findall(r"^\s+- (\S+)$", server_part, re.M))
    table = _baseline_table()
    assert set(table) == scenarios, "every server scenario of the suite has one row in the .md"
    assert {s for s, r in table.items() if r == "fail"} == _baseline_failures()


def test_conformance_suite_matches_baseline(kp: KernelpoolServer, tmp_path: os.PathLike[str]) -> None:
    asyncio.run(_give_a_notebook(kp.url, kp.tokens["alice"]))  # resources-list then lists it
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "conformance"), "--url", kp.url,
         "--token", kp.tokens["alice"], "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    passed = set()
    for checks_file in glob.glob(os.path.join(tmp_path, "server-*", "checks.json")):
        scenario = re.sub(r"^server-|-\d{4}-\d\d-\d\dT.*$", "", os.path.basename(os.path.dirname(checks_file)))
        with open(checks_file) as f:
            checks = json.load(f)
        statuses = {c["status"] for c in checks}
        if "SUCCESS" in statuses and not statuses & {"FAILURE", "WARNING"}:
            passed.add(scenario)
        if scenario == "resources-list":
            listed = [c for c in checks if c["id"] == "resources-list"]
            assert listed[0]["details"]["resourceCount"] >= 1, "resources-list passed vacuously"
    assert passed >= APPLY
