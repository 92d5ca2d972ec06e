"""The attack suite: code run in alice's kernel, through the MCP tools, tries to reach bob and
the server. Runs as root where the host can isolate; skipped, with the reason, elsewhere."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.client import mcp_client
from testkit.server import KernelpoolServer, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"sandbox tests need isolation: {SANDBOX_SKIP}")

MEMORY = 256 * 1024 * 1024
PIDS = 64


@pytest.fixture(scope="module")
def sec() -> Iterator[KernelpoolServer]:
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_KERNEL_MEMORY="256M", KERNELPOOL_KERNEL_PIDS=str(PIDS), KERNELPOOL_KERNEL_CPUS="1",
        KERNELPOOL_POOL_SIZE="0", KERNELPOOL_EXECUTE_TIMEOUT="60",
    ))
    try:
        server.add_user("alice")
        server.add_user("bob")
        server.start()
        asyncio.run(_bob_setup(server))
        yield server
    finally:
        server.cleanup()


async def _bob_setup(server: KernelpoolServer) -> None:
    async with mcp_client(server.url, server.tokens["bob"], mode="auto") as b:
        await b.call_tool("use_notebook", {"notebook": "secret.ipynb", "mode": "create"})
        await b.call_tool("insert_execute_code_cell", {"notebook": "secret.ipynb", "cell_index": -1,
                                                        "cell_source": "SECRET = 'bob-secret'; print('ok')"})


def text(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


async def run_as(server: KernelpoolServer, user: str, code: str, notebook: str = "attack.ipynb", **extra) -> dict:
    """Run `code` in `user`'s kernel; the code prints one JSON line, which is returned parsed."""
    async with mcp_client(server.url, server.tokens[user], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": notebook, "mode": "create"})
        if r.is_error and "already exists" not in text(r):
            raise AssertionError(text(r))
        r = await c.call_tool("execute_code", {"notebook": notebook, "code": code, **extra})
        assert not r.is_error, text(r)
        out = text(r)
    return json.loads(out.strip().splitlines()[-1])


def bob_run(server: KernelpoolServer, user: str = "bob") -> str:
    """DATA/run/<uid>: the user's kernel folders (root's; see sandbox.rundir)."""
    uid = pwd.getpwnam(f"{server.env['KERNELPOOL_ACCOUNT_PREFIX']}{user}").pw_uid
    return os.path.join(server.data_dir, "run", str(uid))


async def kernel_pid(server: KernelpoolServer, user: str, notebook: str) -> int:
    async with mcp_client(server.url, server.tokens[user], mode="auto") as c:
        kernels = (await c.call_tool("list_kernels", {})).structured_content["kernels"]
    return next(k["pid"] for k in kernels if k["notebook"] == notebook)


ATTEMPT = '''
import json, os
def attempt(f):
    try:
        f()
        return "ALLOWED"
    except Exception as e:
        return type(e).__name__
'''


async def test_kernel_runs_as_the_user_with_nothing_else(sec: KernelpoolServer) -> None:
    code = '''
import json, os
status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
open("umask-check", "w").close()
print(json.dumps({"res": os.getresuid(), "resg": os.getresgid(), "groups": os.getgroups(),
  "nnp": status["NoNewPrivs"].strip(), "mode": oct(os.stat("umask-check").st_mode & 0o777),
  "cwd": os.getcwd(), "env": sorted(os.environ), "pid": os.getpid(), "cgroup": open("/proc/self/cgroup").read()}))
'''
    got = await run_as(sec, "alice", code)
    # the kernel's own view: a cgroup namespace rooted at its cgroup, no names
    assert all(line.endswith(":/") for line in got["cgroup"].splitlines()), got["cgroup"]
    with open(f"/proc/{got['pid']}/cgroup") as f:  # the host's view
        got["cgroup"] = f.read()
    account = pwd.getpwnam(f"{sec.env['KERNELPOOL_ACCOUNT_PREFIX']}alice")
    assert got["res"] == [account.pw_uid] * 3
    assert got["resg"] == [account.pw_gid] * 3
    assert got["groups"] == []
    assert got["nnp"] == "1"
    assert got["mode"] == "0o600"
    assert got["cwd"] == os.path.join(sec.data_dir, "users", "alice")
    assert not [k for k in got["env"] if k.startswith("KERNELPOOL") or "TOKEN" in k]
    assert account.pw_dir == os.path.join(sec.data_dir, "users", "alice")
    # the kernel's cgroup carries the configured limits
    memory_line = next(line for line in got["cgroup"].splitlines() if ":memory:" in line)
    cg_dir = "/sys/fs/cgroup/memory" + memory_line.split(":", 2)[2]
    assert f"/{sec.env['KERNELPOOL_CGROUP_PREFIX']}/u{account.pw_uid}/k" in cg_dir and "alice" not in cg_dir
    assert int(Path(f"{cg_dir}/memory.limit_in_bytes").read_text()) == MEMORY
    pids_line = next(line for line in got["cgroup"].splitlines() if ":pids:" in line)
    assert int(Path("/sys/fs/cgroup/pids" + pids_line.split(":", 2)[2] + "/pids.max").read_text()) == PIDS
    cpu_line = next(line for line in got["cgroup"].splitlines() if ":cpu," in line or ":cpu:" in line or ",cpu:" in line)
    cpu_dir = "/sys/fs/cgroup/cpu" + cpu_line.split(":", 2)[2]
    assert int(Path(f"{cpu_dir}/cpu.cfs_quota_us").read_text()) == int(Path(f"{cpu_dir}/cpu.cfs_period_us").read_text())


async def test_cannot_touch_another_users_files(sec: KernelpoolServer) -> None:
    bob = os.path.join(sec.data_dir, "users", "bob")
    code = ATTEMPT + f'''
bob = {bob!r}
print(json.dumps({{
  "read": attempt(lambda: open(bob + "/secret.ipynb").read()),
  "list": attempt(lambda: os.listdir(bob)),
  "write": attempt(lambda: open(bob + "/planted.ipynb", "w").write("x")),
  "db": attempt(lambda: open({os.path.join(sec.data_dir, "kernelpool.db")!r}, "rb").read(10)),
  "wal": attempt(lambda: open({os.path.join(sec.data_dir, "kernelpool.db-wal")!r}, "rb").read(10)),
  "users_dir": attempt(lambda: os.listdir({os.path.join(sec.data_dir, "users")!r})),
  "run_dir": attempt(lambda: os.listdir({bob_run(sec)!r})),
  "run_tmp": attempt(lambda: os.listdir({os.path.join(bob_run(sec), "tmp")!r})),
  "shadow": attempt(lambda: open("/etc/shadow").read()),
}}))
'''
    got = await run_as(sec, "alice", code)
    assert all(v == "PermissionError" for v in got.values()), got
    assert not os.path.exists(os.path.join(bob, "planted.ipynb"))


async def test_cannot_signal_or_inspect_another_users_kernel_or_the_server(sec: KernelpoolServer) -> None:
    bob_pid = await kernel_pid(sec, "bob", "secret.ipynb")
    code = ATTEMPT + f'''
import signal
print(json.dumps({{
  "kill": attempt(lambda: os.kill({bob_pid}, signal.SIGKILL)),
  "stop": attempt(lambda: os.kill({bob_pid}, signal.SIGSTOP)),
  "killpg": attempt(lambda: os.killpg({bob_pid}, signal.SIGKILL)),
  "kill_server": attempt(lambda: os.kill({sec.pid}, signal.SIGTERM)),
  "bob_environ": attempt(lambda: open("/proc/{bob_pid}/environ").read()),
  "server_environ": attempt(lambda: open("/proc/{sec.pid}/environ").read()),
  "bob_mem": attempt(lambda: open("/proc/{bob_pid}/mem", "rb").read(1)),
  "server_fds": attempt(lambda: os.listdir("/proc/{sec.pid}/fd")),
}}))
'''
    got = await run_as(sec, "alice", code)
    signals = {k: got.pop(k) for k in ("kill", "stop", "killpg", "kill_server")}
    assert all(v == "PermissionError" for v in signals.values()), signals
    # alice's /proc (hidepid=invisible) does not even list bob's kernel or the server
    assert all(v == "FileNotFoundError" for v in got.values()), got
    async with mcp_client(sec.url, sec.tokens["bob"], mode="auto") as b:
        r = await b.call_tool("execute_code", {"notebook": "secret.ipynb", "code": "SECRET"})
        assert text(r) == "'bob-secret'", "bob's kernel lives on, its state intact"


async def test_cannot_connect_to_another_users_kernel_sockets(sec: KernelpoolServer) -> None:
    run_bob = bob_run(sec)
    kernel_dirs = [os.path.join(run_bob, n) for n in os.listdir(run_bob) if n != "tmp"]
    sockets = [os.path.join(d, "s", n) for d in kernel_dirs for n in os.listdir(os.path.join(d, "s"))]
    assert sockets, "bob's kernel has ipc sockets"
    code = ATTEMPT + f'''
import socket
def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    finally:
        s.close()
def zmq_connect(path):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect("ipc://" + path)
    s.send(b"x")
    s.close(); ctx.term()
    os.stat(path)  # zmq connects lazily; whether the path is even visible tells the truth
conn = {os.path.join(kernel_dirs[0], "kernel.json")!r}
print(json.dumps({{
  "unix": [attempt(lambda p=p: connect(p)) for p in {sockets!r}],
  "zmq": [attempt(lambda p=p: zmq_connect(p)) for p in {sockets!r}],
  "connection_file": attempt(lambda: open(conn).read()),
}}))
'''
    got = await run_as(sec, "alice", code)
    assert set(got["unix"]) == {"PermissionError"}, got
    assert set(got["zmq"]) == {"PermissionError"}, got
    assert got["connection_file"] == "PermissionError"


async def test_links_planted_by_a_kernel_do_not_steer_the_server(sec: KernelpoolServer) -> None:
    bob_nb = os.path.join(sec.data_dir, "users", "bob", "secret.ipynb")
    before = Path(bob_nb).read_text()
    code = f'''
import os, json
os.symlink({bob_nb!r}, "evil.ipynb")
os.symlink({os.path.join(sec.data_dir, "users", "bob")!r}, "bobdir")
os.symlink("/etc", "etcdir")
os.symlink("/etc/shadow", "shadow.ipynb")
print(json.dumps("planted"))
'''
    assert await run_as(sec, "alice", code) == "planted"
    async with mcp_client(sec.url, sec.tokens["alice"], mode="auto") as c:
        for tool, args in [
            ("read_notebook", {"notebook": "evil.ipynb"}),
            ("read_notebook", {"notebook": "bobdir/secret.ipynb"}),
            ("read_notebook", {"notebook": "shadow.ipynb"}),
            ("insert_cell", {"notebook": "evil.ipynb", "cell_index": -1, "cell_type": "code", "cell_source": "x"}),
            ("insert_cell", {"notebook": "bobdir/secret.ipynb", "cell_index": -1, "cell_type": "code", "cell_source": "x"}),
            ("use_notebook", {"notebook": "bobdir/new.ipynb", "mode": "create"}),
            ("use_notebook", {"notebook": "etcdir/new.ipynb", "mode": "create"}),
            ("list_files", {"path": "bobdir"}),
            ("list_files", {"path": "etcdir"}),
        ]:
            r = await c.call_tool(tool, args)
            assert r.is_error, (tool, args, text(r))
            assert "bob-secret" not in text(r) and "root:" not in text(r)
        listed = (await c.call_tool("list_notebooks", {})).structured_content["notebooks"]
        assert not {n["path"] for n in listed} & {"evil.ipynb", "shadow.ipynb", "bobdir/secret.ipynb"}
    assert Path(bob_nb).read_text() == before
    assert not os.path.exists(os.path.join(sec.data_dir, "users", "bob", "new.ipynb"))
    assert not os.path.exists("/etc/new.ipynb")


async def test_memory_exhaustion_kills_only_that_kernel(sec: KernelpoolServer) -> None:
    async with mcp_client(sec.url, sec.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "oom.ipynb", "mode": "create"})
        await c.call_tool("insert_execute_code_cell", {"notebook": "oom.ipynb", "cell_index": -1, "cell_source": "before = 1"})
        r = await c.call_tool("insert_execute_code_cell", {
            "notebook": "oom.ipynb", "cell_index": -1,
            "cell_source": "print('allocating', flush=True)\nblocks = []\nwhile True:\n    blocks.append(bytearray(16 * 2**20))",
        })
        assert r.is_error
        msg = r.structured_content["message"]
        assert "out of memory" in msg and "256 MiB" in msg, msg
        assert r.structured_content["status"] == "died"
        # the next call gets a fresh kernel
        r = await c.call_tool("execute_code", {"notebook": "oom.ipynb", "code": "'before' in dir()"})
        assert text(r) == "False"
    nb_path = os.path.join(sec.data_dir, "users", "alice", "oom.ipynb")
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    nbformat.validate(nb)
    assert [c.source.splitlines()[0] for c in nb.cells] == ["before = 1", "print('allocating', flush=True)"]
    async with mcp_client(sec.url, sec.tokens["bob"], mode="auto") as b:
        r = await b.call_tool("execute_code", {"notebook": "secret.ipynb", "code": "SECRET"})
        assert text(r) == "'bob-secret'"


