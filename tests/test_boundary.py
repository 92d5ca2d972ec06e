"""Alice's kernel attacks root through the server's own file handling (links and renames planted
where the root server reads or writes), bad names, and user removal; bob's kernel state survives
each. The server runs as root, so any path a tenant can change is a way to write as root.

Runs as root where the host can isolate (real server, real kernels, real accounts); skipped,
with the reason, elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator

import pytest

from testkit.client import mcp_client, run_code, text
from testkit.server import KernelpoolServer, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"sandbox tests need isolation: {SANDBOX_SKIP}")


_SERVERS = iter(range(1000))


def _server(**env: str) -> KernelpoolServer:
    # accounts of their own per server: two servers' "alice" must not meet in /etc/passwd
    env.setdefault("KERNELPOOL_ACCOUNT_PREFIX", f"kpb{os.getpid() % 100000}x{next(_SERVERS)}-")
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_POOL_SIZE="0", KERNELPOOL_EXECUTE_TIMEOUT="120", KERNELPOOL_KERNEL_START_TIMEOUT="20", **env))
    try:
        server.add_user("alice")
        server.add_user("bob")
        server.start()
        asyncio.run(_bob_setup(server))
    except BaseException:
        server.cleanup()
        raise
    return server


async def _bob_setup(server: KernelpoolServer) -> None:
    async with mcp_client(server.url, server.tokens["bob"], mode="auto") as b:
        await b.call_tool("use_notebook", {"notebook": "secret.ipynb", "mode": "create"})
        r = await b.call_tool("insert_execute_code_cell", {"notebook": "secret.ipynb", "cell_index": -1,
                                                            "cell_source": "SECRET = 'bob-secret'; print('ok')"})
        assert "ok" in text(r), text(r)


async def assert_bob_survives(server: KernelpoolServer) -> None:
    async with mcp_client(server.url, server.tokens["bob"], mode="auto") as b:
        r = await b.call_tool("execute_code", {"notebook": "secret.ipynb", "code": "SECRET"})
        assert text(r) == "'bob-secret'", f"bob's kernel lives on with its state: {text(r)}"


async def execute(server: KernelpoolServer, user: str, notebook: str, code: str) -> str:
    return await run_code(server, user, notebook, code)


def account(server: KernelpoolServer, user: str) -> pwd.struct_passwd:
    return pwd.getpwnam(f"{server.env['KERNELPOOL_ACCOUNT_PREFIX']}{user}")


# ---- 1. the planted-link race on the connection file and the sockets ---------------------------

class Decoys:
    """Root-owned files that a planted link would make the server write, chown or create."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="kp-decoy-", dir="/tmp")
        os.chmod(self.folder, 0o755)  # links to it need no access, but make "reachable" true
        self.owned = os.path.join(self.folder, "root-0600")
        self.shared = os.path.join(self.folder, "root-0644")
        self.missing = os.path.join(self.folder, "must-not-exist")
        for path, mode in ((self.owned, 0o600), (self.shared, 0o644)):
            with open(path, "w") as f:
                f.write(f"decoy {path}\n")
            os.chmod(path, mode)
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[int, int, int, int, str]]:
        out = {}
        for name in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, name)
            info = os.lstat(path)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[name] = (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), info.st_mtime_ns, digest)
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# The attacker: threads in alice's kernel. One learns new kernel ids from the server's cgroup tree
# when it can see it, and from `hint` (the worst case: a test process of root's writes each new kernel
# folder's name there at once, so the attacker knows every id as soon as it exists), and plants
# links at every path where a connection file or socket of that kernel could be: the old layout
# (DATA/run/alice/k-<id>.json, ...), the user's tmp folder, the kernel folder and its socket
# folder, in a tight loop per kernel id for a few seconds; a regular file already there (a
# connection file the server wrote) is swapped for a link. Connection-file candidates point at root-owned decoys (and at a missing file in a
# root folder); socket candidates at bob's sockets.
ATTACK = r'''
import os, stat, threading, time, json, re
RUN, OLD, HINT, STOP, CGROUPS, SECONDS = {run!r}, {old!r}, {hint!r}, {stop!r}, {cgroups!r}, {seconds!r}
DECOYS, BOB_SOCKETS = {decoys!r}, {bob_sockets!r}
KID = re.compile(r"k-([0-9a-f]{{12}})$")
STATS = {{"kids": [], "planted": {{}}, "errors": {{}}}}
def kids_now():
    found = set()
    for base in CGROUPS:
        for root, dirs, _ in os.walk(base):
            found |= {{m.group(1) for m in map(KID.match, dirs) if m}}
    try:
        found |= set(open(HINT).read().split())
    except OSError:
        pass
    return found
def candidates(kid):
    names = ["kernel.json", f"k-{{kid}}.json"] + [f"k-{{n}}" for n in range(1, 8)] + [f"k-{{kid}}-{{n}}" for n in range(1, 8)]
    for base in (f"{{RUN}}/{{kid}}", f"{{RUN}}/{{kid}}/s", f"{{RUN}}/tmp", OLD, RUN):
        for i, name in enumerate(names):
            socket_like = base.endswith("/s") or re.fullmatch(r"k-\d+|k-[0-9a-f]{{12}}-\d+", name)
            target = BOB_SOCKETS[i % len(BOB_SOCKETS)] if socket_like and BOB_SOCKETS else DECOYS[i % len(DECOYS)]
            yield base.replace(kid, "<kid>"), f"{{base}}/{{name}}", target
    yield RUN, f"{{RUN}}/{{kid}}", os.path.dirname(DECOYS[0])
def spin(kid):
    # for a few seconds, as fast as it can: plant a link wherever nothing is, and swap any
    # regular file (a connection file the server just wrote) for a link
    paths = list(candidates(kid))
    # the connection-file candidates most often: the window between the server's write and its
    # chown (or open) is short
    hot = [p for p in paths if p[1].endswith(".json")] * 20 + paths
    end = time.time() + 4
    while time.time() < end:
        for where, path, target in hot:
            try:
                try:
                    os.symlink(target, path)
                except FileExistsError:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        raise
                    os.unlink(path)
                    os.symlink(target, path)
                STATS["planted"][where] = STATS["planted"].get(where, 0) + 1
            except OSError as e:
                STATS["errors"][f"{{where}}: {{type(e).__name__}}"] = 1
def watch():
    # until the test says its kernels have started (SECONDS only caps a test that died)
    end = time.time() + SECONDS
    while time.time() < end and not os.path.exists(STOP):
        for kid in kids_now() - set(STATS["kids"]):
            STATS["kids"].append(kid)
            threading.Thread(target=spin, args=(kid,), daemon=True, name="attack-spin").start()
        time.sleep(0.0005)
threading.Thread(target=watch, daemon=True, name="attack-watch").start()
print("attacking")
'''


