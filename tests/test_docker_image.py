"""The image, built and run on this machine with the exact `docker run` line of docs/deployment.md.

No image registry can be reached here, so the base is a stand-in: a Debian bookworm root made with
debootstrap (cached in /var/cache/kernelpool-ci between runs), given the host's CA bundle and
imported with `docker import` (testkit/docker.py); the Dockerfile's `ARG BASE` points the build at
it. The engine is Debian's docker.io (the `docker_engine` fixture: started when none runs, stopped
at the end only if it was started here). Everything it makes carries a per-run name (containers,
images, host folders) and is removed afterwards, also when a test fails.

The tests run in order against one deployment (users, tokens and notebooks made by the earlier
ones are checked after `docker restart`, and after a switch to a derived image on the same volumes).
The last test is on its own: the volumes of the image of an older commit, under today's image.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import nbformat
import pytest

from kernelpool.store import SCHEMA_VERSION
from testkit.client import mcp_client
from testkit.docker import RUN, V1_REMOUNT, base_image, docker, kernelpool_image
from testkit.server import ROOT, free_port

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(os.geteuid() != 0, reason="the image test needs root: it runs dockerd, debootstrap and apt"),
]

EXTRA_PACKAGE = ("tabulate", "0.9.0")  # small, pure Python, not among kernelpool's dependencies
MEMORY_LIMIT = "256M"


def text(result: object) -> str:
    return "".join(c.text for c in result.content if c.type == "text")  # type: ignore[attr-defined]


@dataclass
class Images:
    base: str = ""
    image: str = ""
    derived: str = f"kernelpool-ci-derived:{RUN}"


@pytest.fixture(scope="module")
def images(docker_engine: None) -> Iterator[Images]:
    # the image of this tree is built once and kept for the other container tests (tests/test_compose.py)
    names = Images(base_image(), kernelpool_image(ROOT))
    try:
        yield names
    finally:
        docker("rmi", "-f", names.derived, check=False)


# ---- the documented `docker run` line -----------------------------------------------------------

DEPLOYMENT_DOCS = os.path.join(ROOT, "docs", "deployment.md")


def documented_run_line(markdown: str = DEPLOYMENT_DOCS) -> list[str]:
    """The `docker run` command of docs/deployment.md (or another page), split into arguments."""
    with open(markdown) as f:
        doc = f.read()
    blocks = re.findall(r"```sh\n(.*?)```", doc, re.S)
    block = next(b for b in blocks if "docker run " in b)
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("docker run "))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(command))


def swap_run_line(args: list[str], name: str, port: int, volumes: dict[str, str], image: str) -> list[str]:
    """The documented line with only the container name, host port, host folders and image swapped.
    `volumes` maps a container path to its host folder; every `-v` of the line must be in it."""
    assert args[:2] == ["docker", "run"], args
    out, i, swapped = ["docker", "run"], 2, set()
    while i < len(args):
        arg = args[i]
        if arg in ("--name", "-p", "-v") and i + 1 < len(args):
            value = args[i + 1]
            if arg == "--name":
                value = name
            elif arg == "-p":
                host_ip, _, container_port = value.split(":")
                assert host_ip == "127.0.0.1", "the documented port is published on loopback only"
                value = f"{host_ip}:{port}:{container_port}"
            else:
                _, target = value.split(":", 1)
                value = f"{volumes[target]}:{target}"
            swapped.add(arg)
            out += [arg, value]
            i += 2
        elif i == len(args) - 1:
            assert arg.startswith("kernelpool:"), f"the image is the last argument: {arg}"
            out.append(image)
            i += 1
        else:
            out.append(arg)
            i += 1
    assert swapped == {"--name", "-p", "-v"}, args
    return out


@dataclass
class Deployment:
    images: Images
    volumes: dict[str, str]
    run_line: list[str] = field(default_factory=list)
    name: str = ""
    port: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    uids: dict[str, int] = field(default_factory=dict)
    containers: list[str] = field(default_factory=list)
    prefix: str = RUN  # of the container names; one per Deployment of a run

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def host_path(self, user: str, *parts: str) -> str:
        return os.path.join(self.volumes[f"/data/users/{user}"], *parts)

    def run(self, image: str, docs: str = DEPLOYMENT_DOCS, command: tuple[str, ...] = ()) -> None:
        """Start a container of `image` with the line documented in `docs` (and `command` after
        the image, if given), and wait for /healthz."""
        self.name = f"{self.prefix}-{len(self.containers)}"
        self.port = free_port()
        line = swap_run_line(documented_run_line(docs), self.name, self.port, self.volumes, image) + list(command)
        self.containers.append(self.name)
        docker(*line[1:])
        self.run_line = line
        self.wait_healthz()

    def wait_healthz(self, wait: float = 90) -> None:
        deadline = time.monotonic() + wait
        while True:
            state = json.loads(docker("inspect", "--format", "{{json .State}}", self.name).stdout)
            assert state["Status"] in ("running", "created", "restarting"), (state, self.logs())
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"no /healthz in {wait} s:\n{self.logs()}"
            time.sleep(0.3)

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *args, check=check)

    def logs(self) -> str:
        out = docker("logs", self.name, check=False)
        return (out.stdout + out.stderr)[-6000:]

    def add_user(self, user: str) -> None:
        out = self.exec("kernelpool", "users", "add", user)
        token = out.stdout.strip()
        assert token.startswith("kp_") and "\n" not in token, out
        self.tokens[user] = token
        listed = self.exec("kernelpool", "users", "list").stdout
        found = re.search(rf"^{user}\tuid=(\d+)", listed, re.M)
        assert found, listed
        self.uids[user] = int(found.group(1))


@pytest.fixture(scope="module")
def dep(images: Images) -> Iterator[Deployment]:
    top = f"/tmp/{RUN}"
    volumes = {"/data": f"{top}/state"}
    for target in documented_volume_targets():
        if target != "/data":
            volumes[target] = f"{top}/{os.path.basename(target)}"
    for path in volumes.values():
        os.makedirs(path)
    deployment = Deployment(images, volumes)
    try:
        deployment.run(images.image)
        for user in ("alice", "bob"):
            deployment.add_user(user)
        # before alice has any kernel: limits apply to kernels started later, warm ones included
        deployment.exec("kernelpool", "users", "set-limits", "alice", "--memory", MEMORY_LIMIT)
        yield deployment
    finally:
        for name in deployment.containers:
            docker("rm", "-f", "-v", name, check=False)
        shutil.rmtree(top, ignore_errors=True)


def documented_volume_targets() -> list[str]:
    line = documented_run_line()
    return [line[i + 1].split(":", 1)[1] for i, arg in enumerate(line) if arg == "-v"]


def test_documented_line_is_what_runs() -> None:
    """The line parsed from the docs is the documented one: per-user volumes, the privileges of
    the table, a private cgroup namespace, a stop timeout, loopback publishing."""
    line = documented_run_line()
    assert documented_volume_targets() == ["/data", "/data/users/alice", "/data/users/bob"]
    for flag in ("--cgroupns=private", "--cap-drop=ALL", "--cap-add=SYS_ADMIN", "--stop-timeout", "-d"):
        assert flag in line, line
    assert "--privileged" not in line
    swapped = swap_run_line(line, "n", 1234, {t: f"/x{t}" for t in documented_volume_targets()}, "img:1")
    assert len(swapped) == len(line) and swapped[-1] == "img:1" and "127.0.0.1:1234:8765" in swapped


# ---- the checks, in order -----------------------------------------------------------------------

async def test_users_and_tokens_via_docker_exec(dep: Deployment) -> None:
    logs = dep.logs()
    assert "mounted cgroup v1 memory read-write" in logs or "remounted /sys/fs/cgroup read-write" in logs, logs
    assert re.search(r"kp_\S+", logs), "the first start prints the token of the user it created"
    doctor = dep.exec("kernelpool", "doctor").stdout
    assert re.search(r"cgroups:\s+v[12] .*writable=yes", doctor), doctor
    assert "in force:            sandbox" in doctor, doctor
    assert set(dep.uids) == {"alice", "bob"} and dep.uids["alice"] != dep.uids["bob"]

    created = dep.exec("kernelpool", "tokens", "create", "alice", "--expires", "30d").stdout.strip()
    assert created.startswith("kp_")
    listed = dep.exec("kernelpool", "tokens", "list", "alice").stdout
    assert created not in listed and dep.tokens["alice"] not in listed  # ids and states, never secrets
    async with mcp_client(dep.url, created, mode="auto") as c:
        r = await c.call_tool("list_notebooks", {})
        assert not r.is_error, text(r)
    dep.exec("kernelpool", "tokens", "revoke", created.split("_")[1])
    revoked_at = time.monotonic()
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    accept = {"Accept": "application/json, text/event-stream"}
    for token in (None, "kp_nope"):
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        assert httpx2.post(dep.url, json=body, headers=accept | auth).status_code == 401, token
    # the server remembers accepted tokens; a revocation counts within a second
    while (status := httpx2.post(dep.url, json=body, headers=accept | {"Authorization": f"Bearer {created}"}).status_code) != 401:
        assert time.monotonic() - revoked_at < 1.0, f"the revoked token still works ({status})"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_mcp_clients_from_the_host_write_notebooks_on_user_volumes(dep: Deployment, mode: str) -> None:
    for user in ("alice", "bob"):
        nb = f"{mode}-{user}.ipynb"
        async with mcp_client(dep.url, dep.tokens[user], mode=mode) as c:
            r = await c.call_tool("use_notebook", {"notebook": nb, "mode": "create"})
            assert not r.is_error, text(r)
            args = {"cell_index": -1, "cell_source": "import os; print(os.getuid(), os.getcwd())"}
            if mode == "auto":  # sessionless: no active notebook, every call names it
                args["notebook"] = nb
            r = await c.call_tool("insert_execute_code_cell", args)
            assert not r.is_error, text(r)
            assert text(r).strip() == f"{dep.uids[user]} /data/users/{user}"
        path = dep.host_path(user, nb)
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (dep.uids[user], dep.uids[user])
        folder = os.stat(dep.host_path(user))
        assert folder.st_uid == dep.uids[user] and folder.st_mode & 0o777 == 0o700
        saved = nbformat.read(path, as_version=4)
        nbformat.validate(saved)
        assert saved.cells[-1].outputs[0]["text"].strip() == f"{dep.uids[user]} /data/users/{user}"


async def test_kernel_imports_the_image_venv_and_shows_ordinary_tracebacks(dep: Deployment) -> None:
    code = ("import sys, json, aiosqlite, stack_data\n"
            "print(json.dumps({'path': sys.path, 'aiosqlite': aiosqlite.__file__}))")
    async with mcp_client(dep.url, dep.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "imports.ipynb", "mode": "create"})
        r = await c.call_tool("execute_code", {"notebook": "imports.ipynb", "code": code})
        assert not r.is_error, text(r)
        got = json.loads(text(r).strip().splitlines()[-1])
        assert "/opt/venv/lib/python3.11/site-packages" in got["path"], got
        assert got["aiosqlite"].startswith("/opt/venv/lib/python3.11/site-packages/"), got
        r = await c.call_tool("execute_code", {"notebook": "imports.ipynb", "code": "def f():\n    return 1/0\nf()"})
        tb = text(r)
        assert "ZeroDivisionError" in tb and "return 1/0" in tb, tb
        assert "Unexpected exception formatting exception" not in tb, tb


async def test_one_users_kernel_cannot_write_another_users_volume(dep: Deployment) -> None:
    # bob has something on his volume first, so a listing that shows it would be caught
    async with mcp_client(dep.url, dep.tokens["bob"], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": "bobs-own.ipynb", "mode": "create"})
        assert not r.is_error or "already exists" in text(r), text(r)
    bobs = set(os.listdir(dep.host_path("bob")))
    assert "bobs-own.ipynb" in bobs
    code = ("import json, os\nres = {}\n"
            "for what, fn in [('write', lambda: open('/data/users/bob/from-alice.txt', 'w')),\n"
            "                 ('list', lambda: os.listdir('/data/users/bob')),\n"
            "                 ('chmod', lambda: os.chmod('/data/users/bob', 0o777))]:\n"
            "    try:\n        out = fn(); res[what] = out if isinstance(out, list) else 'done'\n"
            "    except OSError as e:\n        res[what] = type(e).__name__\n"
            "print(json.dumps(res))")
    async with mcp_client(dep.url, dep.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "reach.ipynb", "mode": "create"})
        r = await c.call_tool("execute_code", {"notebook": "reach.ipynb", "code": code})
        assert not r.is_error, text(r)
    got = json.loads(text(r).strip().splitlines()[-1])
    assert got["write"] == "PermissionError" and got["chmod"] == "PermissionError", got
    # bob's volume is detached in alice's mount namespace: at most the empty folder it was mounted
    # on (root's, on the state volume) is left to list, with none of bob's files in it
    assert got["list"] == "PermissionError" or (isinstance(got["list"], list) and not set(got["list"]) & bobs), got
    assert not os.path.exists(dep.host_path("bob", "from-alice.txt"))
    assert os.stat(dep.host_path("bob")).st_mode & 0o777 == 0o700


async def test_kernel_sees_only_its_own_names_ipc_and_queues_inside_the_container(dep: Deployment) -> None:
    # Docker gives the container a mqueue at /dev/mqueue and binds /etc/hosts, /etc/resolv.conf and
    # /etc/hostname into /etc, and the container's root is itself an overlay: the kernel's views on top
    dep.exec("sh", "-c", "touch /dev/mqueue/kp-container-queue")  # a POSIX queue of the container's
    hosts = dep.exec("cat", "/etc/hosts").stdout
    code = ("import json, os, pwd\n"
            "print(json.dumps({'users': sorted(e.pw_name for e in pwd.getpwall()), 'hosts': open('/etc/hosts').read(),\n"
            "  'resolv': os.path.getsize('/etc/resolv.conf'), 'mqueue': os.listdir('/dev/mqueue'),\n"
            "  'net': sorted(os.listdir('/sys/class/net')), 'shm': open('/proc/sysvipc/shm').read().splitlines()[1:],\n"
            "  'netns': os.listdir('/run/netns'), 'me': pwd.getpwuid(os.getuid()).pw_dir}))")
    async with mcp_client(dep.url, dep.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "names.ipynb", "mode": "create"})
        r = await c.call_tool("execute_code", {"notebook": "names.ipynb", "code": code})
        assert not r.is_error, text(r)
    got = json.loads(text(r).strip().splitlines()[-1])
    assert got["users"] == ["kp-alice", "nobody", "root"], got["users"]
    assert got["me"] == "/data/users/alice"
    assert got["hosts"] == hosts and got["resolv"] > 0, "Docker's files in /etc still show through"
    assert got["mqueue"] == [] and got["shm"] == [] and got["netns"] == [], got
    assert got["net"] == ["eth0", "lo"], got["net"]
    dep.exec("rm", "-f", "/dev/mqueue/kp-container-queue")


async def test_memory_limit_kills_the_kernel_inside_the_container(dep: Deployment) -> None:
    assert f"kernel_memory={MEMORY_LIMIT}" in dep.exec("kernelpool", "users", "list").stdout
    async with mcp_client(dep.url, dep.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "oom.ipynb", "mode": "create"})
        r = await c.call_tool("insert_execute_code_cell", {
            "notebook": "oom.ipynb", "cell_index": -1,
            "cell_source": "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 2**20))",
        })
        assert r.is_error, text(r)
        assert r.structured_content["status"] == "died", r.structured_content
        msg = r.structured_content["message"]
        assert "out of memory" in msg and "256 MiB" in msg, msg
        r = await c.call_tool("execute_code", {"notebook": "oom.ipynb", "code": "'blocks' in dir()"})
        assert text(r) == "False"  # a fresh kernel
    async with mcp_client(dep.url, dep.tokens["bob"], mode="auto") as b:
        r = await b.call_tool("execute_code", {"notebook": "auto-bob.ipynb", "code": "21 * 2"})
        assert text(r) == "42"  # bob's kernel lived through it


def test_healthcheck_reports_healthy(dep: Deployment) -> None:
    # the image checks every 30 s; the first result comes after one interval
    deadline = time.monotonic() + 120
    while True:
        health = json.loads(docker("inspect", "--format", "{{json .State.Health}}", dep.name).stdout)
        if health["Status"] == "healthy":
            break
        assert health["Status"] == "starting" and time.monotonic() < deadline, health
        time.sleep(2)
    assert health["Log"][-1]["ExitCode"] == 0, health


async def test_restart_keeps_tokens_and_notebooks(dep: Deployment) -> None:
    before = {u: Path(dep.host_path(u, f"legacy-{u}.ipynb")).read_text() for u in ("alice", "bob")}
    docker("restart", dep.name, timeout=120)
    dep.wait_healthz()
    assert docker("inspect", "--format", "{{.RestartCount}} {{.State.Status}}", dep.name).stdout.split()[1] == "running"
    for user in ("alice", "bob"):
        assert Path(dep.host_path(user, f"legacy-{user}.ipynb")).read_text() == before[user]
        async with mcp_client(dep.url, dep.tokens[user], mode="legacy") as c:
            r = await c.call_tool("read_notebook", {"notebook": f"legacy-{user}.ipynb", "response_format": "detailed"})
            assert not r.is_error, text(r)
            assert f"{dep.uids[user]} /data/users/{user}" in text(r)
            r = await c.call_tool("execute_cell", {"notebook": f"legacy-{user}.ipynb", "cell_index": -1})
            assert not r.is_error and text(r).strip() == f"{dep.uids[user]} /data/users/{user}", text(r)
    listed = dep.exec("kernelpool", "users", "list").stdout
    assert re.search(rf"^alice\tuid={dep.uids['alice']}\b", listed, re.M), listed


async def test_stop_is_clean_and_well_within_the_stop_timeout(dep: Deployment) -> None:
    line = dep.run_line
    stop_timeout = int(line[line.index("--stop-timeout") + 1])
    async with mcp_client(dep.url, dep.tokens["alice"], mode="auto") as c:  # a kernel is running
        r = await c.call_tool("execute_code", {"notebook": "legacy-alice.ipynb", "code": "x = 1"})
        assert not r.is_error, text(r)
    started = time.monotonic()
    docker("stop", dep.name, timeout=stop_timeout + 60)
    took = time.monotonic() - started
    state = json.loads(docker("inspect", "--format", "{{json .State}}", dep.name).stdout)
    assert state["Status"] == "exited" and state["ExitCode"] == 0, (state, dep.logs())
    assert not state["OOMKilled"]
    assert took < stop_timeout / 2, f"docker stop took {took:.1f} s of its {stop_timeout} s"
    logs = dep.logs()
    assert "Application shutdown complete" in logs and "Traceback" not in logs, logs


async def test_derived_image_gives_kernels_its_package(dep: Deployment) -> None:
    """`FROM kernelpool` + `RUN pip install X`, run with the same line on the same volumes (an
    upgrade in place): X imports in kernels; users, tokens and notebooks are all still there."""
    pkg, version = EXTRA_PACKAGE
    if docker("inspect", "--format", "{{.State.Running}}", dep.name).stdout.strip() == "true":
        docker("stop", dep.name, timeout=120)  # one server per data folder
    # and the documented way to add a kernel (docs/deployment.md), in the same build: one extra kernel
    dockerfile = documented_kernel_dockerfile(dep.images.image) + f"RUN pip install {pkg}=={version}\n"
    docker("build", "-t", dep.images.derived, "-", input=dockerfile, timeout=600,
           env=dict(os.environ, DOCKER_BUILDKIT="0"))
    dep.run(dep.images.derived)
    async with mcp_client(dep.url, dep.tokens["alice"], mode="auto") as c:
        r = await c.call_tool("execute_code", {
            "notebook": "legacy-alice.ipynb",
            "code": f"import {pkg}; print({pkg}.__version__, {pkg}.__file__)",
        })
        assert not r.is_error, text(r)
        got_version, got_file = text(r).split()
        assert got_version == version and got_file.startswith("/opt/venv/lib/python3.11/site-packages/"), text(r)
        r = await c.call_tool("read_notebook", {"notebook": "oom.ipynb"})
        assert not r.is_error, text(r)
        r = await c.call_tool("list_kernelspecs", {})
        assert [k["name"] for k in r.structured_content["kernelspecs"]] == ["python3", "bash"], text(r)
        r = await c.call_tool("use_notebook", {"notebook": "sh.ipynb", "mode": "create", "kernel": "bash"})
        assert not r.is_error, text(r)
        r = await c.call_tool("execute_code", {"notebook": "sh.ipynb", "code": "id -u; ls /proc | grep -c '^[0-9]'"})
        assert not r.is_error, text(r)
        uid, processes = text(r).split()
        assert int(uid) == dep.uids["alice"] and int(processes) < 10, text(r)
    with open(dep.host_path("alice", "sh.ipynb")) as f:
        assert json.load(f)["metadata"]["kernelspec"]["name"] == "bash"
    docker("stop", dep.name, timeout=120)


def documented_kernel_dockerfile(image: str) -> str:
    """The Dockerfile of docs/deployment.md that adds a kernel, FROM `image`."""
    with open(DEPLOYMENT_DOCS) as f:
        blocks = re.findall(r"```dockerfile\n(.*?)```", f.read(), re.S)
    block = next(b for b in blocks if "KERNELPOOL_KERNELSPECS" in b)
    return re.sub(r"^FROM \S+", f"FROM {image}", block, count=1, flags=re.M)


# ---- an upgrade: the old image's volumes under the new image -----------------------------------

OLD_COMMIT = "bcda1e3"  # the data format before schema versions (as tests/test_upgrade.py)

# The old entry script only makes a read-only cgroup2 tree writable; on a cgroup v1 host (this one)
# its server then refuses to start ("this host cannot isolate kernels"). What the old container
# is given instead is the least that still makes a real old deployment: the command after the
# image (its entry script runs anything that is not a kernelpool command as given) first does what
# today's entry script does on v1 -- unmount each read-only controller mount and mount it afresh
# read-write, only for mounts that are read-only v1 ones, so a v2 host gets the old script's own
# remount -- and then execs the old entry script with `serve`. The image, the documented flags and
# the server are bcda1e3's own, and its kernels run sandboxed as the users' uids, so the data
# folder is what that version writes in production. KERNELPOOL_INSECURE_NO_SANDBOX=true would also
# start it, but then kernels run as root and the folder is not what users of that image have.
OLD_V1_CGROUPS = ("sh", "-c", f"set -e; {V1_REMOUNT}; exec kernelpool-entrypoint serve")


def _build_old_image(base: str, tag: str, src: str) -> str:
    """The image of OLD_COMMIT, from its own tree and Dockerfile; returns that tree's deployment page."""
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{OLD_COMMIT}^{{commit}}"],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} is not in this clone's history: {rev.stderr.strip()}")
    archive = subprocess.run(["git", "-C", ROOT, "archive", OLD_COMMIT], capture_output=True, check=True, timeout=60)
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True, timeout=60)
    dockerfile = os.path.join(src, "Dockerfile")
    with open(dockerfile) as f:
        lines = f.read().splitlines(keepends=True)
    froms = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(froms) == 1 and lines[froms[0]].startswith("FROM python:3.11"), froms
    # No registry here: the old Dockerfile's `FROM python:3.11...` (it has no BASE argument yet) is
    # pointed at the stand-in base of this run, in the extracted copy only. The stand-in is never
    # tagged with the official image's name.
    lines[froms[0]] = f"FROM {base}\n"
    with open(dockerfile, "w") as f:
        f.writelines(lines)
    docker("build", "-t", tag, src, timeout=900, env=dict(os.environ, DOCKER_BUILDKIT="0"))
    return os.path.join(src, "docs", "deployment.md")


