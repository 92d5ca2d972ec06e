"""deploy/compose brought up as written: PostgreSQL, three kernelpool replicas and HAProxy, from the
image of this tree (built once for every container test: testkit/docker.py) and two images built
FROM the stand-in Debian base (`apt-get install haproxy`, `postgresql-15`). Debian's docker-compose
1.29; dockerd with the private cgroup-namespace default (Compose 1.29 has no `cgroup:` key).

The test adds only a file publishing each replica on loopback, so that requests can bypass the
proxy on purpose (the 421 and revocation checks). The checks run in order on one deployment:
placement, routing of every request kind of both protocol families for agents of 20 users with
no cross-talk, 421, revocation within a second on every replica, a user moved, a replica killed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx2
import pytest

from testkit.client import mcp_client, text
from testkit.docker import RUN, base_image, docker, image_exists, kernelpool_image
from testkit.server import ROOT, free_port

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="the Compose test needs root: it runs dockerd"),
    pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is missing (apt-get install docker-compose; .ci/run does)"),
]

COMPOSE = os.path.join(ROOT, "deploy", "compose")
REPLICAS = ("kp1", "kp2", "kp3")
USERS = [f"u{i:02d}" for i in range(20)]
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


@dataclass
class Stack:
    project: str
    files: list[str]
    env: dict[str, str]
    port: int
    ports: dict[str, int]
    tokens: dict[str, str] = field(default_factory=dict)
    homes: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def direct(self, replica: str) -> str:
        return f"http://127.0.0.1:{self.ports[replica]}/mcp"

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "-p", self.project, *(a for f in self.files for a in ("-f", f)), *args]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=COMPOSE)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def kp(self, replica: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", replica, "kernelpool", *args, timeout=300, check=check)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def files_of(self, replica: str, user: str) -> dict[str, str]:
        """relative path -> sha256 of every file in the user's folder on `replica` (read as root there)."""
        out = self.compose("exec", "-T", replica, "sh", "-c",
                           f"cd /data/users/{user} && find . -type f ! -path './.ipython/*' ! -path './.local/*' -print0"
                           " | sort -z | xargs -0 -r sha256sum", check=False)
        if out.returncode != 0:
            return {}
        return {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in out.stdout.splitlines() if "  " in line}

    def audit_replicas(self, user: str) -> set[str]:
        rows = [json.loads(r) for r in self.kp("kp1", "audit", "--user", user, "--json").stdout.splitlines()]
        return {r.get("replica") for r in rows if not r["tool"].startswith("auth.")}


def _images(env: dict[str, str]) -> None:
    """The HAProxy and PostgreSQL images of deploy/compose, built once per version of their folders."""
    digest = hashlib.sha256()
    for sub in ("haproxy", "postgres"):
        for name in sorted(os.listdir(os.path.join(COMPOSE, sub))):
            with open(os.path.join(COMPOSE, sub, name), "rb") as f:
                digest.update(name.encode() + f.read())
    key = digest.hexdigest()[:12]
    env["KERNELPOOL_HAPROXY_IMAGE"] = f"kernelpool-ci-haproxy:{key}"
    env["KERNELPOOL_POSTGRES_IMAGE"] = f"kernelpool-ci-postgres:{key}"


def _private_cgroupns_default(base: str) -> bool:
    out = docker("run", "--rm", base, "cat", "/proc/self/cgroup").stdout
    return all(line.endswith(":/") for line in out.splitlines() if line)