class Oracle(threading.Thread):
    """Root watching alice's run folder: writes each new kernel folder name to `hint` at once."""

    def __init__(self, run: str, hint: str) -> None:
        super().__init__(daemon=True)
        self.run_folder, self.hint = run, hint
        self.stop = threading.Event()
        self.seen: set[str] = set()

    def run(self) -> None:
        seen = self.seen
        while not self.stop.is_set():
            try:
                names = set(os.listdir(self.run_folder)) - {"tmp"} - seen
            except OSError:
                names = set()
            if names:
                seen |= names
                with open(self.hint, "a") as f:
                    f.write("".join(f"{n}\n" for n in names))
            time.sleep(0.0002)


@pytest.fixture(scope="module", params=["fork-server", "stock-start"])
def race_server(request: pytest.FixtureRequest) -> Iterator[KernelpoolServer]:
    server = _server(KERNELPOOL_FORK_SERVER="true" if request.param == "fork-server" else "false")
    try:
        yield server
    finally:
        server.cleanup()


def _sockets_of(server: KernelpoolServer, user: str) -> list[str]:
    run = os.path.join(server.data_dir, "run", str(server.uid(user)))
    return [os.path.join(run, k, "s", n) for k in server.kernel_folders(user) for n in sorted(os.listdir(os.path.join(run, k, "s")))]


