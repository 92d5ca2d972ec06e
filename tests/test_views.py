"""What one user's kernel can see of another's: private /tmp and /dev/shm, a /proc that lists only
its own processes, cgroup views with no names, SysV IPC and message queues of its own, a /sys of
its own network namespace, an /etc/passwd with only its own user, and the seccomp filter. Every attack runs in alice's kernel
against bob's; bob's kernel keeps its state.

Each server-level test runs twice: kernels forked by the fork server, and started the stock way
(`fork_server = false`), since the two start paths run `sandbox.enter` in different processes.
Real servers, real kernels, real mounts; as root, skipped with the reason elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx2
import psutil
import pytest

from sandbox import _libc, seccomp, views
from testkit.client import mcp_client, run_json, text
from testkit.server import KernelpoolServer, server_env
from tests.conftest import METRICS_TOKEN, SANDBOX_SKIP

needs_sandbox = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"needs isolation: {SANDBOX_SKIP}")

TMPFS = 96 * 1024 * 1024


def _new_server(n: int, data_dir: str | None = None, **env: str) -> KernelpoolServer:
    if data_dir is None:
        data_dir = tempfile.mkdtemp(prefix="kp-views-", dir="/var/tmp")
        os.chmod(data_dir, 0o711)
    server = KernelpoolServer(data_dir, server_env(
        KERNELPOOL_ACCOUNT_PREFIX=f"kpv{os.getpid() % 10000}{n}-",
        KERNELPOOL_UID_MIN=str(64000 + 50 * n), KERNELPOOL_UID_MAX=str(64000 + 50 * n + 49),
        KERNELPOOL_CGROUP_PREFIX=f"kernelpool-vtest-{os.getpid()}-{n}",
        KERNELPOOL_KERNEL_TMPFS_SIZE=str(TMPFS), KERNELPOOL_POOL_SIZE="0", KERNELPOOL_EXECUTE_TIMEOUT="120",
        KERNELPOOL_METRICS_TOKEN=METRICS_TOKEN, **env,
    ))
    try:
        server.add_user("alice")
        server.add_user("bob")
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="module", params=["forked", "stock"])
def srv(request: pytest.FixtureRequest) -> Iterator[KernelpoolServer]:
    if SANDBOX_SKIP is not None:
        pytest.skip(f"needs isolation: {SANDBOX_SKIP}")
    forked = request.param == "forked"
    server = _new_server(1 if forked else 2, KERNELPOOL_FORK_SERVER="true" if forked else "false")
    try:
        asyncio.run(_bob_setup(server))
        yield server
    finally:
        server.cleanup()


BOB_SETUP = '''
import os
STATE = "bob-state"
open("/tmp/bob-tmp-secret", "w").write("bob")
open("/dev/shm/bob-shm-secret", "w").write("bob")
os.mkdir("/tmp/bob-folder")
import ctypes
BOB_LIBC = ctypes.CDLL(None, use_errno=True)
BOB_SHM = BOB_LIBC.shmget(0xB0B, 4096, 0o1666)  # key 0xb0b, IPC_CREAT, readable and writable by anyone
BOB_PTY = os.openpty()  # a terminal held open, as `!cmd` holds one while it runs
'''


async def _bob_setup(server: KernelpoolServer) -> None:
    async with mcp_client(server.url, server.tokens["bob"], mode="auto") as b:
        r = await b.call_tool("use_notebook", {"notebook": "bob.ipynb", "mode": "create"})
        assert not r.is_error, text(r)
        r = await b.call_tool("execute_code", {"notebook": "bob.ipynb", "code": BOB_SETUP})
        assert not r.is_error, text(r)


async def run_as(server: KernelpoolServer, user: str, code: str, notebook: str = "probe.ipynb") -> dict:
    """Run `code` in `user`'s kernel for `notebook`; it prints one JSON line, returned parsed."""
    return await run_json(server, user, code, notebook)




async def bob_lives_on(server: KernelpoolServer) -> None:
    got = await run_as(server, "bob", '''
import json, os
print(json.dumps({"state": STATE, "tmp": open("/tmp/bob-tmp-secret").read(),
                  "shm": open("/dev/shm/bob-shm-secret").read(), "folder": os.path.isdir("/tmp/bob-folder"),
                  "sysv": BOB_LIBC.shmget(0xB0B, 0, 0) == BOB_SHM >= 0}))
''', notebook="bob.ipynb")
    assert got == {"state": "bob-state", "tmp": "bob", "shm": "bob", "folder": True, "sysv": True}, \
        "bob's kernel keeps its state, its files and its SysV segment"


def uid_of(server: KernelpoolServer, user: str) -> int:
    return pwd.getpwnam(f"{server.env['KERNELPOOL_ACCOUNT_PREFIX']}{user}").pw_uid


async def pid_of(server: KernelpoolServer, user: str, notebook: str) -> int:
    return int((await run_as(server, user, "import json, os; print(json.dumps({'pid': os.getpid()}))", notebook))["pid"])


# ---- /tmp and /dev/shm ---------------------------------------------------------------------------