async def test_fork_bomb_is_bounded(sec: KernelpoolServer) -> None:
    code = '''
import os, json, time
children, error = 0, None
try:
    for _ in range(10000):
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
except OSError as e:
    error = type(e).__name__
print(json.dumps({"children": children, "error": error}))
'''
    got = await run_as(sec, "alice", code, notebook="forkbomb.ipynb")
    assert got["error"] == "BlockingIOError" and got["children"] < PIDS, got
    async with mcp_client(sec.url, sec.tokens["bob"], mode="auto") as b:
        r = await b.call_tool("execute_code", {"notebook": "secret.ipynb", "code": "SECRET"})
        assert text(r) == "'bob-secret'"
    async with mcp_client(sec.url, sec.tokens["alice"], mode="auto") as c:
        assert not (await c.call_tool("unuse_notebook", {"notebook": "forkbomb.ipynb"})).is_error


async def test_cpu_hog_does_not_starve_another_user(sec: KernelpoolServer) -> None:
    hog = '''
import multiprocessing as mp, time, json
def spin(seconds):
    end = time.time() + seconds
    while time.time() < end:
        pass
procs = [mp.Process(target=spin, args=(8,)) for _ in range(4)]
[p.start() for p in procs]; [p.join() for p in procs]
print(json.dumps("done"))
'''
    async with mcp_client(sec.url, sec.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "hog.ipynb", "mode": "create"})
        task = asyncio.create_task(c.call_tool("execute_code", {"notebook": "hog.ipynb", "code": hog}))
        await asyncio.sleep(1.0)
        latencies = []
        async with mcp_client(sec.url, sec.tokens["bob"], mode="auto") as b:
            for _ in range(10):
                t = time.monotonic()
                r = await b.call_tool("execute_code", {"notebook": "secret.ipynb", "code": "1+1"})
                latencies.append(time.monotonic() - t)
                assert text(r) == "2"
                await asyncio.sleep(0.2)
        assert not task.done(), "the hog was still running while bob worked"
        r = await task
        assert '"done"' in text(r)
    # alice's kernel is held to 1 core of 2: bob's trivial cells keep answering promptly
    assert sorted(latencies)[len(latencies) // 2] < 0.5, latencies
    assert max(latencies) < 3.0, latencies


async def test_network_none_gives_only_loopback(server_args: list[str]) -> None:
    from sandbox import probe

    if not probe().get("netns"):
        pytest.skip("this host cannot create network namespaces")
    # a cgroup prefix of its own: at start a server kills whatever runs below its prefix (left by a
    # crashed server), which with the module server's prefix would be alice's and bob's kernels
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_POOL_SIZE="0", KERNELPOOL_CGROUP_PREFIX=f"kernelpool-test-{os.getpid()}-none"))
    try:
        server.add_user("carol")
        server.start("--kernel-network", "none")
        code = ATTEMPT + f'''
import socket
def connect():
    socket.create_connection(("127.0.0.1", {server.port}), timeout=2).close()
print(json.dumps({{"ifaces": sorted(n for _, n in socket.if_nameindex()), "server": attempt(connect)}}))
'''
        got = await run_as(server, "carol", code)
        assert got["ifaces"] == ["lo"]
        assert got["server"] == "ConnectionRefusedError"
    finally:
        server.cleanup()


