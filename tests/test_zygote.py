"""The fork server (zygote): kernels forked from it are sandboxed like spawned ones, look like
them from the inside, share nothing across users, and survive or report the zygote's death.

Real servers, real kernels. Tests that check uids and cgroups need root and writable cgroups
(skipped, with the reason, elsewhere); the rest also run in the insecure single-user mode.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from kernelpool.kernels.zygote.server import ForkServer, ZygoteProcess
from sandbox import LaunchError, LaunchSpec
from testkit.client import mcp_client
from testkit.server import KernelpoolServer, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

needs_sandbox = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"needs isolation: {SANDBOX_SKIP}")

PROBE = '''
import json, os, sys, tempfile, random, __main__
def _fd(n):
    try:
        t = os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        return "?"
    return t.split(":")[0] if ":" in t else t
status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
print(json.dumps({
  "pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
  "res": os.getresuid(), "resg": os.getresgid(), "groups": os.getgroups(), "nnp": status["NoNewPrivs"].strip(),
  "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path, "argv": sys.argv[1:],
  "executable": sys.executable, "tmp": tempfile.gettempdir(), "main": __main__.__name__,
  "home": os.path.expanduser("~"), "random": random.random(), "urandom": os.urandom(8).hex(),
  "fds": sorted(set(_fd(int(n)) for n in os.listdir("/proc/self/fd"))),
  "fd_targets": [os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{n}")],
  "stdio": [os.readlink(f"/proc/self/fd/{n}") for n in (0, 1, 2)],
  "cgroup": open("/proc/self/cgroup").read(),
  "parent_visible": os.path.exists(f"/proc/{os.getppid()}"),
}))
'''


def text(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


async def probe(server: KernelpoolServer, user: str, notebook: str) -> dict:
    async with mcp_client(server.url, server.tokens[user], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": notebook, "mode": "create"})
        assert not r.is_error or "already exists" in text(r), text(r)
        r = await c.call_tool("execute_code", {"notebook": notebook, "code": PROBE})
        assert not r.is_error, text(r)
    got = json.loads(text(r).strip().splitlines()[-1])
    # seen from the host: a sandboxed kernel's /proc hides its parent (root's) from it
    got["parent"] = " ".join(psutil.Process(got["ppid"]).cmdline())
    got["host_cgroup"] = Path(f"/proc/{got['pid']}/cgroup").read_text()
    return got


def zygote_of(server: KernelpoolServer) -> psutil.Process | None:
    assert server.proc is not None
    for child in psutil.Process(server.pid).children():
        try:
            if "kernelpool.kernels.zygote.child" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


_servers = 0


def new_server(server_args: list[str], users: tuple[str, ...] = ("alice", "bob"), **env: str) -> KernelpoolServer:
    # each server its own account prefix, uid range and cgroup prefix: several run in this module
    global _servers
    _servers += 1
    n = _servers
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_ACCOUNT_PREFIX=f"kpz{os.getpid() % 10000}{n}-",
        KERNELPOOL_UID_MIN=str(63000 + 50 * n), KERNELPOOL_UID_MAX=str(63000 + 50 * n + 49),
        KERNELPOOL_CGROUP_PREFIX=f"kernelpool-zytest-{os.getpid()}-{n}",
        KERNELPOOL_PROGRESS_INTERVAL="1", **env,
    ))
    try:
        for user in users:
            server.add_user(user)
        server.start(*server_args)
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="module")
def zy(server_args: list[str]) -> Iterator[KernelpoolServer]:
    """A server with the fork server on (the default) and a warm pool of one kernel per user."""
    server = new_server(server_args, KERNELPOOL_POOL_SIZE="1", KP_SERVER_ONLY_SECRET="s3cr3t-of-the-server")
    try:
        yield server
    finally:
        server.cleanup()


# ---- through the server ----------------------------------------------------------------------

async def test_kernels_are_forked_by_the_zygote(zy: KernelpoolServer) -> None:
    zygote = zygote_of(zy)
    assert zygote is not None, zy.log()
    got = await probe(zy, "alice", "forked.ipynb")
    assert got["ppid"] == zygote.pid
    assert "kernelpool.kernels.zygote.child" in got["parent"]
    assert got["pgid"] == got["pid"] == got["sid"], "the kernel leads its own session and process group"
    # nothing the zygote holds open (its control socket, its wakeup pipe) is open in the kernel
    zygote_fds = {os.readlink(f"/proc/{zygote.pid}/fd/{n}") for n in os.listdir(f"/proc/{zygote.pid}/fd")}
    shared = zygote_fds & set(got["fd_targets"]) - {"/dev/null"}
    assert not {t for t in shared if t.startswith(("socket:", "pipe:"))}, shared


@needs_sandbox
async def test_forked_kernel_runs_as_the_user_in_its_cgroup(zy: KernelpoolServer) -> None:
    got = await probe(zy, "alice", "sandboxed.ipynb")
    account = pwd.getpwnam(f"{zy.env['KERNELPOOL_ACCOUNT_PREFIX']}alice")
    assert got["res"] == [account.pw_uid] * 3 and got["resg"] == [account.pw_gid] * 3
    assert got["groups"] == [] and got["nnp"] == "1"
    assert got["parent_visible"] is False, "the zygote (root) is hidden from the kernel's /proc"
    # seen from the host: in the user's cgroup, named by uid, never by name
    for controller in ("memory", "pids"):
        line = next(line for line in got["host_cgroup"].splitlines() if f":{controller}:" in line)
        assert f"/{zy.env['KERNELPOOL_CGROUP_PREFIX']}/u{account.pw_uid}/k" in line, line
        assert "alice" not in line
    # seen from inside: its own cgroup namespace, rooted at the kernel's cgroup
    assert all(line.endswith(":/") for line in got["cgroup"].splitlines()), got["cgroup"]
    zygote = zygote_of(zy)
    assert zygote is not None and zygote.uids().real == 0, "the zygote stays root; only its children drop"


@needs_sandbox
async def test_pool_kernels_never_go_to_another_user(zy: KernelpoolServer) -> None:
    alice = pwd.getpwnam(f"{zy.env['KERNELPOOL_ACCOUNT_PREFIX']}alice").pw_uid
    bob = pwd.getpwnam(f"{zy.env['KERNELPOOL_ACCOUNT_PREFIX']}bob").pw_uid
    await probe(zy, "alice", "pool-a1.ipynb")  # alice is active: her pool gets a warm kernel
    zygote = zygote_of(zy)
    assert zygote is not None

    def alice_kernels() -> set[int]:
        return {p.pid for p in zygote.children() if p.uids().real == alice}

    used = {(await probe(zy, "alice", "pool-a1.ipynb"))["pid"]}
    warm = wait_for(lambda: alice_kernels() - used, what="alice's warm kernel")
    for i in range(3):
        got = await probe(zy, "bob", f"pool-b{i}.ipynb")
        assert got["res"][0] == bob and got["pid"] not in warm | used
    got = await probe(zy, "alice", "pool-a2.ipynb")
    assert got["res"][0] == alice


async def test_random_and_urandom_differ_between_forked_kernels(zy: KernelpoolServer) -> None:
    a = await probe(zy, "alice", "rand-1.ipynb")
    b = await probe(zy, "alice", "rand-2.ipynb")
    c = await probe(zy, "bob", "rand-3.ipynb")
    assert len({a["pid"], b["pid"], c["pid"]}) == 3
    assert len({a["random"], b["random"], c["random"]}) == 3
    assert len({a["urandom"], b["urandom"], c["urandom"]}) == 3


async def test_no_server_environment_reaches_the_zygote_or_its_kernels(zy: KernelpoolServer) -> None:
    got = await probe(zy, "bob", "env.ipynb")
    assert "KP_SERVER_ONLY_SECRET" not in got["env"]
    assert not [k for k in got["env"] if k.startswith("KERNELPOOL")]
    zygote = zygote_of(zy)
    assert zygote is not None
    zenv = zygote.environ()
    assert "KP_SERVER_ONLY_SECRET" not in zenv and not [k for k in zenv if k.startswith("KERNELPOOL")]
    if os.geteuid() == 0:
        with open(f"/proc/{got['pid']}/environ", "rb") as f:
            assert b"s3cr3t-of-the-server" not in f.read()


async def test_forked_kernel_looks_like_a_stock_one(zy: KernelpoolServer, server_args: list[str]) -> None:
    """Same argv, environment, paths, working folder, stdio and kinds of open descriptors."""
    stock_server = new_server(server_args, users=("alice",), KERNELPOOL_POOL_SIZE="0", KERNELPOOL_FORK_SERVER="false")
    try:
        assert zygote_of(stock_server) is None
        stock = await probe(stock_server, "alice", "same.ipynb")
    finally:
        stock_server.cleanup()
    forked = await probe(zy, "alice", "same.ipynb")
    assert "kernelpool.kernels.zygote.child" not in stock["parent"]

    def norm(d: dict, server: KernelpoolServer) -> dict:
        raw = json.dumps({k: d[k] for k in ("env", "path", "argv", "executable", "tmp", "main", "home", "cwd", "stdio", "fds", "cgroup", "parent_visible")})
        raw = raw.replace(server.data_dir, "DATA").replace(server.env["KERNELPOOL_ACCOUNT_PREFIX"], "PREFIX")
        # uids and kernel ids differ: DATA/run/<uid>/<kernel id>/...
        raw = re.sub(r"DATA/run/\d+/[0-9a-f]{12}/", "DATA/run/UID/KID/", raw)
        raw = re.sub(r"DATA/run/\d+/", "DATA/run/UID/", raw)
        out = json.loads(raw)
        out["stdio"] = [s.split(":")[0] for s in out["stdio"]]  # ipykernel pipes fd 1 and 2
        return out

    a, b = norm(forked, zy), norm(stock, stock_server)
    for key in a:
        assert a[key] == b[key], f"{key}: forked {a[key]} != stock {b[key]}"


async def test_killed_zygote_is_restarted_and_its_kernels_live_on(server_args: list[str]) -> None:
    server = new_server(server_args, users=("alice",), KERNELPOOL_POOL_SIZE="0")
    try:
        before = await probe(server, "alice", "survivor.ipynb")
        old = zygote_of(server)
        assert old is not None and before["ppid"] == old.pid
        old.kill()
        new = wait_for(lambda: (z := zygote_of(server)) is not None and z.pid != old.pid and z, what="a new zygote")
        # the kernel forked by the dead zygote still answers, state intact
        async with mcp_client(server.url, server.tokens["alice"], mode="auto") as c:
            await c.call_tool("execute_code", {"notebook": "survivor.ipynb", "code": "kept = 41"})
            r = await c.call_tool("execute_code", {"notebook": "survivor.ipynb", "code": "kept + 1"})
            assert text(r) == "42"
        # the next kernel start works, through the new zygote
        after = await probe(server, "alice", "after-restart.ipynb")
        assert after["ppid"] == new.pid
        # the orphan's death is noticed and reported, and the notebook gets a fresh kernel
        async with mcp_client(server.url, server.tokens["alice"], mode="auto") as c:
            r = await c.call_tool("execute_code", {"notebook": "survivor.ipynb", "code": "import os, time; os.kill(os.getpid(), 9); time.sleep(5)"})
            assert r.is_error and r.structured_content["status"] == "died", text(r)
            assert "fork server" in r.structured_content["message"] or "SIGKILL" in r.structured_content["message"]
            r = await c.call_tool("execute_code", {"notebook": "survivor.ipynb", "code": "'kept' in dir()"})
            assert text(r) == "False"
        assert "fork server" in server.log() and "gone" in server.log()
    finally:
        server.cleanup()


async def test_kernels_do_not_outlive_a_killed_server(server_args: list[str]) -> None:
    server = new_server(server_args, users=("alice",), KERNELPOOL_POOL_SIZE="0")
    try:
        got = await probe(server, "alice", "orphan.ipynb")
        zygote = zygote_of(server)
        assert zygote is not None
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
        wait_for(lambda: not psutil.pid_exists(zygote.pid) or zygote.status() == psutil.STATUS_ZOMBIE,
                 what="the zygote to follow its server")
        wait_for(lambda: not psutil.pid_exists(got["pid"]) or psutil.Process(got["pid"]).status() == psutil.STATUS_ZOMBIE,
                 what="the kernel to follow its server")
        # and a new server starts clean (leftover rows and cgroups reaped)
        server.start(*server_args)
        again = await probe(server, "alice", "orphan.ipynb")
        assert again["pid"] != got["pid"]
    finally:
        server.cleanup()


# ---- the fork server directly ------------------------------------------------------------------

@pytest.fixture
async def fork_server() -> AsyncIterator[ForkServer]:
    fs = ForkServer(sys.executable)
    await fs.start()
    try:
        yield fs
    finally:
        await fs.close()


def _spec(folder: str, conn: str = "k.json") -> LaunchSpec:
    return LaunchSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", os.path.join(folder, conn)],
                      env={"PATH": "/usr/bin:/bin"}, cwd=folder)


async def test_sandbox_failure_in_the_child_is_reported_and_nothing_runs(fork_server: ForkServer) -> None:
    with pytest.raises(LaunchError) as err:
        await fork_server.spawn(_spec("/nonexistent-kernelpool-folder"))
    assert err.value.step == "chdir"
    assert fork_server.pid is not None, "the zygote lives on"


async def test_zygote_process_behaves_like_popen(fork_server: ForkServer) -> None:
    from jupyter_client.connect import write_connection_file

    with tempfile.TemporaryDirectory() as folder:
        # a kernel that cannot read its connection file exits with an error code
        broken = os.path.join(folder, "broken.json")
        with open(broken, "w") as f:
            f.write("not json")
        proc = await fork_server.spawn(_spec(folder, conn=broken))
        assert isinstance(proc, ZygoteProcess)
        code = await asyncio.to_thread(proc.wait, 30)
        assert code > 0 and proc.poll() == code and not proc.exit_unknown
        # a kernel killed by a signal reports it like Popen does
        for sig in (signal.SIGTERM, signal.SIGKILL):
            conn = os.path.join(folder, f"k{sig}.json")
            write_connection_file(conn, transport="ipc", ip=os.path.join(folder, f"k{sig}"))
            proc = await fork_server.spawn(_spec(folder, conn=conn))
            assert proc.poll() is None
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(0.2)
            proc.send_signal(sig)
            assert await asyncio.to_thread(proc.wait, 10) == -sig
            proc.kill()  # signalling an ended process is harmless, as with Popen


async def test_only_kernels_are_forked(fork_server: ForkServer) -> None:
    from kernelpool.kernels.zygote.server import ZygoteUnavailable

    with pytest.raises(ZygoteUnavailable):
        await fork_server.spawn(LaunchSpec(argv=[sys.executable, "-c", "print(1)"], env={}, cwd="/"))


def test_zygote_pythonpath_only_for_a_source_checkout() -> None:
    """PYTHONPATH (which the zygote removes from sys.path again) is set only when the kernels'
    python would not import this very kernelpool by itself: a source checkout. In an installed
    copy that folder is site-packages, which kernels must keep: without it they would not import
    what is installed beside the server (tests/test_install.py)."""
    import kernelpool
    from kernelpool.kernels.zygote import server as zygote

    package = os.path.dirname(os.path.abspath(kernelpool.__file__))
    source = os.path.dirname(package)
    installed = subprocess.run(
        [sys.executable, "-c", "import kernelpool, os; print(os.path.dirname(kernelpool.__file__))"],
        env={"PATH": os.environ["PATH"]}, cwd="/", capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    if os.path.samefile(installed, package):
        pytest.skip("kernelpool is imported from where this python installs it (editable install)")
    # imported from the source tree (testkit/server.py's PYTHONPATH): the zygote needs the path
    env, kernel_path = zygote._zygote_env(sys.executable)
    assert env["PYTHONPATH"] == source
    # ...and never reaches the kernels, whose path is the interpreter's own, site-packages included
    assert source not in json.loads(kernel_path) and sysconfig.get_paths()["purelib"] in json.loads(kernel_path)
    # imported from site-packages, as an installed server does: no PYTHONPATH
    out = subprocess.run(
        [sys.executable, "-c", "import json; from kernelpool.kernels.zygote import server as zygote; print(json.dumps(zygote._zygote_env(zygote.sys.executable)[0]))"],
        env={"PATH": os.environ["PATH"]}, cwd="/", capture_output=True, text=True, timeout=60, check=True,
    )
    assert "PYTHONPATH" not in json.loads(out.stdout), out.stdout
