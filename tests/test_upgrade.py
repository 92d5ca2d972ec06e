"""Upgrades keep data: a data folder made by an older kernelpool (commit bcda1e3, installed into its
own venv) works under this one, with everything still there; a data folder of a newer version is
refused, untouched; migrations run in one transaction.

The old install is a real one: the commit's source (`git archive`) pip-installed into a venv made
from /usr/bin/python3, driven through its own CLI and server. It is built once and kept under
/var/cache/kernelpool-ci (KERNELPOOL_CI_CACHE), keyed by the commit, so CI pays for it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from kernelpool import schema
from kernelpool import store as store_module
from kernelpool.schema import MIGRATIONS
from kernelpool.errors import UserNotFound
from kernelpool.store import SCHEMA_VERSION, Store
from sandbox import Limits, accounts, detect
from testkit.client import mcp_client
from testkit.server import ROOT, KernelpoolServer, free_port, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

OLD_COMMIT = "bcda1e3"
CACHE = os.environ.get("KERNELPOOL_CI_CACHE", "/var/cache/kernelpool-ci")
needs_sandbox = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"needs isolation: {SANDBOX_SKIP}")


def text(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


def old_python() -> str:
    """The python of a venv with kernelpool at OLD_COMMIT (built on first use, then cached)."""
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{OLD_COMMIT}^{{commit}}"],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} is not in this clone's history: {rev.stderr.strip()}")
    venv = os.path.join(CACHE, f"venv-kernelpool-{rev.stdout.strip()[:12]}")
    os.makedirs(CACHE, mode=0o755, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        if not os.path.exists(os.path.join(venv, ".complete")):
            shutil.rmtree(venv, ignore_errors=True)
            src = tempfile.mkdtemp(prefix="kp-old-src-")
            try:
                archive = subprocess.run(["git", "-C", ROOT, "archive", OLD_COMMIT], capture_output=True, check=True)
                subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
                subprocess.run(["/usr/bin/python3", "-m", "venv", venv], check=True)
                os.chmod(venv, 0o755)  # kernels run its python as the users' uids
                subprocess.run([f"{venv}/bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check", src],
                               check=True, capture_output=True, timeout=1200, cwd="/")
            finally:
                shutil.rmtree(src, ignore_errors=True)
            Path(venv, ".complete").write_text(OLD_COMMIT + "\n")
    return f"{venv}/bin/python"


def _tree(path: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture
def upgrade_env() -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """Environments of the old and the new server: the same data, uid range and cgroup prefix;
    other account names (the account layout changed), so the new one must adopt the old accounts."""
    tag = os.getpid() % 100000
    common = {"KERNELPOOL_CGROUP_PREFIX": f"kernelpool-upgrade-{tag}", "KERNELPOOL_POOL_SIZE": "1"}
    old = server_env(KERNELPOOL_ACCOUNT_PREFIX=f"kpo{tag}-", **common)
    old.pop("PYTHONPATH", None)
    new = server_env(KERNELPOOL_ACCOUNT_PREFIX=f"kpn{tag}-", **common)
    yield old, new
    for name in ("alice", "bob"):  # whatever the new server did not adopt (on failure)
        with contextlib.suppress(Exception):  # cleanup: most often there is nothing left to remove
            accounts.remove_account(f"kpo{tag}-{name}")
    backend = detect(prefix=common["KERNELPOOL_CGROUP_PREFIX"])
    root = backend.get("") if backend is not None else None
    if root is not None:
        root.remove()


@needs_sandbox
async def test_a_data_folder_of_bcda1e3_upgrades_in_place(upgrade_env: tuple[dict[str, str], dict[str, str]]) -> None:
    old_env, new_env = upgrade_env
    data = make_data_dir()
    # the old install's CLI and server: its own venv, a working folder with nothing importable, no PYTHONPATH
    old = KernelpoolServer(data, old_env, command=[old_python(), "-m", "kernelpool"], cwd="/", log_name="old-server.log")
    new = KernelpoolServer(data, new_env)
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        # --- the old version: users, tokens, limits, notebooks, audit rows
        old.add_user("alice")
        old.add_user("bob")
        spare = old.cli("tokens", "create", "alice", "--expires", "30d").stdout.strip()
        revoked = old.cli("tokens", "create", "bob").stdout.strip()
        old.cli("tokens", "revoke", revoked)
        old.cli("users", "set-limits", "bob", "--memory", "1G", "--pids", "300")
        old.start()
        async with mcp_client(old.url, old.tokens["alice"], mode="legacy") as c:
            assert not (await c.call_tool("use_notebook", {"notebook": "old.ipynb", "mode": "create"})).is_error
            r = await c.call_tool("insert_execute_code_cell", {"cell_index": -1, "cell_source": "x = 40 + 2\nx"})
            assert text(r) == "42", text(r)
        async with mcp_client(old.url, old.tokens["bob"], mode="auto") as c:
            assert not (await c.call_tool("use_notebook", {"notebook": "bob.ipynb", "mode": "create"})).is_error
            r = await c.call_tool("insert_execute_code_cell", {"notebook": "bob.ipynb", "cell_index": -1, "cell_source": "'b' * 3"})
            assert text(r) == "'bbb'", text(r)
        # carol works a little, then the old version removes her and keeps her files: the old
        # database forgets her uid, but her folder still belongs to it, and the audit log names her
        old.add_user("carol")
        carol_uid = old.uid("carol")
        async with mcp_client(old.url, old.tokens.pop("carol"), mode="auto") as c:
            assert not (await c.call_tool("use_notebook", {"notebook": "c.ipynb", "mode": "create"})).is_error
        assert old.stop() in (0, -signal.SIGTERM)
        old.cli("users", "remove", "carol")  # that version's userdel refuses while her kernel runs
        assert os.stat(os.path.join(data, "users", "carol")).st_uid == carol_uid
        users_before = old.cli("users", "list").stdout
        tokens_before = sorted(old.cli("tokens", "list").stdout.splitlines())
        audit_before = old.cli("audit", "--json").stdout.splitlines()
        assert len(audit_before) >= 4 and len(tokens_before) == 4
        uids = {line.split("\t")[0]: int(line.split("\t")[1].split("=")[1]) for line in users_before.splitlines()}
        with sqlite3.connect(f"file:{data}/kernelpool.db?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 0  # made before there were versions

        # --- what an older layout may leave behind: runtime files, and a cgroup with a process in it
        os.makedirs(os.path.join(data, "run", "old-layout", "sub"))
        Path(data, "run", "alice", "k-old.json").write_text("{}")
        backend = detect(prefix=new_env["KERNELPOOL_CGROUP_PREFIX"])
        assert backend is not None
        stale = backend.create("old-layout/alice/k-dead", Limits())
        sleeper = subprocess.Popen(["sleep", "600"])
        stale.add_pid(sleeper.pid)

        # --- the current version on the same folder
        new.start()
        assert sleeper.wait(30) == -signal.SIGKILL
        assert backend.get("old-layout") is None
        assert not os.path.exists(os.path.join(data, "run", "old-layout"))
        assert not os.path.exists(os.path.join(data, "run", "alice", "k-old.json"))
        with sqlite3.connect(f"file:{data}/kernelpool.db?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        # the accounts: same uids, now under the new names
        for name, uid in uids.items():
            assert pwd.getpwuid(uid).pw_name == f"{new_env['KERNELPOOL_ACCOUNT_PREFIX']}{name}"

        # tokens authenticate, notebooks read and execute
        async with mcp_client(new.url, old.tokens["alice"], mode="legacy") as c:
            r = await c.call_tool("read_notebook", {"notebook": "old.ipynb", "response_format": "detailed"})
            assert "x = 40 + 2" in text(r) and "42" in text(r), text(r)
            r = await c.call_tool("execute_cell", {"notebook": "old.ipynb", "cell_index": 0})
            assert text(r) == "42", text(r)
            r = await c.call_tool("insert_execute_code_cell", {"notebook": "old.ipynb", "cell_index": -1, "cell_source": "x + 1"})
            assert text(r) == "43", text(r)
        assert os.stat(os.path.join(data, "users", "alice", "old.ipynb")).st_uid == uids["alice"]
        async with mcp_client(new.url, spare, mode="auto") as c:
            listed = (await c.call_tool("list_notebooks", {})).structured_content
            assert "old.ipynb" in json.dumps(listed)
        async with mcp_client(new.url, old.tokens["bob"], mode="auto") as c:
            r = await c.call_tool("read_cell", {"notebook": "bob.ipynb", "cell_index": 0})
            assert "'bbb'" in text(r), text(r)
        rejected = httpx2.post(new.url, headers={"Authorization": f"Bearer {revoked}"},
                               json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=30)
        assert rejected.status_code == 401

        # users, limits, tokens and the audit log, as the new CLI lists them
        assert new.cli("users", "list").stdout == users_before
        tokens_after = sorted(new.cli("tokens", "list").stdout.splitlines())
        assert tokens_after == tokens_before
        audit_after = new.cli("audit", "--json").stdout.splitlines()
        assert audit_after[: len(audit_before)] == audit_before
        assert any(json.loads(row)["tool"] == "execute_cell" for row in audit_after[len(audit_before):])

        # no uid given twice: not the old users', nor the removed carol's (her kept folder says it);
        # and carol, added again, gets an account of another name than her first
        new.add_user("dave")
        assert new.uid("dave") > max(*uids.values(), carol_uid)
        new.add_user("carol")
        again = new.uid("carol")
        assert again > new.uid("dave")
        assert pwd.getpwuid(again).pw_name == f"{new_env['KERNELPOOL_ACCOUNT_PREFIX']}{again}-carol"
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        old.stop()
        new.tokens.update(old.tokens)
        new.cleanup()


async def test_a_data_folder_of_a_newer_version_is_refused_untouched(fresh_server: KernelpoolServer) -> None:
    kp = fresh_server
    kp.add_user("alice")
    db_path = os.path.join(kp.data_dir, "kernelpool.db")
    with sqlite3.connect(db_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before_tree = _tree(kp.data_dir)
    before_bytes = Path(db_path).read_bytes()
    try:
        served = subprocess.run([sys.executable, "-m", "kernelpool", "serve", "--data-dir", kp.data_dir,
                                 "--port", str(free_port())], env=kp.env, capture_output=True, text=True,
                                timeout=120, cwd=ROOT)
        assert served.returncode == 2, served
        assert "written by a newer kernelpool" in served.stderr and "changed nothing" in served.stderr, served.stderr
        assert f"schema version {SCHEMA_VERSION + 1}" in served.stderr
        for args in (["users", "list"], ["users", "add", "bob"], ["tokens", "list"], ["audit"]):
            out = kp.cli(*args, check=False)
            assert out.returncode == 2 and "written by a newer kernelpool" in out.stderr, (args, out)
        assert _tree(kp.data_dir) == before_tree
        assert Path(db_path).read_bytes() == before_bytes
    finally:
        with sqlite3.connect(db_path) as db:  # back to ours, so that cleanup can remove the user
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.close()


async def test_a_version_2_database_learns_what_it_gave_before(tmp_path: Path) -> None:
    """Migration 3 on a database of the previous schema: the uid mark starts at the highest uid in
    use, the names of removed users come from the audit log, and new users go above the owners of
    the folders removed users left."""
    from kernelpool.config import Settings
    from kernelpool.users.accounts import UserService

    low = 63100
    path = tmp_path / "kernelpool.db"
    with sqlite3.connect(path) as db:
        for statement in (*schema.MIGRATIONS[0], *schema.MIGRATIONS[1]):
            db.execute(statement)
        db.execute("PRAGMA user_version = 2")
        db.executemany("INSERT INTO users(name, uid, gid, created_at) VALUES (?, ?, ?, 1.0)",
                       [("alice", low + 1, low + 1), ("bob", low + 4, low + 4)])
        db.executemany("INSERT INTO audit(ts, user, tool, outcome, duration_ms) VALUES (1.0, ?, 'x', 'ok', 1)",
                       [("alice",), ("carol",), ("carol",), ("eve",), (None,)])
    db.close()
    settings = Settings(data_dir=tmp_path, uid_min=low, uid_max=low + 50, account_prefix="kpu-")
    os.makedirs(tmp_path / "users" / "dora")
    os.chown(tmp_path / "users" / "dora", low + 7, low + 7)  # dora was removed with her files kept
    store = await Store(path).open()
    try:
        users = UserService(settings, store, isolated=False)
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            assert db.execute("SELECT uid FROM uid_mark").fetchall() == [(low + 4,)]
            assert sorted(db.execute("SELECT name, uid FROM removed_users").fetchall()) == [("carol", None), ("eve", None)]
        db.close()
        erin = await users.add("erin")
        assert erin.uid == low + 8 and not erin.reissued
        carol = await users.add("carol")
        assert carol.uid == low + 9 and carol.reissued and users.account_name(carol) == f"kpu-{low + 9}-carol"
        assert users.account_name(await store.get_user("alice")) == "kpu-alice"  # type: ignore[arg-type]
    finally:
        await store.close()


async def test_migrations_run_in_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kernelpool.db"
    # a database as versions before bcda1e3 made it: the tables, no version
    with sqlite3.connect(path) as db:
        db.executescript(schema.SCHEMA)
        db.execute("INSERT INTO users(name, uid, gid, created_at) VALUES ('alice', 20001, 20001, 1.0)")
    db.close()
    store = await Store(path).open()
    assert [u.name for u in await store.list_users()] == ["alice"]
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()

    # a later migration that fails half-way changes nothing: not its first statement, not the version
    broken = (*MIGRATIONS, ("CREATE TABLE extra(x)", "ALTER TABLE nowhere ADD COLUMN y"))
    monkeypatch.setattr(store_module, "_MIGRATIONS", broken)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(broken))
    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        await Store(path).open()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'extra'").fetchone()[0] == 0
    db.close()
    # and once it is fixed, it runs
    fixed = (*MIGRATIONS, ("CREATE TABLE extra(x)",))
    monkeypatch.setattr(store_module, "_MIGRATIONS", fixed)
    store = await Store(path).open()
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(fixed)
    db.close()


async def test_a_version_4_database_gets_operators_and_audit_clients(tmp_path: Path) -> None:
    """Migration 5 (the web view): users keep everything and are not operators until set; audit
    rows keep theirs, with no client named; new rows name their client."""
    from kernelpool.users import activity, admins

    path = tmp_path / "kernelpool.db"
    with sqlite3.connect(path) as db:
        for statement in (statement for version in schema.MIGRATIONS[:4] for statement in version):
            db.execute(statement)
        db.execute("PRAGMA user_version = 4")
        db.execute("INSERT INTO users(name, uid, gid, created_at, limits) VALUES ('alice', 63201, 63201, 1.0, '{\"kernel_cpus\": 1}')")
        db.execute("INSERT INTO audit(ts, user, tool, notebook, outcome, duration_ms) VALUES (1.0, 'alice', 'read_cell', 'a.ipynb', 'ok', 3)")
    db.close()
    store = await Store(path).open()
    try:
        row = await store.get_user("alice")
        assert row is not None and not row.admin and row.limits == {"kernel_cpus": 1}
        assert await admins.set_admin(store, "alice", on=True) == "alice is now an operator (the web view's operators' page)"
        assert await admins.is_admin(store, "alice")
        with pytest.raises(UserNotFound):
            await admins.set_admin(store, "nobody", on=True)
        await store.audit("alice", "execute_cell", "a.ipynb", "ok", 5.0, client="mcp 0.1.0")
        await store.flush_audit()
        rows = await activity.recent(store, "alice")
        assert [(r.tool, r.client) for r in rows] == [("execute_cell", "mcp 0.1.0"), ("read_cell", None)]
    finally:
        await store.close()
