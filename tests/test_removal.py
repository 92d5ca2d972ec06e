"""Nothing of a user outlives their removal, and a uid is never given twice: a process left
behind, or a uid given again, would let a removed user's code reach the next user's files.

Processes that try to hide are started from inside a real kernel of alice's, through the real MCP
client; then the real `kernelpool users remove` (the CLI, while the server runs, or with no server
at all); then a new user is added and checked. Real root, real processes, real cgroups, namespaces
and accounts; skipped, with the reason, where the host cannot isolate.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx2
import pytest

from sandbox import _libc, cgroupkill, ipc
from sandbox.netplan import NetworkPlan
from sandbox.network import UserNetworks
from sandbox.tasks import live_tasks, tasks_of
from testkit.client import run_code
from testkit.server import KernelpoolServer, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"sandbox tests need isolation: {SANDBOX_SKIP}")

_SERVERS = iter(range(1000))


def _server(*, start: bool = True, **env: str) -> KernelpoolServer:
    """A server with users alice and bob (started if `start`; then bob holds a secret in his kernel,
    set from a sync caller only: async tests call `bob_secret` themselves)."""
    env.setdefault("KERNELPOOL_ACCOUNT_PREFIX", f"kpr{os.getpid() % 100000}x{next(_SERVERS)}-")
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_HOUSEKEEPING_INTERVAL="1", KERNELPOOL_EXECUTE_TIMEOUT="120", KERNELPOOL_KERNEL_START_TIMEOUT="30",
        KERNELPOOL_KERNEL_PIDS="2048", KERNELPOOL_USER_PIDS="4096", **env))
    try:
        server.add_user("alice")
        server.add_user("bob")
        if start:
            server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture
def kp() -> Iterator[KernelpoolServer]:
    server = _server(KERNELPOOL_POOL_SIZE="1")
    try:
        asyncio.run(bob_secret(server))
        yield server
    finally:
        server.cleanup()


async def bob_secret(server: KernelpoolServer) -> None:
    assert await run_code(server, "bob", "secret.ipynb", "SECRET = 'bob-secret'; 1") == "1"


async def assert_bob_survives(server: KernelpoolServer) -> None:
    assert await run_code(server, "bob", "secret.ipynb", "SECRET") == "'bob-secret'"


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def health(server: KernelpoolServer) -> dict:
    return httpx2.get(f"{server.base}/healthz", timeout=10).json()


def status_of_token(server: KernelpoolServer, token: str) -> int:
    return httpx2.post(server.url, timeout=30, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers={
        "Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}).status_code


def network_of(server: KernelpoolServer) -> UserNetworks:
    return UserNetworks(NetworkPlan(mode="egress", prefix=server.env["KERNELPOOL_NETWORK_PREFIX"]))


def nft_links(server: KernelpoolServer) -> str:
    table = f"{server.env['KERNELPOOL_NETWORK_PREFIX']}_kernels"
    return subprocess.run(["nft", "list", "set", "inet", table, "kernel_links"], capture_output=True, text=True).stdout


def leftovers(server: KernelpoolServer, uid: int) -> dict[str, list[str]]:
    """What of `uid` is still on the host: live tasks, cgroups, network namespace, IPC objects, run
    folder. Blocking (pyroute2 runs an event loop of its own): call it outside the test's loop."""
    net = network_of(server)
    return {k: v for k, v in {
        "tasks": [t.describe() for t in live_tasks(uid)],
        "cgroups": cgroupkill.find_trees(server.env["KERNELPOOL_CGROUP_PREFIX"], f"u{uid}"),
        "network": [net.plan.path(uid)] if net.present(uid) else [],
        "nft": [net.plan.host_link(uid)] if f'"{net.plan.host_link(uid)}"' in nft_links(server) else [],
        "ipc": [f"{o.kind} {o.id}" for o in ipc.owned_by(uid)],
        "run": [p for p in [os.path.join(server.data_dir, "run", str(uid))] if os.path.lexists(p)],
    }.items() if v}


# ---- processes that try to hide ---------------------------------------------------------------