@pytest.fixture(scope="module")
def stack(docker_engine: None) -> Iterator[Stack]:
    base = base_image()
    if not _private_cgroupns_default(base):
        pytest.fail("this dockerd gives containers the host's cgroup namespace by default: start it with "
                    "--default-cgroupns-mode private (or that key in /etc/docker/daemon.json); Compose 1.29 cannot ask for it")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNELPOOL_")}
    env.update(KERNELPOOL_IMAGE=kernelpool_image(ROOT), BASE=base, KERNELPOOL_DB_PASSWORD=secrets.token_hex(16),
               KERNELPOOL_PORT=str(free_port()), DOCKER_BUILDKIT="0", COMPOSE_DOCKER_CLI_BUILD="0")
    _images(env)
    ports = {r: free_port() for r in REPLICAS}
    folder = tempfile.mkdtemp(prefix=f"{RUN}-compose-")
    override = os.path.join(folder, "publish-replicas.yml")
    with open(override, "w") as f:  # test only: each replica on loopback too, to bypass the proxy on purpose
        f.write('version: "3.7"\nservices:\n' + "".join(f'  {r}:\n    ports: ["127.0.0.1:{p}:8765"]\n' for r, p in ports.items()))
    s = Stack(f"{RUN}compose", [os.path.join(COMPOSE, "docker-compose.yml"), override], env, int(env["KERNELPOOL_PORT"]), ports)
    try:
        if not (image_exists(env["KERNELPOOL_HAPROXY_IMAGE"]) and image_exists(env["KERNELPOOL_POSTGRES_IMAGE"])):
            s.compose("build", "haproxy", "postgres", timeout=900)
        s.compose("up", "-d", "--no-build")
        _wait_running(s)
        yield s
    finally:
        logs = s.compose("logs", "--no-color", "--tail", "80", check=False)
        print(logs.stdout[-8000:])
        s.compose("down", "-v", "--remove-orphans", "--timeout", "30", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_running(s: Stack, wait: float = 180) -> None:
    deadline = time.monotonic() + wait
    while True:
        out = s.kp("kp1", "replicas", check=False)
        if out.returncode == 0 and out.stdout.count("\trunning\t") == len(REPLICAS):
            try:
                if httpx2.get(f"http://127.0.0.1:{s.port}/healthz", timeout=3).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
        assert time.monotonic() < deadline, (out.stdout, out.stderr, s.compose("logs", "--tail", "40", check=False).stdout)
        time.sleep(1)


def test_twenty_users_are_spread_over_the_replicas(stack: Stack) -> None:
    script = "; ".join(f"kernelpool users add {u}" for u in USERS)
    out = stack.compose("exec", "-T", "kp1", "sh", "-c", f"set -e; {script}", timeout=300)
    tokens = out.stdout.split()
    assert len(tokens) == 20 and all(t.startswith("kp_") for t in tokens), out.stdout
    stack.tokens = dict(zip(USERS, tokens, strict=True))
    for line in stack.kp("kp1", "users", "list").stdout.splitlines():
        fields = line.split("\t")
        stack.homes[fields[0]] = next(f.removeprefix("home=") for f in fields if f.startswith("home="))
    counts = sorted(list(stack.homes.values()).count(r) for r in REPLICAS)
    assert counts == [6, 7, 7], stack.homes  # least loaded first: round and round


async def _agent(stack: Stack, user: str, mode: str) -> list[str]:
    outputs = []
    async with mcp_client(stack.url, stack.tokens[user], mode=mode) as c:
        r = await c.call_tool("use_notebook", {"notebook": "agent.ipynb", "mode": "create"})
        assert not r.is_error or "already exists" in text(r), text(r)
        for i in range(3):
            r = await c.call_tool("insert_execute_code_cell", {"notebook": "agent.ipynb", "cell_index": -1,
                                                               "cell_source": f"print('{user}-{i}')"})
            outputs.append(text(r).strip())
    return outputs


async def test_agents_of_twenty_users_reach_their_homes_with_no_cross_talk(stack: Stack) -> None:
    modes = ["legacy" if i % 2 else "auto" for i in range(len(USERS))]
    results = await asyncio.gather(*(_agent(stack, u, m) for u, m in zip(USERS, modes, strict=True)))
    crossed = [(u, out) for u, outs in zip(USERS, results, strict=True) for i, out in enumerate(outs) if out != f"{u}-{i}"]
    assert crossed == [], crossed
    for user in USERS:  # every call of the user ran on its home, and its notebook holds its own cells only
        assert stack.audit_replicas(user) == {stack.homes[user]}, user
    async with mcp_client(stack.url, stack.tokens["u00"], mode="auto") as c:
        r = await c.call_tool("read_notebook", {"notebook": "agent.ipynb", "response_format": "detailed"})
        assert text(r).count("u00-") >= 3 and "u01-" not in text(r)


def test_initialize_post_get_delete_of_each_replicas_users_reach_their_home(stack: Stack) -> None:
    for replica in REPLICAS:
        user = next(u for u in USERS if stack.homes[u] == replica)
        auth = {"Authorization": f"Bearer {stack.tokens[user]}"}
        with httpx2.Client(headers=ACCEPT | auth, timeout=30) as http:
            r = http.post(stack.url, json=INIT)
            assert r.status_code == 200, r.text
            session = {"mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
            assert http.post(stack.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session).status_code == 202
            assert "execute_code" in http.post(stack.url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=session).text
            with http.stream("GET", stack.url, headers=session | {"Accept": "text/event-stream"}) as stream:
                assert stream.status_code == 200
            assert http.delete(stack.url, headers=session).status_code == 200


def test_a_misrouted_request_is_answered_421(stack: Stack) -> None:
    user = next(u for u in USERS if stack.homes[u] == "kp1")
    r = httpx2.post(stack.direct("kp2"), json=INIT, headers=ACCEPT | {"Authorization": f"Bearer {stack.tokens[user]}"}, timeout=30)
    assert r.status_code == 421, r.text
    assert f"user '{user}' lives on replica 'kp1', and this is replica 'kp2'" in r.json()["error"]["message"]


def test_a_revoked_token_is_refused_on_every_replica_within_a_second(stack: Stack) -> None:
    user = next(u for u in USERS if stack.homes[u] == "kp3")
    token = stack.kp("kp1", "tokens", "create", user).stdout.strip()
    urls = {r: stack.direct(r) for r in REPLICAS} | {"proxy": stack.url}
    for url in urls.values():  # remembered by every replica (its home accepts, the others answer 421)
        assert httpx2.post(url, json=INIT, headers=ACCEPT | {"Authorization": f"Bearer {token}"}, timeout=30).status_code in (200, 421)
    stack.kp("kp2", "tokens", "revoke", token.split("_")[1])
    revoked = time.monotonic()
    pending = dict(urls)
    while pending:
        for name, url in list(pending.items()):
            if httpx2.post(url, json=INIT, headers=ACCEPT | {"Authorization": f"Bearer {token}"}, timeout=30).status_code == 401:
                del pending[name]
        assert time.monotonic() - revoked < 1.0, f"still accepted after a second by {sorted(pending)}"


async def test_a_moved_user_loses_nothing(stack: Stack) -> None:
    user = next(u for u in USERS if stack.homes[u] == "kp1")
    async with mcp_client(stack.url, stack.tokens[user], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "big.ipynb", "mode": "create"})
        r = await c.call_tool("execute_code", {"notebook": "big.ipynb", "code":
                              "import os; os.makedirs('deep/er', exist_ok=True); open('deep/er/blob', 'wb').write(os.urandom(3_000_000))"})
        assert not r.is_error, text(r)
    before = stack.files_of("kp1", user)
    assert {"./agent.ipynb", "./big.ipynb", "./deep/er/blob"} <= set(before), before
    out = stack.kp("kp3", "users", "move", user, "--to", "kp2")
    assert f"moved {user} to kp2" in out.stderr, out.stderr
    assert stack.files_of("kp2", user) == before
    assert stack.files_of("kp1", user) == {}
    stack.homes[user] = "kp2"
    assert stack.kp("kp1", "users", "list").stdout.count(f"{user}\t") == 1
    outputs = await _agent(stack, user, "legacy")
    assert outputs == [f"{user}-{i}" for i in range(3)]
    assert "kp2" in stack.audit_replicas(user)


async def test_a_killed_replica_costs_only_its_users_sessions_and_they_recover(stack: Stack) -> None:
    victim = [u for u in USERS if stack.homes[u] == "kp3"]
    others = [u for u in USERS if stack.homes[u] != "kp3"][:4]
    auth = {"Authorization": f"Bearer {stack.tokens[victim[0]]}"}
    http = httpx2.Client(headers=ACCEPT | auth, timeout=30)
    session = {"mcp-session-id": http.post(stack.url, json=INIT).headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
    docker("kill", stack.container("kp3"))
    results = await asyncio.gather(*(_agent(stack, u, "auto") for u in others))
    assert all(out[-1] == f"{u}-2" for u, out in zip(others, results, strict=True))
    assert _status(http, stack.url, session) >= 500  # HAProxy: the home is down (503, or the connection closed)
    stack.compose("start", "kp3")
    deadline = time.monotonic() + 120
    while (status := _status(http, stack.url, session)) >= 500:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status == 404  # its session died with it: the client initialises again
    http.close()
    for user in victim:
        async with mcp_client(stack.url, stack.tokens[user], mode="legacy") as c:
            r = await c.call_tool("read_notebook", {"notebook": "agent.ipynb", "response_format": "detailed"})
            assert all(f"{user}-{i}" in text(r) for i in range(3)), text(r)
    assert (await _agent(stack, victim[0], "auto"))[-1] == f"{victim[0]}-2"


def _status(http: httpx2.Client, url: str, session: dict[str, str]) -> int:
    """A session's request through the proxy: its status, 599 when the connection was closed unanswered."""
    try:
        return http.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=session).status_code
    except httpx2.TransportError:
        return 599