async def test_planted_links_race_cannot_steer_the_server(race_server: KernelpoolServer) -> None:
    decoys = Decoys()
    # not /tmp: a kernel has a private one
    scratch = tempfile.mkdtemp(prefix="kp-race-", dir="/var/tmp")
    try:
        await _race(race_server, decoys, scratch)
    finally:
        decoys.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)


async def _race(server: KernelpoolServer, decoys: Decoys, scratch: str) -> None:
    os.chmod(scratch, 0o755)
    hint = os.path.join(scratch, "hint")
    open(hint, "w").close()
    os.chmod(hint, 0o644)
    alice_run = os.path.join(server.data_dir, "run", str(server.uid("alice")))
    oracle = Oracle(alice_run, hint)
    oracle.start()
    try:
        bob_sockets = _sockets_of(server, "bob")
        assert bob_sockets, "bob's kernel has sockets to aim at"
        cgroups = [os.path.join("/sys/fs/cgroup", c, server.env["KERNELPOOL_CGROUP_PREFIX"]) for c in ("pids", "memory", "unified")]
        stop = os.path.join(scratch, "stop")
        code = ATTACK.format(run=alice_run, old=os.path.join(server.data_dir, "run", "alice"), hint=hint, stop=stop, seconds=300, cgroups=cgroups,
                             decoys=[decoys.owned, decoys.shared, decoys.missing], bob_sockets=bob_sockets)
        assert await execute(server, "alice", "attack.ipynb", code) == "attacking"
        results = []
        async with mcp_client(server.url, server.tokens["alice"], mode="auto") as c:
            for i in range(3):  # each one a new kernel (no pool): a fresh race
                r = await c.call_tool("use_notebook", {"notebook": f"race{i}.ipynb", "mode": "create"})
                if not r.is_error:
                    r = await c.call_tool("execute_code", {"notebook": f"race{i}.ipynb", "code": "6*7"})
                results.append(text(r))
        await asyncio.sleep(1)
        open(stop, "w").close()
        # the attack is over (every thread of it ended) before anything else is looked at
        stats = json.loads(await execute(server, "alice", "attack.ipynb", (
            "import threading\n[t.join() for t in threading.enumerate() if t.name.startswith('attack')]\n"
            "print(json.dumps(STATS))")))
    finally:
        oracle.stop.set()
        oracle.join()
    # the race was on: the attacker knew every new kernel's id and planted what it could
    assert len(oracle.seen) >= 3 and oracle.seen <= set(stats["kids"]), (oracle.seen, stats)
    planted = stats["planted"]
    assert planted.get(f"{alice_run}/<kid>/s", 0) > 0, f"the attacker got links into the socket folder: {stats}"
    assert not planted.get(f"{alice_run}/<kid>", 0), f"nothing may be planted beside the connection file: {stats}"
    assert not planted.get(alice_run, 0), stats
    # ...and steered nothing: no decoy written, truncated, chowned or created
    assert decoys.snapshot() == decoys.before
    assert not os.path.lexists(decoys.missing)
    # planting in the socket folder while the kernel started costs alice at most that kernel
    for r in results:
        assert r == "42" or "could not start" in r, results
    # once started, a kernel's socket folder is locked: its own user cannot swap a socket
    await execute(server, "alice", "race-check.ipynb", "1")
    sockets = _sockets_of(server, "alice")
    swap = await execute(server, "alice", "race-check.ipynb", f'''
import os, json
out = {{}}
for s in {sockets!r}:
    try:
        os.unlink(s); out[s] = "ALLOWED"
    except OSError as e:
        out[s] = type(e).__name__
print(json.dumps(out))''')
    got = json.loads(swap)
    assert got and set(got.values()) == {"PermissionError"}, got
    await assert_bob_survives(server)


# ---- 5. names -------------------------------------------------------------------------------