# ---- SysV IPC, /sys, /etc/passwd: shared memory and names another user's kernel could reach ----

async def test_sysv_objects_of_another_user_are_out_of_reach(sec: KernelpoolServer) -> None:
    bob = await run_as(sec, "bob", '''
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
BOB_SEG = libc.shmget(0xB0B5EC, 4096, 0o1666)  # IPC_CREAT, mode 0666: anyone who can name it may attach
ctypes.memmove(libc.shmat(BOB_SEG, None, 0), b"bob-shm-secret", 14)
BOB_Q = libc.msgget(0xB0B5EC, 0o1666)
print(json.dumps({"seg": BOB_SEG, "q": BOB_Q}))
''', notebook="secret.ipynb")
    assert bob["seg"] >= 0 and bob["q"] >= 0, bob
    got = await run_as(sec, "alice", ATTEMPT + f'''
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
def err(r):
    return r if r not in (-1, 2**64 - 1, None) else errno.errorcode[ctypes.get_errno()]
found = []
for shmid in range(0, 32768 * 4):  # the ids a busy namespace would hand out first
    addr = libc.shmat(shmid, None, 0o10000)  # SHM_RDONLY
    if addr not in (None, 2**64 - 1):
        found.append(ctypes.string_at(addr, 14).decode("latin-1"))
        libc.shmdt(ctypes.c_void_p(addr))
print(json.dumps({{"by_key": err(libc.shmget(0xB0B5EC, 0, 0)), "by_id": err(libc.shmat({bob["seg"]}, None, 0)),
  "queue": err(libc.msgget(0xB0B5EC, 0)), "send": err(libc.msgsnd({bob["q"]}, b"\\x01" + bytes(15), 8, 0o4000)),
  "found": found}}))
''')
    assert got == {"by_key": "ENOENT", "by_id": "EINVAL", "queue": "ENOENT", "send": "EINVAL", "found": []}, got
    async with mcp_client(sec.url, sec.tokens["bob"], mode="auto") as b:
        r = await b.call_tool("execute_code", {"notebook": "secret.ipynb", "code": "ctypes.string_at(libc.shmat(BOB_SEG, None, 0), 14)"})
        assert text(r) == "b'bob-shm-secret'", "bob's segment is intact"


