"""The README's commands, as a newcomer meets them: on a fresh Debian 12 machine, as root, from a
checkout in root's home.

The machine is a container of a stand-in Debian bookworm root (debootstrap with python3 and
ca-certificates only: no venv module, no nftables, as cloud images ship; testkit/docker.py),
started with a private cgroup namespace and named capabilities, its read-only cgroup v1 mounts
made writable before anything else, with apt and PyPI reached through Docker's bridge. The
checkout is HEAD of this repository (`git archive`: commit what you want tested) in /root/kernelpool,
below root's 0700 home. The README's first command is copied from the README and run as written
in that folder; the token it prints works for the real MCP client (run inside the machine, where
the server listens on 127.0.0.1 as the command leaves it) and a kernel runs 1+1. Then, on the same
machine: the command again (nothing to install, the same data), the server without nftables (the
default network falls back to 'none' and says how to get egress), an explicit 'egress' without
nftables (refused), and an upgrade from a ./kernelpool-data of an earlier version (refused with
the fix; the fix followed works). Then the README's test command, with the venv module removed
again. pip's download cache is kept in /var/cache/kernelpool-ci between runs (downloads only;
pip still resolves against PyPI).

The tests run in order on one machine, and the container and image are removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from testkit.docker import CACHE, FRESH_ROOT, RUN, V1_REMOUNT, docker, import_root
from testkit.server import ROOT

VENV = "/opt/kernelpool"
CHECKOUT = "/root/kernelpool"
DATA = "/var/lib/kernelpool"
URL = "http://127.0.0.1:8765"


def readme_commands() -> tuple[str, str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```sh\n(.*?)```", f.read(), re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_starts_with_the_two_commands() -> None:
    serve, test = readme_commands()
    assert serve == f"scripts/install {VENV} && {VENV}/bin/kernelpool serve"
    assert "\n" not in serve, "the first command is one line"
    assert test == "scripts/test"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert re.search(r"^scripts/test\b", f.read(), re.M), ".ci/run must run the README's test command"


def test_install_script_passes_shellcheck() -> None:
    if subprocess.run(["sh", "-c", "command -v shellcheck"], capture_output=True).returncode != 0:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    out = subprocess.run(["shellcheck", "scripts/install", "scripts/test", ".ci/run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- the fresh machine --------------------------------------------------------------------------

# run inside the machine by the venv's python (mcp and httpx2 come with kernelpool): the real
# client, on the README's URL, with a token; prints the tool's outcome as JSON
CLIENT = r"""
import asyncio, json, sys
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

async def main():
    url, token, notebook, code = sys.argv[1:5]
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=300))
    async with http, Client(streamable_http_client(url + "/mcp", http_client=http), mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": notebook, "mode": "create"})
        text = "".join(b.text for b in r.content if b.type == "text")
        if r.is_error and "already exists" not in text:
            print(json.dumps({"error": True, "text": text}))
            return
        r = await c.call_tool("execute_code", {"notebook": notebook, "code": code})
        print(json.dumps({"error": r.is_error, "text": "".join(b.text for b in r.content if b.type == "text")}))

asyncio.run(main())
"""

# the machine's own python: SIGTERM to every `kernelpool serve`, and wait until they are gone
SERVERS = r"""
import os, signal, sys, time
def servers():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"/kernelpool") for a in argv) and b"serve" in argv:
            found.append(int(pid))
    return found
for pid in servers():
    os.kill(pid, signal.SIGTERM)
deadline = time.monotonic() + 60
while servers() and time.monotonic() < deadline:
    time.sleep(0.2)
sys.exit(1 if servers() else 0)
"""

HEALTHZ = r"""
import sys, urllib.request
try:
    print(urllib.request.urlopen("http://127.0.0.1:8765/healthz", timeout=3).read().decode())
except OSError as e:
    sys.exit(f"no answer: {e}")