# Each writes "<kind> <pid>" to hiders.txt in alice's folder, then haunts: every 0.1 s it lists and
# writes into the folder the next user will get (DATA/users/carol) and into alice's own, as a
# leftover process would, to reach the next user's files. A refused fork (pids limit) is just tried again.
HIDER = r'''
import ctypes, os, signal, sys, threading, time
KIND, TARGETS, HOME = sys.argv[1], sys.argv[2].split(":"), sys.argv[3]
def note():
    with open(os.path.join(HOME, "hiders.txt"), "a") as f:
        f.write(f"{KIND} {os.getpid()}\n")
def haunt_once():
    for d in TARGETS:
        try:
            names = os.listdir(d)
            with open(os.path.join(d, f"leftover-{KIND}-{os.getpid()}.txt"), "w") as f:
                f.write(repr(names))
        except OSError:
            pass
def haunt():
    while True:
        haunt_once()
        time.sleep(0.1)
if KIND == "zombie-leader":  # (a) the main thread exits, another runs on
    note()
    threading.Thread(target=haunt).start()
    ctypes.CDLL(None).pthread_exit(None)
elif KIND == "daemon":  # (b) double fork, own session, reparented to init
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    note()
    haunt()
elif KIND == "forker":  # (c) forks all the time, the parent exits at once: never the same pid twice
    note()
    last = 0.0
    while True:
        try:
            if os.fork():
                os._exit(0)
        except OSError:
            time.sleep(0.001)
            continue
        if time.monotonic() - last > 0.1:
            haunt_once()
            last = time.monotonic()
        time.sleep(0.02)  # 50 forks a second: enough to outrun a scan, few zombies for a slow init to reap
elif KIND == "stopped":  # (d) SIGSTOPped: haunts if anyone ever continues it
    note()
    os.kill(os.getpid(), signal.SIGSTOP)
    haunt()
elif KIND == "renamed":  # (e) another name, and away from the user's folder
    ctypes.CDLL(None).prctl(15, b"kworker/u8:2", 0, 0, 0)
    os.chdir("/")
    note()
    haunt()
elif KIND == "stubborn":  # (f) ignores and blocks what it can, holds the folder open from inside
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    held = os.open(HOME, os.O_RDONLY)
    os.makedirs(os.path.join(HOME, "deep", "er"), exist_ok=True)
    os.chdir(os.path.join(HOME, "deep", "er"))
    note()
    haunt()
elif KIND == "threads":  # (f) new threads all the time
    note()
    while True:
        t = threading.Thread(target=haunt_once)
        t.start()
        t.join(0.05)
'''
KINDS = ("zombie-leader", "daemon", "forker", "stopped", "renamed", "stubborn", "threads")

START_HIDERS = '''
import ctypes, os, subprocess, sys
home = os.getcwd()
with open("hider.py", "w") as f:
    f.write({hider!r})
for kind in {kinds!r}:
    subprocess.Popen([sys.executable, "hider.py", kind, {targets!r}, home], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
# System V IPC objects, in the kernel's own IPC namespace: they go with it
libc = ctypes.CDLL(None, use_errno=True)
made = [libc.shmget(0, 1 << 20, 0o1600), libc.msgget(0, 0o1600), libc.semget(0, 2, 0o1600), libc.shmget(0x6b70, 4096, 0o1600)]
print("ipc", made)
'''


