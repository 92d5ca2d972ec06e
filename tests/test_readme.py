"""The README's first command, run as written: a fresh venv from /usr/bin/python3, `pip install .`
from a clean copy of the checkout, `kernelpool serve` on its embedded defaults. Then the token it
prints works for a real MCP client, and a kernel of that install imports a package of its venv.

It uses the paths the README names (/opt/kernelpool, ./kernelpool-data, 127.0.0.1:8765), so it
runs where nothing else owns them: in CI, or where /opt/kernelpool does not exist yet. It removes
the venv, the data and the account it created afterwards, also when it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psutil
import pytest

from testkit.client import mcp_client
from testkit.server import ROOT, answers
from tests.conftest import SANDBOX_SKIP

VENV = "/opt/kernelpool"
PORT = 8765


def readme_commands() -> tuple[str, str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```sh\n(.*?)```", f.read(), re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_starts_with_the_two_commands() -> None:
    serve, test = readme_commands()
    assert serve == f"/usr/bin/python3 -m venv {VENV} && {VENV}/bin/pip install . && {VENV}/bin/kernelpool serve"
    assert test == "scripts/test"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert re.search(r"^scripts/test\b", f.read(), re.M), ".ci/run must run the README's test command"


def _port_free() -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", PORT)) != 0


@pytest.fixture
def clean_copy() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("the README's command is written for root (kernels run as other uids)")
    if SANDBOX_SKIP is not None:
        pytest.skip(f"the embedded defaults need isolation, which this host cannot give: {SANDBOX_SKIP}")
    if os.path.exists(VENV) and os.environ.get("CI") != "true":
        pytest.skip(f"{VENV} exists and is not this test's: run in CI, or remove it")
    if not _port_free():
        pytest.skip(f"127.0.0.1:{PORT} is taken by something else")
    shutil.rmtree(VENV, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix="kp-readme-")
    os.chmod(folder, 0o711)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if not os.path.exists(os.path.join(ROOT, name)):
            continue  # deleted in the work tree, not yet committed
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(folder, name))
    try:
        yield folder
    finally:
        data = os.path.join(folder, "kernelpool-data")
        if os.path.exists(os.path.join(VENV, "bin", "kernelpool")) and os.path.exists(data):
            subprocess.run([f"{VENV}/bin/kernelpool", "users", "remove", "default"], cwd=folder,
                           env=_env(), capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(VENV, ignore_errors=True)


def _env() -> dict[str, str]:
    # what a person's shell has: none of the test run's variables
    return {k: v for k, v in os.environ.items() if not k.startswith(("KERNELPOOL_", "PYTHON", "VIRTUAL_ENV"))}


async def test_the_readme_command_installs_and_serves(clean_copy: str) -> None:
    serve, _ = readme_commands()
    log_path = os.path.join(clean_copy, "serve.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "-c", serve], cwd=clean_copy, env=_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # pip installs the dependencies
        token = None
        while time.monotonic() < deadline and token is None:
            assert proc.poll() is None, open(log_path).read()[-5000:]
            m = re.search(r"token \(shown once\):\s+(kp_\S+)", open(log_path).read())
            token = m.group(1) if m else None
            time.sleep(0.5)
        assert token, open(log_path).read()[-5000:]
        url = f"http://127.0.0.1:{PORT}/mcp"
        assert f"MCP URL: {url}" in open(log_path).read()
        while True:  # the token is printed during start-up, before the port is bound
            assert proc.poll() is None and time.monotonic() < deadline, open(log_path).read()[-5000:]
            if answers(f"http://127.0.0.1:{PORT}", timeout=5):
                break
            time.sleep(0.2)
        assert os.path.isfile(os.path.join(clean_copy, "kernelpool-data", "kernelpool.db"))
        async with mcp_client(url, token, mode="auto") as c:
            r = await c.call_tool("use_notebook", {"notebook": "hello.ipynb", "mode": "create"})
            assert not r.is_error, r
            r = await c.call_tool("insert_execute_code_cell", {
                "notebook": "hello.ipynb", "cell_index": -1,
                "cell_source": "import sys, nbformat, numbers\nprint(1+1, nbformat.__file__.startswith(sys.prefix))",
            })
            assert r.structured_content["status"] == "ok", r
            assert "2 True" in "".join(b.text for b in r.content if b.type == "text")
        assert os.path.isfile(os.path.join(clean_copy, "kernelpool-data", "users", "default", "hello.ipynb"))
    finally:
        # SIGTERM to the server alone: the shell runs it as a child or, for the last command of
        # the list, execs it; either way its status comes back through the shell
        shell = psutil.Process(proc.pid)
        for p in (shell, *shell.children()):
            if p.cmdline()[-1:] == ["serve"]:
                p.send_signal(signal.SIGTERM)
        try:
            # uvicorn re-raises the signal it handled once shut down: -15 (or 143 from the shell)
            assert proc.wait(60) in (0, -signal.SIGTERM, 128 + signal.SIGTERM), open(log_path).read()[-5000:]
            assert "Application shutdown complete" in open(log_path).read()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