BAD_NOTEBOOKS = {
    "rtl override": "invoice\u202egnp.ipynb",
    "zero-width joiner": "a\u200db.ipynb",
    "newline": "two\nlines.ipynb",
    "escape": "x\x1b[31m.ipynb",
    "line separator": "a\u2028b.ipynb",
    "leading space": " lead.ipynb",
    "trailing space in a folder": "dir /x.ipynb",
    "33 levels": "/".join(["d"] * 32) + "/deep.ipynb",
    "256-byte name": "é" * 125 + "xx.ipynb",
}


@pytest.fixture(scope="module")
def names_server() -> Iterator[KernelpoolServer]:
    server = _server()
    try:
        yield server
    finally:
        server.cleanup()


def _tree(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, n), folder) for r, ds, fs in os.walk(folder) for n in ds + fs)


@pytest.mark.parametrize("why", sorted(BAD_NOTEBOOKS))
async def test_bad_notebook_names_are_refused_and_create_nothing(names_server: KernelpoolServer, why: str) -> None:
    server = names_server
    path = BAD_NOTEBOOKS[why]
    home = os.path.join(server.data_dir, "users", "alice")
    before = _tree(home)
    async with mcp_client(server.url, server.tokens["alice"], mode="auto") as c:
        for tool, args in (("use_notebook", {"notebook": path, "mode": "create"}),
                           ("insert_cell", {"notebook": path, "cell_index": -1, "cell_type": "code", "cell_source": "1"}),
                           ("read_notebook", {"notebook": path}),
                           ("list_files", {"path": path.rpartition("/")[0] or path})):
            r = await c.call_tool(tool, args)
            assert r.is_error, (tool, why, text(r))
            assert "path refused" in text(r), text(r)
    assert _tree(home) == before
    await assert_bob_survives(server)


async def test_nfc_and_nfd_name_one_notebook(names_server: KernelpoolServer) -> None:
    server = names_server
    nfc, nfd = unicodedata.normalize("NFC", "café.ipynb"), unicodedata.normalize("NFD", "café.ipynb")
    assert nfc != nfd
    async with mcp_client(server.url, server.tokens["alice"], mode="auto") as c:
        r = await c.call_tool("use_notebook", {"notebook": nfd, "mode": "create"})
        assert not r.is_error, text(r)
        r = await c.call_tool("use_notebook", {"notebook": nfc, "mode": "create"})
        assert r.is_error and "already exists" in text(r), text(r)
        r = await c.call_tool("insert_cell", {"notebook": nfc, "cell_index": -1, "cell_type": "markdown", "cell_source": "one"})
        assert not r.is_error, text(r)
        r = await c.call_tool("read_notebook", {"notebook": nfd})
        assert "one" in text(r)
    assert [n for n in os.listdir(os.path.join(server.data_dir, "users", "alice")) if n.startswith("caf")] == [nfc]
    await assert_bob_survives(server)


@pytest.mark.parametrize("name", ["eve\n", "eve\r", "Eve", "e" * 32, "ev e", "eve\u0301", ""])
def test_bad_user_names_are_refused_and_create_nothing(names_server: KernelpoolServer, name: str) -> None:
    server = names_server
    users_before = server.cli("users", "list").stdout
    out = server.cli("users", "add", name, check=False)
    assert out.returncode == 2 and "invalid user name" in out.stderr, out
    assert out.stdout == ""
    assert server.cli("users", "list").stdout == users_before
    prefix = server.env["KERNELPOOL_ACCOUNT_PREFIX"]
    for entry in pwd.getpwall():
        assert not entry.pw_name.startswith(f"{prefix}eve") and not entry.pw_name.startswith(f"{prefix}Eve"), entry
    assert sorted(os.listdir(os.path.join(server.data_dir, "users"))) == ["alice", "bob"]
    asyncio.run(assert_bob_survives(server))


# ---- 6. users remove: deep trees, live kernels, all or nothing ---------------------------------

@pytest.fixture
def removal_server() -> Iterator[KernelpoolServer]:
    server = _server()
    try:
        server.add_user("carol")
        yield server
    finally:
        server.cleanup()


def _status(server: KernelpoolServer, user: str) -> int:
    import httpx2

    return httpx2.post(server.url, timeout=30, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers={
        "Authorization": f"Bearer {server.tokens[user]}", "Accept": "application/json, text/event-stream",
    }).status_code