@needs_sandbox
async def test_alice_cannot_see_bobs_tmp_or_shm(srv: KernelpoolServer) -> None:
    got = await run_as(srv, "alice", '''
import json, os
def tryopen(p):
    try:
        open(p).read()
        return "ALLOWED"
    except Exception as e:
        return type(e).__name__
st = os.statvfs("/tmp"); sh = os.statvfs("/dev/shm")
open("/tmp/alice-file", "w").write("a")
print(json.dumps({"tmp": os.listdir("/tmp"), "shm": os.listdir("/dev/shm"),
  "open_tmp": tryopen("/tmp/bob-tmp-secret"), "open_shm": tryopen("/dev/shm/bob-shm-secret"),
  "tmp_size": st.f_blocks * st.f_frsize, "shm_size": sh.f_blocks * sh.f_frsize,
  "tmp_mode": oct(os.stat("/tmp").st_mode & 0o7777), "shm_mode": oct(os.stat("/dev/shm").st_mode & 0o7777)}))
''')
    assert got["tmp"] == ["alice-file"] and got["shm"] == [], got
    assert got["open_tmp"] == got["open_shm"] == "FileNotFoundError"
    assert got["tmp_size"] == got["shm_size"] == TMPFS, "capped by kernel_tmpfs_size"
    assert got["tmp_mode"] == got["shm_mode"] == "0o1777"
    # and none of it reached the host's /tmp or /dev/shm
    assert not os.path.exists("/tmp/bob-tmp-secret") and not os.path.exists("/dev/shm/bob-shm-secret")
    assert not os.path.exists("/tmp/alice-file")
    await bob_lives_on(srv)