HOST_IPC = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
made = [libc.shmget(0, 1 << 20, 0o1600), libc.msgget(0, 0o1600), libc.semget(0, 2, 0o1600), libc.shmget(0x6b70, 4096, 0o1600)]
assert -1 not in made, made
"""


def hiders(home: str) -> dict[str, int]:
    try:
        with open(os.path.join(home, "hiders.txt")) as f:
            return {kind: int(pid) for kind, pid in (line.split() for line in f if line.strip())}
    except FileNotFoundError:
        return {}


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


async def test_nothing_of_a_removed_user_outlives_the_removal(kp: KernelpoolServer) -> None:
    server = kp
    uid = server.uid("alice")
    home = os.path.join(server.data_dir, "users", "alice")
    carol_home = os.path.join(server.data_dir, "users", "carol")
    out = await run_code(server, "alice", "hide.ipynb", START_HIDERS.format(
        hider=HIDER, kinds=KINDS, targets=f"{carol_home}:{home}"))
    assert out.startswith("ipc") and "-1" not in out, out
    # kernels have an IPC namespace of their own: what one makes is not on the host. Objects of the
    # uid in the host's namespace are what a kernel of a version before that left, and they outlive
    # every process: made here by a process of the uid outside any kernel
    assert ipc.owned_by(uid) == []
    subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c", HOST_IPC],
                   check=True, timeout=30)
    wait_for(lambda: set(hiders(home)) == set(KINDS), what=f"every hider to start ({os.listdir(home)})")
    pids = hiders(home)
    time.sleep(0.5)  # let them haunt, fork and spawn threads for a while
    tasks = tasks_of(uid)
    by_tid = {t.tid: t for t in tasks}
    # each hides the way it means to
    assert by_tid[pids["zombie-leader"]].state == "Z"
    assert any(t.tgid == pids["zombie-leader"] and t.alive for t in tasks), "its other thread runs"
    assert by_tid[pids["stopped"]].state == "T"
    assert comm(pids["renamed"]) == "kworker/u8:2" and os.readlink(f"/proc/{pids['renamed']}/cwd") == "/"
    assert os.readlink(f"/proc/{pids['stubborn']}/cwd") == os.path.join(home, "deep", "er")
    assert pids["daemon"] in by_tid and by_tid[pids["daemon"]].alive
    assert len({t.tgid for t in tasks if t.alive}) >= len(KINDS) + 1  # + the kernel, the warm kernel
    before = await asyncio.to_thread(leftovers, server, uid)
    assert {"tasks", "cgroups", "network", "nft", "ipc", "run"} <= set(before), before
    assert len(before["ipc"]) == 4
    health_before = health(server)
    token = server.tokens["alice"]

    done = server.cli("users", "remove", "alice", timeout=300)
    removed_at = time.time()
    assert "removed user alice" in done.stderr, done
    server.tokens.pop("alice")
    assert await asyncio.to_thread(leftovers, server, uid) == {}, "no live task of the old uid, no cgroup, namespace, link, IPC object or run folder"
    for task in tasks_of(uid):  # only zombies waiting for init to reap them: they run nothing
        assert task.state in ("Z", "X"), task.describe()
    assert status_of_token(server, token) == 401

    # the running server notices at its next user reload and drops alice's kernels (warm one included)
    assert health_before["kernels"] == 2
    wait_for(lambda: health(server)["kernels"] == 1 and health(server)["warm_kernels"] <= 1,
             timeout=20, what="the server to drop alice's kernels")
    assert "of alice: dropped (the user was removed)" in server.log()
    with sqlite3.connect(f"file:{server.data_dir}/kernelpool.db?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM kernels WHERE user = 'alice'").fetchone()[0] == 0
    db.close()

    # the next user: another uid, and nothing of the old one reaches its folder
    server.add_user("carol")
    carol_uid = server.uid("carol")
    assert carol_uid != uid and carol_uid > uid
    assert await run_code(server, "carol", "mine.ipynb", "import os; open('note.txt', 'w').write('x'); os.getuid()") == str(carol_uid)
    kept = {n: os.stat(os.path.join(home, n)).st_mtime for n in os.listdir(home) if n.startswith("leftover-")}
    time.sleep(1.5)  # fifteen haunting periods
    for name in os.listdir(carol_home):
        assert not name.startswith("leftover-"), name
        assert os.lstat(os.path.join(carol_home, name)).st_uid != uid, name
    assert {n: os.stat(os.path.join(home, n)).st_mtime for n in os.listdir(home) if n.startswith("leftover-")} == kept
    assert all(mtime <= removed_at for mtime in kept.values())
    assert live_tasks(uid) == []
    await assert_bob_survives(server)


async def test_a_name_added_again_gets_a_new_uid_and_account(kp: KernelpoolServer) -> None:
    server = kp
    prefix = server.env["KERNELPOOL_ACCOUNT_PREFIX"]
    import pwd

    first = server.uid("alice")
    assert pwd.getpwuid(first).pw_name == f"{prefix}alice"  # the first account of a name keeps its old form
    # the server knows alice (a tool call), so it holds her as uid `first` in memory
    assert await run_code(server, "alice", "a.ipynb", "import os; os.getuid()") == str(first)
    old_token = server.tokens["alice"]
    seen = {first}
    for round_ in range(2):
        server.cli("users", "remove", "alice", "--delete-files", timeout=300)
        server.add_user("alice")
        uid = server.uid("alice")
        assert uid not in seen and uid > max(seen), (uid, seen)
        account = pwd.getpwuid(uid).pw_name
        assert account == f"{prefix}{uid}-alice", account
        for old in seen:
            with pytest.raises(KeyError):
                pwd.getpwuid(old)
        seen.add(uid)
        # the server serves the new alice as the new uid at once (no restart, no wait for a reload):
        # her kernel, and the files the server writes for her
        out = await run_code(server, "alice", f"b{round_}.ipynb", "import os, getpass; (os.getuid(), getpass.getuser())")
        assert out == repr((uid, account)), out
        assert os.stat(os.path.join(server.data_dir, "users", "alice", f"b{round_}.ipynb")).st_uid == uid
    assert status_of_token(server, old_token) == 401
    await assert_bob_survives(server)


def test_uid_exhaustion_says_so_and_adds_nothing() -> None:
    # a range of its own (outside the other tests' 62000-62999), and no server: the CLI alone
    from sandbox import accounts

    low = next((u for u in range(63000, 63990, 3) if not any(accounts.id_in_use(u + i) for i in range(3))), None)
    if low is None:
        pytest.skip("no three free uids in 63000-63999")
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_UID_MIN=str(low), KERNELPOOL_UID_MAX=str(low + 1),
        KERNELPOOL_ACCOUNT_PREFIX=f"kpx{os.getpid() % 100000}-"))
    try:
        server.add_user("u1")
        server.add_user("u2")
        assert [server.uid("u1"), server.uid("u2")] == [low, low + 1]
        server.cli("users", "remove", "u1")
        server.tokens.pop("u1")
        listed = server.cli("users", "list").stdout
        for name in ("u3", "u1"):  # a new name, and the removed one again
            out = server.cli("users", "add", name, check=False)
            assert out.returncode == 2 and out.stdout == "", out
            assert (f"no uid left to give in {low}-{low + 1}" in out.stderr and "never given twice" in out.stderr
                    and "1 of them to users removed since" in out.stderr and "Nothing was added" in out.stderr), out.stderr
            assert server.cli("users", "list").stdout == listed
            assert not accounts.id_in_use(low) and not accounts.id_in_use(low + 2)
        # a wider range: the next uid above everything given
        server.env["KERNELPOOL_UID_MAX"] = str(low + 2)
        server.add_user("u3")
        assert server.uid("u3") == low + 2
    finally:
        server.cleanup()


def test_a_failed_add_removes_no_account_it_did_not_make() -> None:
    # an account of the host already has the name kernelpool would give: the add fails, says why,
    # and leaves that account alone (the cleanup of a half-made add removes only what has our uid)
    from sandbox import Identity, accounts

    prefix = f"kpf{os.getpid() % 100000}-"
    server = KernelpoolServer(make_data_dir(), server_env(KERNELPOOL_ACCOUNT_PREFIX=prefix))
    foreign = next(u for u in range(63900, 63999) if not accounts.id_in_use(u))
    accounts.ensure_account(Identity(name=f"{prefix}zed", uid=foreign, gid=foreign, home="/nonexistent"))
    try:
        out = server.cli("users", "add", "zed", check=False)
        assert out.returncode == 2 and f"group '{prefix}zed' exists with gid {foreign}" in out.stderr, out
        assert out.stdout == "" and "zed" not in server.cli("users", "list").stdout
        assert accounts.account_exists(f"{prefix}zed") and accounts.id_in_use(foreign)
    finally:
        accounts.remove_account(f"{prefix}zed")
        server.cleanup()


# ---- a task that cannot be killed: the removal stops and says so ---------------------------------

class StuckFuse:
    """A FUSE file system, served by this (root) test process, that answers the kernel's INIT and
    then reads each request without ever answering it. A process that touches a path below it
    waits inside the kernel; once killed, it waits uninterruptibly (state D) for an answer that
    does not come. Closing the device aborts the connection and lets it die."""

    def __init__(self) -> None:
        self.mount = f"/var/tmp/kp-fuse-{uuid.uuid4().hex[:8]}"
        os.mkdir(self.mount)
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK)
        _libc.mount("kp-test-fuse", self.mount, "fuse", 0,
                    f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            try:
                request = os.read(self.fd, 1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            _, opcode, unique = struct.unpack_from("<IIQ", request)
            if opcode == 26:  # FUSE_INIT: protocol 7.22, nothing else; every later request waits forever
                body = struct.pack("<IIIIHHI", 7, 22, 0, 0, 0, 0, 4096)
                os.write(self.fd, struct.pack("<IiQ", 16 + len(body), 0, unique) + body)

    def release(self) -> None:
        if self.fd < 0:
            return
        self._stop.set()
        self._thread.join()
        os.close(self.fd)  # the last reference to the connection: pending requests fail, waiters go on
        self.fd = -1
        try:
            _libc.umount2(self.mount, _libc.MNT_DETACH)
        finally:
            os.rmdir(self.mount)


async def test_a_task_that_cannot_be_killed_stops_the_removal_which_says_so() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: cannot make a task wait uninterruptibly here")
    server = _server(start=False, KERNELPOOL_POOL_SIZE="0")
    fuse: StuckFuse | None = None
    try:
        fuse = StuckFuse()  # before alice's kernel starts: its mount namespace is copied from ours then
        server.start()
        await bob_secret(server)
        uid = server.uid("alice")
        out = await run_code(server, "alice", "stuck.ipynb", f'''
import subprocess, sys, time
p = subprocess.Popen([sys.executable, "-c", "import os; os.stat({fuse.mount + '/x'!r})"])
time.sleep(1)
p.pid''')
        stuck = int(out)
        assert any(t.tgid == stuck for t in live_tasks(uid))
        done = server.cli("users", "remove", "alice", "--delete-files", check=False, timeout=300)
        assert done.returncode == 2, done
        message = done.stderr
        assert "could not remove user 'alice' (stopping its processes: 1 task(s) of uid" in message, message
        assert f"{stuck} 'python" in message and "state D (uninterruptible sleep" in message, message
        assert "nothing was removed" in message and "kernelpool users remove alice --delete-files` again" in message
        # all there: row, account, folder, token; her other processes (the kernel) were killed
        assert "alice" in server.cli("users", "list").stdout
        import pwd

        assert pwd.getpwuid(uid).pw_name.endswith("alice")
        assert os.path.isdir(os.path.join(server.data_dir, "users", "alice"))
        assert [t.tgid for t in live_tasks(uid)] == [stuck]
        assert await run_code(server, "alice", "again.ipynb", "import os; os.getuid()") == str(uid)
        fuse.release()  # the file system answers at last (its connection ends): the task can die
        done = server.cli("users", "remove", "alice", "--delete-files", timeout=300)
        assert "removed user alice" in done.stderr
        server.tokens.pop("alice")
        assert await asyncio.to_thread(leftovers, server, uid) == {}
        await assert_bob_survives(server)
    finally:
        if fuse is not None:
            fuse.release()
        await asyncio.to_thread(server.cleanup)  # pyroute2 (in cleanup) runs a loop of its own


# ---- no server running ---------------------------------------------------------------------------

async def test_removal_with_no_server_running_ends_what_a_killed_server_left() -> None:
    server = _server(KERNELPOOL_POOL_SIZE="0")
    try:
        await bob_secret(server)
        uid = server.uid("alice")
        home = os.path.join(server.data_dir, "users", "alice")
        await run_code(server, "alice", "d.ipynb", START_HIDERS.format(hider=HIDER, kinds=("daemon", "zombie-leader"),
                                                                       targets=home))
        wait_for(lambda: set(hiders(home)) == {"daemon", "zombie-leader"}, what="the hiders to start")
        pids = hiders(home)
        server.stop(signal.SIGKILL)  # no cleanup: the fork server takes its kernels' process groups along, not these
        time.sleep(1)
        assert set(pids.values()) <= {t.tgid for t in live_tasks(uid)}
        assert cgroupkill.find_trees(server.env["KERNELPOOL_CGROUP_PREFIX"], f"u{uid}")
        done = server.cli("users", "remove", "alice", timeout=300)
        assert "removed user alice" in done.stderr, done
        server.tokens.pop("alice")
        assert await asyncio.to_thread(leftovers, server, uid) == {}
        server.start()  # and the next server starts as usual, without alice
        assert await run_code(server, "bob", "secret.ipynb", "6 * 7") == "42"
        assert "alice" not in server.cli("users", "list").stdout
    finally:
        await asyncio.to_thread(server.cleanup)  # pyroute2 (in cleanup) runs a loop of its own

