"""tests/node: the npm packages (official TypeScript SDK, conformance suite) for the tests that
drive kernelpool with MCP implementations not written in Python. Installed with `npm ci` from
the committed package-lock.json, once, when missing or older than the lock."""

from __future__ import annotations

import os
import shutil
import subprocess

from testkit.server import ROOT

NODE_DIR = os.path.join(ROOT, "tests", "node")


def missing() -> str | None:
    """Why the Node tests cannot run here, or None."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def ensure_installed() -> None:
    stamp = os.path.join(NODE_DIR, "node_modules", ".package-lock.json")  # npm writes it on install
    lock = os.path.join(NODE_DIR, "package-lock.json")
    if os.path.exists(stamp) and os.path.getmtime(stamp) >= os.path.getmtime(lock):
        return
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300,
                   capture_output=True, text=True)