"""


@dataclass
class Machine:
    name: str

    def sh(self, script: str, check: bool = True, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`script` in root's login-like shell on the machine, from the checkout."""
        extra = [arg for k, v in (env or {}).items() for arg in ("-e", f"{k}={v}")]
        return docker("exec", *extra, "-w", CHECKOUT, self.name, "bash", "-c", script, check=check, timeout=timeout)

    def python(self, program: str, *args: str, python: str = "/usr/bin/python3",
               check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`program` run by the machine's python (or `python`), with `args`."""
        return docker("exec", "-i", self.name, python, "-", *args, input=program, check=check, timeout=timeout)

    def start(self, command: str, log: str, env: dict[str, str] | None = None) -> None:
        """`command` in the background, from the checkout: its output to /root/<log>, then its exit
        status to /root/<log>.rc."""
        extra = [arg for k, v in (env or {}).items() for arg in ("-e", f"{k}={v}")]
        docker("exec", "-d", *extra, "-w", CHECKOUT, self.name, "bash", "-c",
               f"exec >/root/{log} 2>&1; {command}\necho $? >/root/{log}.rc")

    def log(self, log: str) -> str:
        return self.sh(f"cat /root/{log}", check=False).stdout

    def status(self, log: str) -> int | None:
        """The exit status of the command that writes /root/<log>; None while it runs."""
        out = self.sh(f"cat /root/{log}.rc", check=False)
        return int(out.stdout) if out.returncode == 0 and out.stdout.strip() else None

    def healthz(self) -> dict[str, Any] | None:
        out = self.python(HEALTHZ, check=False, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait_serving(self, log: str, wait: float) -> dict[str, Any]:
        """/healthz of the server that writes /root/<log>, once it answers; fails if it exits first."""
        deadline = time.monotonic() + wait
        while True:
            health = self.healthz()
            if health is not None:
                return health
            status = self.status(log)
            assert status is None, f"exited with {status}:\n{self.log(log)[-6000:]}"
            assert time.monotonic() < deadline, f"no /healthz in {wait} s:\n{self.log(log)[-6000:]}"
            time.sleep(1)

    def stop(self, log: str) -> None:
        """SIGTERM to the server; it shuts down cleanly (uvicorn re-raises the signal: 143 from bash)."""
        out = self.python(SERVERS, "stop", check=False, timeout=90)
        assert out.returncode == 0, f"a kernelpool serve did not stop: {out.stderr}"
        deadline = time.monotonic() + 30
        while self.status(log) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert self.status(log) in (0, 143), self.log(log)[-6000:]
        assert "Application shutdown complete" in self.log(log)

    def run_code(self, token: str, notebook: str, code: str) -> dict[str, Any]:
        out = self.python(CLIENT, URL, token, notebook, code, python=f"{VENV}/bin/python", timeout=300)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def machine(docker_engine: None) -> Iterator[Machine]:
    if os.geteuid() != 0:
        pytest.skip("the fresh machine needs root: it runs dockerd, debootstrap and apt")
    tag = f"kernelpool-ci-fresh:{RUN}"
    found = Machine(f"{RUN}-fresh")
    pip_cache = os.path.join(CACHE, "fresh-pip-cache")
    os.makedirs(pip_cache, exist_ok=True)
    try:
        import_root(FRESH_ROOT, tag)
        docker("run", "-d", "--name", found.name, "--hostname", "fresh", "--cgroupns=private",
               "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN", "--security-opt", "apparmor=unconfined",
               "--sysctl", "net.ipv4.ip_forward=1", "-v", f"{pip_cache}:/root/.cache/pip", tag,
               "sh", "-c", f"{V1_REMOUNT}; exec sleep infinity")
        # a clean checkout of HEAD, as `git clone` leaves it, in root's home
        archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", "HEAD"], capture_output=True,
                                 check=True, timeout=120).stdout
        docker("exec", found.name, "mkdir", CHECKOUT)
        subprocess.run(["docker", "exec", "-i", found.name, "tar", "-x", "-C", CHECKOUT], input=archive,
                       check=True, capture_output=True, timeout=120)
        yield found
    finally:
        docker("rm", "-f", "-v", found.name, check=False, timeout=120)
        docker("rmi", "-f", tag, check=False)