async def test_shared_memory_beyond_the_limit_kills_only_that_kernel(sec: KernelpoolServer) -> None:
    # segments filled and detached: no process maps their pages, which still count against the
    # kernel's memory limit; at the limit the kernel dies, and its IPC namespace with every segment
    code = '''
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
print("filling", flush=True)
for i in range(8):
    sid = libc.shmget(0, 64 << 20, 0o1600)
    addr = libc.shmat(sid, None, 0)
    ctypes.memset(addr, 1, 64 << 20)
    libc.shmdt(ctypes.c_void_p(addr))
print("survived")
'''
    host_ns = os.readlink("/proc/self/ns/ipc")
    async with mcp_client(sec.url, sec.tokens["alice"], mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "shm-oom.ipynb", "mode": "create"})
        pid = (await c.call_tool("execute_code", {"notebook": "shm-oom.ipynb", "code": "import os; os.getpid()"}))
        ns = os.readlink(f"/proc/{text(pid)}/ns/ipc")
        assert ns != host_ns
        r = await c.call_tool("execute_code", {"notebook": "shm-oom.ipynb", "code": code})
        assert r.is_error and "out of memory" in r.structured_content["message"], text(r)
        assert "survived" not in text(r)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _ipc_ns(p) == ns]
    assert left == [], "no process is left in alice's IPC namespace: its segments went with it"
    assert not _ipc_lines_of(pwd.getpwnam(f"{sec.env['KERNELPOOL_ACCOUNT_PREFIX']}alice").pw_uid), "none in the host's"
    async with mcp_client(sec.url, sec.tokens["bob"], mode="auto") as b:
        r = await b.call_tool("execute_code", {"notebook": "secret.ipynb", "code": "SECRET"})
        assert text(r) == "'bob-secret'"