async def test_old_images_volumes_upgrade_under_the_new_image(images: Images) -> None:
    """A deployment of bcda1e3's image (its Dockerfile, its documented `docker run` line) makes
    users, tokens, a notebook and audit rows; the container is removed and today's image runs with
    today's documented line on the same host folders: all of it is still there and works."""
    top = f"/tmp/{RUN}-upgrade"
    old_tag = f"kernelpool-ci-old:{RUN}"
    volumes = {"/data": f"{top}/state"}
    for target in documented_volume_targets():
        if target != "/data":
            volumes[target] = f"{top}/{os.path.basename(target)}"
    for path in volumes.values():
        os.makedirs(path)
    os.makedirs(f"{top}/src")
    dep = Deployment(images, volumes, prefix=f"{RUN}-up")
    nb = "upgrade.ipynb"
    cell = "import os; print(os.getuid())"
    try:
        old_docs = _build_old_image(images.base, old_tag, f"{top}/src")
        old_line = documented_run_line(old_docs)
        assert [line_arg for line_arg in old_line if line_arg.startswith("--cap-add=NET_ADMIN")] == []  # the old line indeed
        assert [old_line[i + 1].split(":", 1)[1] for i, a in enumerate(old_line) if a == "-v"] == documented_volume_targets()

        # --- the old image: users, tokens, a notebook with an executed cell, audit rows
        dep.run(old_tag, docs=old_docs, command=OLD_V1_CGROUPS)
        assert "cannot isolate" not in dep.logs()
        assert "in force:            sandbox" in dep.exec("kernelpool", "doctor").stdout
        for user in ("alice", "bob"):
            dep.add_user(user)
        spare = dep.exec("kernelpool", "tokens", "create", "alice", "--expires", "30d").stdout.strip()
        assert spare.startswith("kp_"), spare
        for user in ("alice", "bob"):
            async with mcp_client(dep.url, dep.tokens[user], mode="legacy") as c:
                r = await c.call_tool("use_notebook", {"notebook": nb, "mode": "create"})
                assert not r.is_error, text(r)
                r = await c.call_tool("insert_execute_code_cell", {"cell_index": -1, "cell_source": cell})
                assert not r.is_error and text(r).strip() == str(dep.uids[user]), text(r)
            assert os.stat(dep.host_path(user, nb)).st_uid == dep.uids[user]
        users_before = dep.exec("kernelpool", "users", "list").stdout
        audit_before = dep.exec("kernelpool", "audit", "--json").stdout.splitlines()
        assert sum(json.loads(row)["tool"] == "insert_execute_code_cell" for row in audit_before) == 2, audit_before
        uids_before = dict(re.findall(r"^(\w+)\tuid=(\d+)", users_before, re.M))
        assert set(uids_before) >= {"alice", "bob"}, users_before
        docker("stop", dep.name, timeout=120)
        docker("rm", "-v", dep.name)
        with sqlite3.connect(f"file:{volumes['/data']}/kernelpool.db?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 0, "not the old data format"
        db.close()

        # --- today's image and documented line, on the same host folders
        dep.run(images.image)
        for user, token in (("alice", dep.tokens["alice"]), ("alice", spare), ("bob", dep.tokens["bob"])):
            async with mcp_client(dep.url, token, mode="legacy") as c:
                r = await c.call_tool("read_notebook", {"notebook": nb, "response_format": "detailed"})
                assert not r.is_error and cell in text(r) and str(dep.uids[user]) in text(r), text(r)
                r = await c.call_tool("execute_cell", {"notebook": nb, "cell_index": 0})
                assert not r.is_error and text(r).strip() == str(dep.uids[user]), (text(r), dep.logs())
            st = os.stat(dep.host_path(user, nb))
            assert (st.st_uid, st.st_gid) == (dep.uids[user], dep.uids[user])
        # the kernels above ran in today's per-user network namespaces (the documented line's
        # NET_ADMIN and ip_forward), not in a fallback
        doctor = dep.exec("kernelpool", "doctor").stdout
        network = next(line for line in doctor.splitlines() if line.startswith("network in force:"))
        print(f"\nafter the upgrade, {network}")
        assert "egress: a network namespace per user" in network and "installed" in network, doctor
        assert re.search(r"; [1-9]\d* user namespace\(s\) live", network), doctor
        users_after = dep.exec("kernelpool", "users", "list").stdout
        assert dict(re.findall(r"^(\w+)\tuid=(\d+)", users_after, re.M)) == uids_before, (users_before, users_after)
        audit_after = dep.exec("kernelpool", "audit", "--json").stdout.splitlines()
        assert audit_after[: len(audit_before)] == audit_before
        assert sum(json.loads(row)["tool"] == "execute_cell" for row in audit_after[len(audit_before):]) == 3
        docker("stop", dep.name, timeout=120)
        with sqlite3.connect(f"file:{volumes['/data']}/kernelpool.db?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.close()
    finally:
        for name in dep.containers:
            docker("rm", "-f", "-v", name, check=False)
        docker("rmi", "-f", old_tag, check=False)
        shutil.rmtree(top, ignore_errors=True)