@needs_sandbox
async def test_tmpfs_counts_against_the_kernels_memory(srv: KernelpoolServer) -> None:
    pid = await pid_of(srv, "bob", "bob.ipynb")
    with open(f"/proc/{pid}/cgroup") as f:
        memory = next(line.split(":", 2)[2] for line in f.read().splitlines() if ":memory:" in line)
    usage = f"/sys/fs/cgroup/memory{memory}/memory.usage_in_bytes"
    before = int(Path(usage).read_text())
    await run_as(srv, "bob", 'open("/dev/shm/bob-blob", "wb").write(b"x" * (48 << 20)); print("{}")', notebook="bob.ipynb")
    after = int(Path(usage).read_text())
    assert after - before >= 40 << 20, (before, after)
    # the server still reads its (renamed) cgroups: the user's memory gauge counts it too
    metrics = httpx2.get(f"{srv.base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    found = re.search(r'kernelpool_user_memory_bytes\{user="bob"\} ([0-9.e+]+)', metrics)
    assert found is not None and float(found.group(1)) >= 48 << 20, metrics[:2000]
    await run_as(srv, "bob", 'import os; os.unlink("/dev/shm/bob-blob"); print("{}")', notebook="bob.ipynb")
    await bob_lives_on(srv)


# ---- /proc ---------------------------------------------------------------------------------------

@needs_sandbox
async def test_alices_proc_lists_no_bob_and_no_server(srv: KernelpoolServer) -> None:
    bob_pid = await pid_of(srv, "bob", "bob.ipynb")
    alice_uid = uid_of(srv, "alice")
    got = await run_as(srv, "alice", f'''
import json, os, subprocess
child = subprocess.Popen(["sleep", "30"])
pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
uids = {{}}
for p in pids:
    try:
        uids[p] = int(open(f"/proc/{{p}}/status").read().split("Uid:")[1].split()[0])
    except OSError:
        pass
def tryread(p):
    try:
        open(p).read()
        return "ALLOWED"
    except Exception as e:
        return type(e).__name__
print(json.dumps({{"pids": pids, "uids": uids, "me": os.getpid(), "child": child.pid,
  "bob_cmdline": tryread("/proc/{bob_pid}/cmdline"), "server_cmdline": tryread("/proc/{srv.pid}/cmdline")}}))
child.kill()
_ = child.wait()
''')
    # the server, bob's kernel, init, and whatever else the server runs that is not alice's (a zygote)
    others = {p.pid for p in psutil.Process(srv.pid).children() if p.uids().real != alice_uid}
    hidden = {bob_pid, srv.pid, 1} | others
    assert got["me"] in got["pids"] and got["child"] in got["pids"], "a kernel sees itself and its children"
    assert not hidden & set(got["pids"]), hidden & set(got["pids"])
    assert set(got["uids"].values()) == {alice_uid}, got["uids"]
    assert got["bob_cmdline"] == got["server_cmdline"] == "FileNotFoundError"
    await bob_lives_on(srv)


# ---- cgroups -------------------------------------------------------------------------------------

@needs_sandbox
async def test_cgroup_views_show_no_names_or_kernel_ids(srv: KernelpoolServer) -> None:
    kernel_ids = srv.kernel_folders("bob")
    assert kernel_ids, "bob has a kernel"
    got = await run_as(srv, "alice", '''
import json, os
tree = []
for top, dirs, files in os.walk("/sys/fs/cgroup"):
    tree.append(top)
limit = None
for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
    if os.path.exists(path):
        limit = open(path).read().strip()
print(json.dumps({"cgroup": open("/proc/self/cgroup").read(), "tree": tree, "limit": limit,
                  "mountinfo": open("/proc/self/mountinfo").read()}))
''')
    assert all(line.endswith(":/") for line in got["cgroup"].splitlines()), got["cgroup"]
    prefix = srv.env["KERNELPOOL_CGROUP_PREFIX"]
    seen = "\n".join(got["tree"]) + got["cgroup"]
    for word in ("bob", "alice", prefix, srv.env["KERNELPOOL_ACCOUNT_PREFIX"], *kernel_ids):
        assert word not in seen, f"{word!r} visible in the kernel's cgroup view"
    # only the hierarchies' roots, which are the kernel's own cgroup: no folder below any of them
    assert all(t.count("/") <= 4 for t in got["tree"]), got["tree"]
    assert got["limit"] not in (None, "max"), "the kernel still reads its own memory limit"
    assert "bob" not in got["mountinfo"] and prefix not in got["mountinfo"]
    await bob_lives_on(srv)


# ---- seccomp -------------------------------------------------------------------------------------

SYSCALLS = '''
import ctypes, errno, json, os, socket, subprocess, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    # every integer as a full register: a C int would leave the upper half undefined
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    r = libc.syscall(ctypes.c_long(nr), *args)
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
# x86-64 numbers
got = {
  "io_uring_setup": call(425, 1, ctypes.create_string_buffer(120)),
  "userfaultfd": call(323, 0),
  "mount": call(165, b"none", b"/tmp", b"tmpfs", 0, None),
  "clone3": call(435, None, 0),
  "bpf": call(321, 0, None, 0),
  "perf_event_open": call(298, None, 0, -1, -1, 0),
  "keyctl": call(250, 0, 0, 0, 0, 0),
  "ptrace": call(101, 16, os.getppid(), 0, 0),
  "setns": call(308, os.open("/proc/self/ns/net", os.O_RDONLY), 0),
  "unshare_ipc": call(272, 0x08000000),  # a namespace of its own again, out of reach of its limits
  "seccomp_mode": open("/proc/self/status").read().split("Seccomp:")[1].split()[0],
}
# two that an unprivileged process may use without a filter: reading its own memory that way, and
# a file handle for a path (struct file_handle: handle_bytes = 128, then type and the handle)
buf = ctypes.create_string_buffer(8); iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
got["process_vm_readv"] = call(310, os.getpid(), iov, 1, iov, 1, 0)
handle = ctypes.create_string_buffer((128).to_bytes(4, sys.byteorder) + bytes(132)); mount_id = ctypes.c_int()
got["name_to_handle_at"] = call(303, -100, b"/tmp", handle, ctypes.byref(mount_id), 0)
# in a child process, as exploit code would: a new user namespace, by unshare and by clone
child = subprocess.run([sys.executable, "-c",
  "import ctypes, errno; l = ctypes.CDLL(None, use_errno=True); r = l.unshare(0x10000000); "
  "print(errno.errorcode[ctypes.get_errno()] if r else 'ok')"], capture_output=True, text=True)
got["child_unshare_userns"] = child.stdout.strip() or child.stderr
got["unshare_cmd"] = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True, text=True).returncode
got["clone_newuser"] = call(56, 0x10000000 | 17, 0, 0, 0, 0)  # SIGCHLD | CLONE_NEWUSER
# ordinary work still works: threads, subprocesses, loopback sockets, files
box = []
t = threading.Thread(target=lambda: box.append(sum(range(1000)))); t.start(); t.join()
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept(); cli.sendall(b"ping")
echo = conn.recv(4); [s.close() for s in (cli, conn, srv)]
with open("/tmp/work.txt", "w") as f: f.write("data")
with open(os.path.expanduser("~/work.txt"), "w") as f: f.write("home")
import multiprocessing
ctx = multiprocessing.get_context("fork")
with ctx.Pool(2) as pool: squares = pool.map(abs, [-1, -2, -3])
got["work"] = [box[0], subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout.strip(),
               echo.decode(), open("/tmp/work.txt").read(), open(os.path.expanduser("~/work.txt")).read(), squares]
print(json.dumps(got))
'''


@needs_sandbox
async def test_seccomp_filter_is_in_force(srv: KernelpoolServer) -> None:
    got = await run_as(srv, "alice", SYSCALLS)
    assert got["seccomp_mode"] == "2", "a filter is loaded"
    for name in ("io_uring_setup", "userfaultfd", "mount", "bpf", "perf_event_open", "keyctl", "ptrace", "setns", "unshare_ipc",
                 "child_unshare_userns", "clone_newuser", "process_vm_readv", "name_to_handle_at"):
        assert got[name] == "EPERM", (name, got[name])
    assert got["clone3"] == "ENOSYS", "clone3 cannot be argument-filtered: glibc falls back to clone"
    assert got["unshare_cmd"] != 0
    assert got["work"] == [499500, "hi", "ping", "data", "home", [1, 2, 3]]
    await bob_lives_on(srv)


# ---- a data folder under /tmp --------------------------------------------------------------------

@needs_sandbox
async def test_data_folder_under_tmp_stays_reachable_and_bob_does_not() -> None:
    data_dir = tempfile.mkdtemp(prefix="kp-views-tmp-", dir="/tmp")
    os.chmod(data_dir, 0o711)
    server = _new_server(3, data_dir=data_dir)
    try:
        await _bob_setup(server)
        alice_home = os.path.join(data_dir, "users", "alice")
        got = await run_as(server, "alice", f'''
import json, os
open("mine.txt", "w").write("x")
print(json.dumps({{"cwd": os.getcwd(), "tmp": sorted(os.listdir("/tmp")), "users": sorted(os.listdir({os.path.join(data_dir, "users")!r})),
  "bob": os.path.exists({os.path.join(data_dir, "users", "bob")!r}), "db": os.path.exists({os.path.join(data_dir, "kernelpool.db")!r})}}))
''')
        assert got["cwd"] == alice_home
        assert got["tmp"] == [os.path.basename(data_dir)], "only the way to the kernel's own folders"
        assert got["users"] == ["alice"] and got["bob"] is False and got["db"] is False
        assert os.path.exists(os.path.join(alice_home, "mine.txt")), "written to the real folder"
        await bob_lives_on(server)
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


# ---- one volume per user, as in Docker --------------------------------------------------------------

@needs_sandbox
@pytest.mark.parametrize("fork_server", ["true", "false"])
async def test_other_users_volumes_are_not_even_named(fork_server: str) -> None:
    data_dir = tempfile.mkdtemp(prefix="kp-views-vol-", dir="/var/tmp")
    os.chmod(data_dir, 0o711)
    n = 4 if fork_server == "true" else 5
    server = KernelpoolServer(data_dir, server_env(
        KERNELPOOL_ACCOUNT_PREFIX=f"kpv{os.getpid() % 10000}{n}-", KERNELPOOL_UID_MIN=str(64000 + 50 * n),
        KERNELPOOL_UID_MAX=str(64000 + 50 * n + 49), KERNELPOOL_CGROUP_PREFIX=f"kernelpool-vtest-{os.getpid()}-{n}",
        KERNELPOOL_POOL_SIZE="0", KERNELPOOL_FORK_SERVER=fork_server))
    mounted: list[str] = []
    try:
        for user in ("alice", "bob"):
            server.add_user(user)
            folder = os.path.join(data_dir, "users", user)
            uid = uid_of(server, user)
            # a volume of the user's own, as `-v /srv/kp/NAME:/data/users/NAME` gives it
            _libc.mount("tmpfs", folder, "tmpfs", 0, f"size=16m,mode=0700,uid={uid},gid={uid}")
            mounted.append(folder)
        server.start()
        await _bob_setup(server)
        got = await run_as(server, "alice", VOLUME_PROBE)
        assert "/users/bob" not in got["mountinfo"], "bob's volume is not listed in alice's mount table"
        assert "/users/alice" in got["mountinfo"], "alice's own volume is there"
        assert got["cwd"] == mounted[0]
        assert os.path.exists(os.path.join(mounted[0], "on-my-volume.txt")), "written to the volume"
        await bob_lives_on(server)
    finally:
        server.stop()
        for folder in mounted:
            _libc.umount2(folder, _libc.MNT_DETACH)
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


VOLUME_PROBE = """
import json, os
open("on-my-volume.txt", "w").write("x")
print(json.dumps({"mountinfo": open("/proc/self/mountinfo").read(), "cwd": os.getcwd()}))
"""


# ---- SysV IPC and POSIX message queues -----------------------------------------------------------

IPC_PROBE = '''
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
def rc(r):
    return r if r >= 0 else errno.errorcode[ctypes.get_errno()]
def table(name):
    lines = open("/proc/sysvipc/" + name).read().splitlines()[1:]
    return [[int(line.split()[0]), int(line.split()[1])] for line in lines]  # key, id
sysctl = {n: open("/proc/sys/kernel/" + n).read().split() for n in ("shmmax", "shmall", "shmmni")}
print(json.dumps({
  "bob_shm": rc(libc.shmget(0xB0B, 0, 0)),  # bob's key, made readable and writable by anyone
  "shm": rc(libc.shmget(0xA11CE, 1 << 20, 0o1666)), "sem": rc(libc.semget(0xA11CE, 4, 0o1666)),
  "msg": rc(libc.msgget(0xA11CE, 0o1666)),
  "tables": {n: table(n) for n in ("shm", "sem", "msg")}, "sysctl": sysctl,
  "ipc_ns": os.readlink("/proc/self/ns/ipc"), "pid": os.getpid(),
}))
'''


def _host_ipc_keys() -> set[int]:
    keys = set()
    for name in ("shm", "sem", "msg"):
        with open(f"/proc/sysvipc/{name}") as f:
            keys |= {int(line.split()[0]) for line in f.read().splitlines()[1:]}
    return keys


def _processes_in(ns: str) -> list[int]:
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if os.readlink(f"/proc/{pid}/ns/ipc") == ns:
                found.append(int(pid))
        except OSError:
            pass
    return found


@needs_sandbox
async def test_sysv_ipc_is_the_kernels_own_and_goes_with_it(srv: KernelpoolServer) -> None:
    got = await run_as(srv, "alice", IPC_PROBE, notebook="ipc.ipynb")
    assert got["bob_shm"] == "ENOENT", "bob's segment (mode 0666) is not even found by its key"
    assert all(isinstance(got[k], int) for k in ("shm", "sem", "msg")), got
    # alice's tables list her objects only: key 0xa11ce, none of bob's
    for name in ("shm", "sem", "msg"):
        assert got["tables"][name] == [[0xA11CE, got[name]]], (name, got["tables"])
    assert got["sysctl"]["shmmax"] == [str(TMPFS)], "one segment is capped like /dev/shm"
    assert int(got["sysctl"]["shmall"][0]) * os.sysconf("SC_PAGE_SIZE") == TMPFS, "and all of them together"
    # the host (ipcs reads these files) never sees alice's objects, and has a namespace of its own
    assert 0xA11CE not in _host_ipc_keys() and 0xB0B not in _host_ipc_keys()
    ipcs = subprocess.run(["ipcs"], capture_output=True, text=True).stdout
    assert "0x000a11ce" not in ipcs and "0x00000b0b" not in ipcs, ipcs
    assert got["ipc_ns"] != os.readlink("/proc/self/ns/ipc")
    bob = await run_as(srv, "bob", IPC_PROBE.replace("0xA11CE", "0xB0B0"), notebook="bob.ipynb")
    assert bob["tables"]["shm"] == [[0xB0B, bob["bob_shm"]], [0xB0B0, bob["shm"]]], "bob sees his own, not alice's"
    assert bob["ipc_ns"] != got["ipc_ns"]
    # a kernel of its own: alice's other notebook does not share them either
    other = await run_as(srv, "alice", IPC_PROBE, notebook="ipc-2.ipynb")
    assert other["ipc_ns"] != got["ipc_ns"] and other["tables"]["shm"] == [[0xA11CE, other["shm"]]]
    # stopping the kernel ends its namespace: no process is left in it, so nothing of it is left
    assert got["pid"] in _processes_in(got["ipc_ns"])
    async with mcp_client(srv.url, srv.tokens["alice"], mode="auto") as c:
        for notebook in ("ipc.ipynb", "ipc-2.ipynb"):
            assert not (await c.call_tool("unuse_notebook", {"notebook": notebook})).is_error
    assert _processes_in(got["ipc_ns"]) == [] and _processes_in(other["ipc_ns"]) == []
    again = await run_as(srv, "alice", "import ctypes, json; print(json.dumps(ctypes.CDLL(None).shmget(0xA11CE, 0, 0)))",
                         notebook="ipc.ipynb")
    assert again == -1, "a new kernel for the same notebook starts with no segment"
    await bob_lives_on(srv)


EXHAUST = '''
import ctypes, errno, json, os, sys
if os.readlink("/proc/self/ns/ipc") == HOST_NS:
    print(json.dumps("the host's IPC namespace: not filling it"))
    sys.exit()
libc = ctypes.CDLL(None, use_errno=True)
def fill(make, cap=40000):
    n = 0
    while n < cap:
        if make(n) < 0:
            return [n, errno.errorcode[ctypes.get_errno()]]
        n += 1
    return [n, "no limit"]
got = {
  "shm_ids": fill(lambda i: libc.shmget(0, 1, 0o1600)),        # every id the namespace has (shmmni)
  "sem_ids": fill(lambda i: libc.semget(0, 1, 0o1600)),
  "msg_ids": fill(lambda i: libc.msgget(0, 0o1600)),
}
for table, rm in (("shm", lambda i: libc.shmctl(i, 0, None)), ("sem", lambda i: libc.semctl(i, 0, 0)),
                  ("msg", lambda i: libc.msgctl(i, 0, None))):
    for line in open("/proc/sysvipc/" + table).read().splitlines()[1:]:
        rm(int(line.split()[1]))  # IPC_RMID
got["shm_bytes"] = fill(lambda i: libc.shmget(0, 8 << 20, 0o1600))  # then every page (shmall)
got["too_big"] = libc.shmget(0, SIZE + 4096, 0o1600), errno.errorcode[ctypes.get_errno()]
print(json.dumps(got))
'''


@needs_sandbox
async def test_exhausting_ipc_limits_leaves_other_kernels_alone(srv: KernelpoolServer) -> None:
    code = EXHAUST.replace("SIZE", str(TMPFS)).replace("HOST_NS", repr(os.readlink("/proc/self/ns/ipc")))
    got = await run_as(srv, "alice", code, notebook="exhaust.ipynb")
    assert isinstance(got, dict), got
    assert got["shm_ids"] == [4096, "ENOSPC"] and got["sem_ids"][1] == got["msg_ids"][1] == "ENOSPC", got
    assert got["shm_bytes"] == [TMPFS // (8 << 20), "ENOSPC"], "shmall: kernel_tmpfs_size in all"
    assert got["too_big"] == [-1, "EINVAL"], "shmmax: no segment larger than kernel_tmpfs_size"
    # with alice's namespace full, bob (and alice's other kernels) still get segments
    for user, notebook in (("bob", "bob.ipynb"), ("alice", "probe.ipynb")):
        made = await run_as(srv, user, '''
import ctypes, json
libc = ctypes.CDLL(None)
print(json.dumps([libc.shmget(0, 1 << 20, 0o1600), libc.semget(0, 1, 0o1600), libc.msgget(0, 0o1600)]))
''', notebook=notebook)
        assert all(i >= 0 for i in made), (user, made)
    async with mcp_client(srv.url, srv.tokens["alice"], mode="auto") as c:
        assert not (await c.call_tool("unuse_notebook", {"notebook": "exhaust.ipynb"})).is_error
    await bob_lives_on(srv)


@needs_sandbox
async def test_shared_memory_and_messages_count_against_the_kernels_memory(srv: KernelpoolServer) -> None:
    pid = await pid_of(srv, "alice", "shm.ipynb")
    with open(f"/proc/{pid}/cgroup") as f:
        memory = next(line.split(":", 2)[2] for line in f.read().splitlines() if ":memory:" in line)
    usage = f"/sys/fs/cgroup/memory{memory}/memory.usage_in_bytes"

    async def grows_by(code: str) -> int:
        before = int(Path(usage).read_text())
        assert await run_as(srv, "alice", code, notebook="shm.ipynb") == "held"
        return int(Path(usage).read_text()) - before

    # a segment filled, then detached but not removed: no process maps its pages, which stay
    assert await grows_by('''
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
addr = libc.shmat(libc.shmget(0, 48 << 20, 0o1600), None, 0)
ctypes.memset(addr, 1, 48 << 20)
libc.shmdt(ctypes.c_void_p(addr))
print(json.dumps("held"))
''') >= 40 << 20
    # messages left in queues (kernel memory, charged to the sender's cgroup): 2 x 8000 bytes in each of 1000
    assert await grows_by('''
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
class Msg(ctypes.Structure):
    _fields_ = [("type", ctypes.c_long), ("text", ctypes.c_char * 8000)]
msg = Msg(1, b"x" * 7999)
for _ in range(1000):
    q = libc.msgget(0, 0o1600)
    assert libc.msgsnd(q, ctypes.byref(msg), 8000, 0o4000) == 0 and libc.msgsnd(q, ctypes.byref(msg), 8000, 0o4000) == 0
print(json.dumps("held"))
''') >= 12 << 20
    async with mcp_client(srv.url, srv.tokens["alice"], mode="auto") as c:
        assert not (await c.call_tool("unuse_notebook", {"notebook": "shm.ipynb"})).is_error
    await bob_lives_on(srv)


@needs_sandbox
async def test_host_mqueue_is_replaced_by_the_kernels_own(srv: KernelpoolServer) -> None:
    # Docker mounts the container's mqueue at /dev/mqueue; this host has none, so the test makes one
    made = not os.path.exists("/dev/mqueue")
    if made:
        os.mkdir("/dev/mqueue")
    _libc.mount("mqueue", "/dev/mqueue", "mqueue", 0, None)
    try:
        with open("/dev/mqueue/kp-host-queue", "w"):
            pass  # creating a file there creates a POSIX message queue
        got = await run_as(srv, "alice", '''
import ctypes, json, os
rt = ctypes.CDLL("librt.so.1", use_errno=True)
before = os.listdir("/dev/mqueue")
q = rt.mq_open(b"/alice-queue", os.O_CREAT | os.O_RDWR, 0o600, None)
print(json.dumps({"before": before, "q": q, "after": os.listdir("/dev/mqueue")}))
''', notebook="mq.ipynb")  # a kernel started after the host's mqueue was mounted
        assert got["before"] == [] and got["q"] >= 0 and got["after"] == ["alice-queue"], got
        assert os.listdir("/dev/mqueue") == ["kp-host-queue"], "alice's queue is in her namespace only"
        async with mcp_client(srv.url, srv.tokens["alice"], mode="auto") as c:
            assert not (await c.call_tool("unuse_notebook", {"notebook": "mq.ipynb"})).is_error
    finally:
        for name in ("kp-host-queue", "alice-queue"):  # alice's is there only if she reached the host's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/mqueue/{name}")  # a queue outlives its file system's mount
        _libc.umount2("/dev/mqueue", _libc.MNT_DETACH)
        if made:
            os.rmdir("/dev/mqueue")
    await bob_lives_on(srv)


# ---- /sys, /run, /dev/pts ------------------------------------------------------------------------

NAMES_PROBE = '''
import json, os, socket
def ls(p):
    try:
        return sorted(os.listdir(p))
    except OSError as e:
        return type(e).__name__
print(json.dumps({"net": ls("/sys/class/net"), "virtual": ls("/sys/devices/virtual/net"),
  "ifaces": sorted(n for _, n in socket.if_nameindex()), "netns": ls("/run/netns"), "var_netns": ls("/var/run/netns"),
  "pts": ls("/dev/pts"), "mountinfo": open("/proc/self/mountinfo").read(), "cgroupfs": ls("/sys/fs/cgroup"),
  "cgroup": open("/proc/self/cgroup").read()}))
'''


def _assert_no_other_tenant(server: KernelpoolServer, got: dict) -> None:
    uid = str(uid_of(server, "bob"))
    names = [*got["net"], *got["virtual"], *got["netns"], *got["var_netns"], *got["pts"]]
    assert not [n for n in names if uid in n], (uid, names)
    for seen in (json.dumps(names), got["mountinfo"]):
        assert server.env["KERNELPOOL_NETWORK_PREFIX"] not in seen, "no link or namespace of this server is named"
        assert f"{server.env['KERNELPOOL_ACCOUNT_PREFIX']}bob" not in seen
    assert "/run/netns/" not in got["mountinfo"]


@needs_sandbox
async def test_sys_run_and_pts_show_only_the_kernels_own(srv: KernelpoolServer) -> None:
    prefix = srv.env["KERNELPOOL_NETWORK_PREFIX"]
    bob_link = f"{prefix}{uid_of(srv, 'bob')}"
    assert bob_link in os.listdir("/sys/class/net"), "the host has bob's link, with its counters"
    assert any(n.startswith(prefix) for n in os.listdir("/run/netns")), "and the host lists the namespaces"
    got = await run_as(srv, "alice", NAMES_PROBE)
    assert got["net"] == got["virtual"] == got["ifaces"] == ["eth0", "lo"], got  # loopback and its own veth end
    assert got["netns"] == got["var_netns"] == [], got
    assert got["pts"] == ["ptmx"], "bob's terminal (held open) is not listed: a pty instance of its own"
    _assert_no_other_tenant(srv, got)
    # the cgroup view still sits in the fresh /sys
    assert {"memory", "cpu", "pids"} <= set(got["cgroupfs"]) and all(
        line.endswith(":/") for line in got["cgroup"].splitlines())
    # and a terminal of its own still works (IPython's `!cmd` runs in one)
    pty = await run_as(srv, "alice", '''
import json, os
m, s = os.openpty()
get_ipython().system("echo from-a-pty > pty.txt")
print(json.dumps([os.ttyname(s), sorted(os.listdir("/dev/pts")), open("pty.txt").read().strip()]))
''')
    assert pty == ["/dev/pts/0", ["0", "ptmx"], "from-a-pty"], pty
    await bob_lives_on(srv)


@needs_sandbox
@pytest.mark.parametrize("mode", ["none", "host"])
@pytest.mark.parametrize("fork_server", ["true", "false"])
async def test_sys_in_other_network_modes(mode: str, fork_server: str) -> None:
    n = {("none", "true"): 6, ("none", "false"): 7, ("host", "true"): 8, ("host", "false"): 9}[mode, fork_server]
    server = _new_server(n, KERNELPOOL_KERNEL_NETWORK=mode, KERNELPOOL_FORK_SERVER=fork_server)
    try:
        await _bob_setup(server)
        got = await run_as(server, "alice", NAMES_PROBE)
        assert got["net"] == got["ifaces"], "/sys/class/net is the kernel's own network namespace's"
        # covered where it exists ('host' makes no namespace; other servers on the host may have)
        assert got["netns"] in ([], "FileNotFoundError") and got["pts"] == ["ptmx"], got
        assert all(line.endswith(":/") for line in got["cgroup"].splitlines()), got["cgroup"]
        if mode == "none":
            assert got["net"] == ["lo"]
            _assert_no_other_tenant(server, got)
        else:
            # 'host' shares the host's network (unsafe, the server warns): /sys shows what the kernel's own
            # socket calls show anyway, the host's links; still a fresh sysfs, with only the kernel's cgroups
            assert "lo" in got["net"] and set(got["net"]) & (set(os.listdir("/sys/class/net")) - {"lo"})
            assert got["cgroupfs"], "the kernel's own cgroups, mounted in the fresh /sys"
        await bob_lives_on(server)
    finally:
        server.cleanup()


# ---- accounts ------------------------------------------------------------------------------------

ACCOUNTS_PROBE = '''
import getpass, grp, json, os, pwd, subprocess
def tryread(p):
    try:
        return open(p).read()
    except FileNotFoundError:
        return None
    except OSError as e:
        return type(e).__name__
def lookup(fn, key):
    try:
        return list(fn(key))
    except KeyError:
        return "KeyError"
bare = {"PATH": os.environ["PATH"]}  # no USER, LOGNAME or HOME: the passwd entry answers
me = pwd.getpwuid(os.getuid())
print(json.dumps({
  "passwd": open("/etc/passwd").read(), "group": open("/etc/group").read(),
  "all_users": sorted(e.pw_name for e in pwd.getpwall()), "all_groups": sorted(g.gr_name for g in grp.getgrall()),
  "me": [me.pw_name, me.pw_dir], "home": os.path.expanduser("~"), "getuser": getpass.getuser(),
  "bare_getuser": subprocess.run(["python3", "-c", "import getpass; print(getpass.getuser())"], env=bare,
                                 capture_output=True, text=True).stdout.strip(),
  "bare_home": subprocess.run(["python3", "-c", "import os; print(os.path.expanduser('~'))"], env=bare,
                              capture_output=True, text=True).stdout.strip(),
  "id": subprocess.run(["id"], capture_output=True, text=True).stdout.strip(),
  "whoami": subprocess.run(["whoami"], capture_output=True, text=True).stdout.strip(),
  "ipython_whoami": get_ipython().getoutput("whoami"),
  "bob_by_name": lookup(pwd.getpwnam, "BOB"), "bob_by_uid": lookup(pwd.getpwuid, BOB_UID),
  "masked": {p: tryread(p) for p in ("/etc/passwd-", "/etc/group-", "/etc/subuid", "/etc/subgid")},
  "shadow": tryread("/etc/shadow"), "gshadow": tryread("/etc/gshadow"),
  "write": subprocess.run(["sh", "-c", "echo x >> /etc/passwd"], capture_output=True).returncode,
}))
'''


@needs_sandbox
async def test_account_files_name_only_the_kernels_own_user(srv: KernelpoolServer) -> None:
    prefix = srv.env["KERNELPOOL_ACCOUNT_PREFIX"]
    alice, bob = pwd.getpwnam(f"{prefix}alice"), pwd.getpwnam(f"{prefix}bob")
    with open("/etc/passwd") as f:
        assert bob.pw_name in f.read(), "the host's file lists bob"
    got = await run_as(srv, "alice", ACCOUNTS_PROBE.replace("BOB_UID", str(bob.pw_uid)).replace("BOB", bob.pw_name))
    nobody = pwd.getpwuid(65534).pw_name
    assert got["all_users"] == sorted(["root", alice.pw_name, nobody]), got["passwd"]
    assert got["all_groups"] == sorted(["root", alice.pw_name, grp.getgrgid(65534).gr_name]), got["group"]
    own = f"{alice.pw_name}:x:{alice.pw_uid}:{alice.pw_gid}::{alice.pw_dir}:{alice.pw_shell}"
    assert own in got["passwd"].splitlines(), "the same entry as the host's"
    for seen in (got["passwd"], got["group"]):
        assert bob.pw_name not in seen and str(bob.pw_uid) not in seen and bob.pw_dir not in seen
    assert got["bob_by_name"] == got["bob_by_uid"] == "KeyError"
    assert got["me"] == [alice.pw_name, alice.pw_dir] and got["home"] == got["bare_home"] == alice.pw_dir
    assert got["getuser"] == got["bare_getuser"] == got["whoami"] == alice.pw_name
    assert got["ipython_whoami"] == [alice.pw_name]
    assert got["id"] == f"uid={alice.pw_uid}({alice.pw_name}) gid={alice.pw_gid}({alice.pw_name}) groups={alice.pw_gid}({alice.pw_name})"
    assert set(got["masked"].values()) == {""}, got["masked"]
    assert got["shadow"] == got["gshadow"] == "PermissionError"
    assert got["write"] != 0
    # useradd replaces the host's /etc/passwd and /etc/group (a new file renamed over each); the kernel
    # that was running keeps its own, with neither bob nor the new user in them
    before = os.stat("/etc/passwd").st_ino
    srv.add_user(f"carol{os.getpid() % 1000}")
    assert os.stat("/etc/passwd").st_ino != before, "the host's file was replaced"
    carol = pwd.getpwnam(f"{prefix}carol{os.getpid() % 1000}")
    again = await run_as(srv, "alice", '''
import json
print(json.dumps([open("/etc/passwd").read(), open("/etc/group").read(), open("/etc/passwd-").read()]))
''')
    assert again[:2] == [got["passwd"], got["group"]] and again[2] == "", again
    assert carol.pw_name not in json.dumps(again) and bob.pw_name not in json.dumps(again)
    await bob_lives_on(srv)


# ---- the pieces on their own ---------------------------------------------------------------------

MOUNTINFO_V1 = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def test_joined_hierarchies_are_the_ones_holding_the_kernels_cgroup() -> None:
    procs = [f"/sys/fs/cgroup/{c}/kp/u1/kabc/cgroup.procs" for c in ("memory", "cpu", "pids", "cpuacct")]
    got = views.joined_hierarchies(procs, MOUNTINFO_V1)
    assert got == [
        ("/sys/fs/cgroup/memory", "cgroup", "memory"),
        ("/sys/fs/cgroup/cpu", "cgroup", "cpu"),
        ("/sys/fs/cgroup/pids", "cgroup", "pids"),
        ("/sys/fs/cgroup/cpuacct", "cgroup", "cpuacct"),
    ]
    v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    assert views.joined_hierarchies(["/sys/fs/cgroup/kp/u1/kabc/cgroup.procs"], v2) == [
        ("/sys/fs/cgroup", "cgroup2", "nsdelegate,memory_recursiveprot")]
    assert views.joined_hierarchies([], MOUNTINFO_V1) == []
    assert views._unescape("/a\\040b\\134c") == "/a b\\c"


@needs_sandbox
def test_replaced_files_survive_a_rename_and_keep_submounts() -> None:
    # a stand-in for /etc: what the host does to it while the child's overlay is in place
    base = tempfile.mkdtemp(prefix="kp-views-etc-", dir="/var/tmp")
    etc, scratch, outside = (os.path.join(base, n) for n in ("etc", "scratch", "hosts-outside"))
    for folder in (etc, scratch):
        os.mkdir(folder)
    for path, data in ((f"{etc}/passwd", "host 1\n"), (f"{etc}/hosts", "underneath\n"), (f"{etc}/subuid", "bob:100000:65536\n"),
                       (outside, "docker's hosts\n"), (f"{base}/everyone", "bob:x:1:1::/b:/bin/sh\n")):
        with open(path, "w") as f:
            f.write(data)
    os.chmod(etc, 0o755)
    etc_mode = oct(0o755)
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            views.enter_mount_namespace()
            _libc.mount(outside, f"{etc}/hosts", None, _libc.MS_BIND, None)  # as Docker binds /etc/hosts
            _libc.mount(f"{base}/everyone", f"{etc}/passwd", None, _libc.MS_BIND, None)  # -v /etc/passwd:/etc/passwd
            views.replace_files({f"{etc}/passwd": "ours\n"}, (f"{etc}/subuid",), views.read_mountinfo(), scratch=scratch)
            def read() -> dict[str, str]:
                return {n: Path(etc, n).read_text() for n in sorted(os.listdir(etc))}
            first = read()
            os.write(out_w, b"x")
            os.read(go_r, 1)
            os.write(out_w, json.dumps({"first": first, "then": read(), "scratch": os.listdir(scratch),
                                        "mode": oct(os.stat(etc).st_mode & 0o7777)}).encode())
            code = 0
        finally:
            os._exit(code)
    try:
        os.close(out_w)
        assert os.read(out_r, 1) == b"x"
        with open(f"{etc}/passwd+", "w") as f:
            f.write("host 2\n")
        os.rename(f"{etc}/passwd+", f"{etc}/passwd")  # what useradd does
        with open(f"{etc}/newfile", "w") as f:
            f.write("new\n")
        os.write(go_w, b"x")
        with os.fdopen(out_r, "rb") as report:
            seen = json.loads(report.read())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(go_r)
        os.close(go_w)
        shutil.rmtree(base, ignore_errors=True)
    assert seen["first"] == {"hosts": "docker's hosts\n", "passwd": "ours\n", "subuid": ""}, seen
    assert seen["then"] == {**seen["first"], "newfile": "new\n"}, "still its own passwd; a new host file shows"
    assert seen["scratch"] == [], "the top layer is reachable through the overlay only"
    assert seen["mode"] == etc_mode, "the merged folder keeps the host folder's mode"


def test_seccomp_program_is_bpf_and_names_real_syscalls() -> None:
    program = seccomp.program()
    assert program and len(program) % 8 == 0
    assert seccomp.program() is program, "built once per process"
    with pytest.raises(ValueError):
        _libc.load_seccomp_filter(b"\0" * 7)


@needs_sandbox
def test_doctor_reports_mount_pid_and_seccomp_isolation() -> None:
    data_dir = tempfile.mkdtemp(prefix="kp-views-doc-", dir="/var/tmp")
    try:
        server = KernelpoolServer(data_dir, server_env())
        out = server.cli("doctor", "--json")
        report = json.loads(out.stdout)
        for key in ("mount_namespace", "proc_hidepid", "cgroup_namespace", "seccomp", "ipc_namespace", "private_sysfs",
                    "etc_overlay"):
            assert report["host"][key] is True, key
        inf = report["in_force"]
        assert inf["private_mounts"] and inf["cgroup_namespace"] and inf["seccomp"]
        assert inf["ipc_namespace"] and inf["private_sysfs"] and inf["own_account_files"]
        assert inf["pid_isolation"] == "proc hidepid=invisible"
        plain = server.cli("doctor").stdout
        for line in ("mount isolation:     yes", "pid isolation:       yes", "seccomp:             yes",
                     "ipc namespaces:      yes", "own /sys:            yes", "own /etc/passwd:     yes"):
            assert line in plain, plain
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_tmpfs_size_setting_is_checked() -> None:
    from pydantic import ValidationError

    from kernelpool.config import Settings

    assert Settings(kernel_tmpfs_size="64M").tmpfs_bytes == 64 << 20
    for bad in ("lots", "100K", "-1G"):
        with pytest.raises(ValidationError, match="kernel_tmpfs_size"):
            Settings(kernel_tmpfs_size=bad)