def _ipc_ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/ipc")
    except OSError:
        return None


def _ipc_lines_of(uid: int) -> list[str]:
    found = []
    for table in ("shm", "sem", "msg"):
        with open(f"/proc/sysvipc/{table}") as f:
            lines = f.read().splitlines()
        col = lines[0].split().index("uid")
        found += [line for line in lines[1:] if int(line.split()[col]) == uid]
    return found


async def test_no_other_users_name_uid_folder_or_link(sec: KernelpoolServer) -> None:
    bob = pwd.getpwnam(f"{sec.env['KERNELPOOL_ACCOUNT_PREFIX']}bob")
    link = f"{sec.env['KERNELPOOL_NETWORK_PREFIX']}{bob.pw_uid}"
    assert os.path.exists(f"/sys/class/net/{link}/statistics/rx_bytes"), "the host counts bob's traffic there"
    got = await run_as(sec, "alice", ATTEMPT + f'''
import subprocess
hits = []
for top in ("/etc", "/run", "/sys/class/net", "/sys/devices/virtual/net", "/dev"):
    for folder, dirs, files in os.walk(top):  # links are not followed: /sys links back up
        for path in (os.path.join(folder, n) for n in dirs + files):
            if {bob.pw_name!r} in path or {link!r} in path or "/{bob.pw_uid}" in path:
                hits.append(path)
def grep(path):
    try:
        data = open(path, errors="replace").read()
    except OSError:
        return False
    return any(w in data for w in ({bob.pw_name!r}, {bob.pw_dir!r}, ":{bob.pw_uid}:", {link!r}))
print(json.dumps({{
  "hits": hits,
  "files": [p for p in ("/etc/passwd", "/etc/group", "/etc/passwd-", "/etc/group-", "/etc/subuid", "/etc/subgid",
                        "/proc/self/mountinfo", "/proc/net/dev", "/proc/net/unix", "/proc/net/route") if grep(p)],
  "key_users": [l for l in open("/proc/key-users") if l.split(":")[0].strip() == "{bob.pw_uid}"],
  "getent": subprocess.run(["getent", "passwd", {bob.pw_name!r}, "{bob.pw_uid}"], capture_output=True, text=True).stdout,
  "counters": attempt(lambda: open("/sys/class/net/{link}/statistics/rx_bytes").read()),
  "netns": attempt(lambda: os.listdir("/run/netns")) if os.path.isdir("/run/netns") else "none",
  "netns_list": os.listdir("/run/netns") if os.path.isdir("/run/netns") else [],
}}))
''')
    assert got["hits"] == [] and got["files"] == [] and got["key_users"] == [] and got["getent"] == "", got
    assert got["counters"] == "FileNotFoundError" and got["netns_list"] == [], got
