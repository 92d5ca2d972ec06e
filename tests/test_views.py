"""What one user's kernel can see of another's (issue 10, parts 3 and 4): private /tmp and
/dev/shm, a /proc that lists only its own processes, cgroup views with no names, and the seccomp
filter. Every attack runs in alice's kernel against bob's; bob's kernel keeps its state.

Each server-level test runs twice: kernels forked by the fork server, and started the stock way
(`fork_server = false`), since the two start paths run `sandbox.enter` in different processes.
Real servers, real kernels, real mounts; as root, skipped with the reason elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Iterator

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
                  "shm": open("/dev/shm/bob-shm-secret").read(), "folder": os.path.isdir("/tmp/bob-folder")}))
''', notebook="bob.ipynb")
    assert got == {"state": "bob-state", "tmp": "bob", "shm": "bob", "folder": True}, "bob's kernel keeps its state and files"


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
    before = int(open(usage).read())
    await run_as(srv, "bob", 'open("/dev/shm/bob-blob", "wb").write(b"x" * (48 << 20)); print("{}")', notebook="bob.ipynb")
    after = int(open(usage).read())
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
  "bob_cmdline": tryread("/proc/{bob_pid}/cmdline"), "server_cmdline": tryread("/proc/{srv.proc.pid}/cmdline")}}))
child.kill()
_ = child.wait()
''')
    # the server, bob's kernel, init, and whatever else the server runs that is not alice's (a zygote)
    others = {p.pid for p in psutil.Process(srv.proc.pid).children() if p.uids().real != alice_uid}
    hidden = {bob_pid, srv.proc.pid, 1} | others
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
    for name in ("io_uring_setup", "userfaultfd", "mount", "bpf", "perf_event_open", "keyctl", "ptrace", "setns",
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
        for key in ("mount_namespace", "proc_hidepid", "cgroup_namespace", "seccomp"):
            assert report["host"][key] is True, key
        inf = report["in_force"]
        assert inf["private_mounts"] and inf["cgroup_namespace"] and inf["seccomp"]
        assert inf["pid_isolation"] == "proc hidepid=invisible"
        plain = server.cli("doctor").stdout
        for line in ("mount isolation:     yes", "pid isolation:       yes", "seccomp:             yes"):
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