def _processes_of(uid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and uid in p.info["uids"] and p.info["status"] != psutil.STATUS_ZOMBIE]


async def test_removing_a_user_with_a_deep_tree_and_running_kernels(removal_server: KernelpoolServer) -> None:
    server = removal_server
    decoys = Decoys()
    carol = account(server, "carol")
    home = os.path.join(server.data_dir, "users", "carol")
    try:
        out = await execute(server, "carol", "deep.ipynb", f'''
import os, subprocess
d = os.open(".", os.O_RDONLY)
for i in range(2100):
    os.mkdir("n", dir_fd=d)
    os.symlink({decoys.owned!r}, f"link{{i}}", dir_fd=d) if i % 500 == 0 else None
    nxt = os.open("n", os.O_RDONLY, dir_fd=d); os.close(d); d = nxt
os.symlink({os.path.join(server.data_dir, "users", "bob")!r}, "bob", dir_fd=d)
os.close(d)
child = subprocess.Popen(["sleep", "600"], start_new_session=True)  # outlives its kernel's group
KEPT = 1
print("deep", child.pid)''')
        assert out.startswith("deep"), out
        sleeper = int(out.split()[1])
        await execute(server, "carol", "second.ipynb", "x = 1")
        assert sleeper in _processes_of(carol.pw_uid)
        assert len(_processes_of(carol.pw_uid)) >= 3
        started = time.monotonic()
        done = server.cli("users", "remove", "carol", "--delete-files", timeout=300)
        assert "removed user carol" in done.stderr, done
        assert time.monotonic() - started < 120
        assert _processes_of(carol.pw_uid) == []
        assert not os.path.lexists(home)
        assert not os.path.lexists(os.path.join(server.data_dir, "run", str(carol.pw_uid)))
        with pytest.raises(KeyError):
            account(server, "carol")
        assert "carol" not in server.cli("users", "list").stdout
        assert decoys.snapshot() == decoys.before
        assert os.path.isdir(os.path.join(server.data_dir, "users", "bob"))
        # the running server refuses carol's token, and serves bob as before
        assert _status(server, "carol") == 401
        assert _status(server, "bob") != 401
        await assert_bob_survives(server)
    finally:
        server.tokens.pop("carol", None)
        decoys.cleanup()


async def test_failed_removal_changes_nothing_and_says_what_to_do(removal_server: KernelpoolServer) -> None:
    server = removal_server
    carol = account(server, "carol")
    home = os.path.join(server.data_dir, "users", "carol")
    mnt = os.path.join(home, "mnt")
    await execute(server, "carol", "keep.ipynb", "os_made = __import__('os').makedirs('mnt', exist_ok=True)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "kp-test", mnt], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to make deletion fail: {done.stderr.strip()}")
    try:
        out = server.cli("users", "remove", "carol", "--delete-files", check=False, timeout=300)
        assert out.returncode == 2, out
        assert "mount point" in out.stderr and "kernelpool users remove carol --delete-files` again" in out.stderr, out.stderr
        # the user is all there: row, account (same uid), token, folder
        assert "carol" in server.cli("users", "list").stdout
        assert account(server, "carol").pw_uid == carol.pw_uid
        assert os.path.isdir(mnt)
        async with mcp_client(server.url, server.tokens["carol"], mode="auto") as c:
            r = await c.call_tool("execute_code", {"notebook": "again.ipynb", "code": "1+1"})
            if r.is_error and "not found" in text(r):
                await c.call_tool("use_notebook", {"notebook": "again.ipynb", "mode": "create"})
                r = await c.call_tool("execute_code", {"notebook": "again.ipynb", "code": "1+1"})
            assert text(r) == "2", text(r)
    finally:
        subprocess.run(["umount", mnt], check=False)
    out = server.cli("users", "remove", "carol", "--delete-files", timeout=300)
    assert "removed user carol" in out.stderr
    assert not os.path.lexists(home) and _processes_of(carol.pw_uid) == []
    server.tokens.pop("carol", None)
    await assert_bob_survives(server)
