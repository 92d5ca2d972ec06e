"""The store on both of its backends: the same migrations and the same behaviour on SQLite (the
embedded default) and on a real PostgreSQL server started for the session (testkit/postgres.py).

Two `Store` objects on one database stand for two processes (two replicas, or a replica and the
CLI): what one writes, the other must see, and a login one ends, the other must refuse.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kernelpool.db.base import Backend
from kernelpool.db.postgres import PostgresBackend
from kernelpool.db.sqlite import SQLiteBackend
from kernelpool.errors import DataFromNewerVersion, NoUidLeft, UserExists, UserNotFound
from kernelpool.schema import MIGRATIONS
from kernelpool.store import SCHEMA_VERSION, KernelRow, Store
from kernelpool.users import activity, admins
from kernelpool.users.grants import GrantStore
from kernelpool.users.tokens import TokenChecker, check_token, create_token
from testkit.postgres import PostgresServer

UIDS = (63500, 63520)


def never(uid: int) -> bool:
    return False


@pytest.fixture
async def stores(tmp_path: Path, store_url: str | None) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database, as two replicas (r1, r2) would open it."""
    a = await Store(tmp_path / "kernelpool.db", url=store_url, replica="r1").open()
    b = await Store(tmp_path / "kernelpool.db", url=store_url, replica="r2").open()
    try:
        yield a, b
    finally:
        await b.close()
        await a.close()


async def test_migrations_bring_a_new_database_to_the_current_version(tmp_path: Path, store_url: str | None) -> None:
    store = await Store(tmp_path / "kernelpool.db", url=store_url).open()
    try:
        if store.kind == "postgresql":
            assert await store.value("SELECT max(version) FROM kernelpool_schema") == SCHEMA_VERSION
        else:
            assert await store.value("PRAGMA user_version") == SCHEMA_VERSION
        assert await store.value("SELECT n FROM changes WHERE one = 1") == 0
    finally:
        await store.close()
    again = await Store(tmp_path / "kernelpool.db", url=store_url).open()  # a second open changes nothing
    await again.close()


async def test_a_database_of_a_newer_kernelpool_is_refused_untouched(tmp_path: Path, store_url: str | None) -> None:
    store = await Store(tmp_path / "kernelpool.db", url=store_url).open()
    if store.kind == "postgresql":
        await store.write("UPDATE kernelpool_schema SET version = ?", SCHEMA_VERSION + 1)
    else:
        await store.write(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    await store.close()
    with pytest.raises(DataFromNewerVersion, match=f"version {SCHEMA_VERSION + 1}"):
        await Store(tmp_path / "kernelpool.db", url=store_url).open()


async def test_a_version_5_database_gets_homes_and_keys_and_keeps_its_operators(tmp_path: Path, store_url: str | None) -> None:
    """Migration 6 (several replicas) on a database that main's migration 5 (the web view) made:
    users keep their operator flag and get a key, no home (a single node); audit rows keep their
    client; a token from before keys is marked unkeyed (it routes by its id behind HAProxy)."""
    old: Backend = PostgresBackend(store_url) if store_url else SQLiteBackend(tmp_path / "kernelpool.db")
    await old.open(MIGRATIONS[:5])
    try:
        await old.write("INSERT INTO users(name, uid, gid, created_at, admin) VALUES (?, ?, ?, ?, ?)", "alice", 63501, 63501, 1.0, 1)
        await old.write("INSERT INTO tokens(id, user, hash, created_at) VALUES (?, ?, ?, ?)", "t1", "alice", "h1", 1.0)
        await old.write("INSERT INTO audit(ts, user, tool, notebook, outcome, duration_ms, client) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        1.0, "alice", "read_cell", "a.ipynb", "ok", 3.0, "claude-code 2.1")
    finally:
        await old.close()
    store = await Store(tmp_path / "kernelpool.db", url=store_url).open()
    try:
        row = await store.get_user("alice")
        assert row is not None and row.admin and row.home is None
        assert row.ukey is not None and re.fullmatch(r"[0-9a-f]{16}", row.ukey)
        assert await store.value("SELECT keyed FROM tokens WHERE id = ?", "t1") == 0
        assert [(r.tool, r.client) for r in await activity.recent(store, "alice")] == [("read_cell", "claude-code 2.1")]
        assert [r.get("replica") for r in await store.read_audit()] == [None]
    finally:
        await store.close()


async def test_operators_and_activity_are_the_same_on_both_backends(stores: tuple[Store, Store]) -> None:
    """The web view's reads and writes of the store (kernelpool/users/admins.py, activity.py) go
    through the store's statements: one replica sets what another reads."""
    a, b = stores
    await a.add_user("alice", UIDS, 0, never, home="r1")
    await a.add_user("bob", UIDS, 0, never, home="r2")
    assert not await admins.is_admin(b, "alice")
    assert await admins.set_admin(a, "alice", on=True) == "alice is now an operator (the web view's operators' page)"
    assert await admins.is_admin(b, "alice") and (await b.get_user("alice")).admin  # type: ignore[union-attr]
    with pytest.raises(UserNotFound):
        await admins.set_admin(b, "nobody", on=True)
    since = time.time() - 1
    await a.audit("alice", "execute_code", "a.ipynb", "ok", 5.0, client="claude-code 2.1")
    await b.audit("alice", "signin", None, "ok", 0.0)
    await b.audit("alice", "read_cell", "a.ipynb", "error", 1.0, "boom", client="cursor 1.0")
    await a.audit("bob", "execute_code", "b.ipynb", "refused", 2.0, client="inspector")
    await a.flush_audit()
    await b.flush_audit()
    rows = await activity.recent(a, "alice")
    assert [(r.tool, r.client, r.outcome) for r in rows] == [
        ("read_cell", "cursor 1.0", "error"), ("signin", None, "ok"), ("execute_code", "claude-code 2.1", "ok")]
    assert [r.tool for r in await activity.recent(b, "alice", tools_only=True)] == ["read_cell", "execute_code"]
    assert [r.tool for r in await activity.recent(b, "alice", before=rows[0].id, limit=1)] == ["signin"]
    assert await activity.failures(b, since) == {"alice": (1, "read_cell"), "bob": (1, "execute_code")}
    assert await activity.failures(a, time.time() + 60) == {}


async def test_users_get_distinct_uids_and_keys_even_when_added_at_once(stores: tuple[Store, Store]) -> None:
    a, b = stores
    rows = await asyncio.gather(*(s.add_user(f"u{i}", UIDS, 0, never, home=s.replica) for i, s in enumerate([a, b] * 5)))
    uids = sorted(r.uid for r in rows)
    assert len(set(uids)) == 10 and uids[0] == UIDS[0] and uids[-1] < UIDS[0] + 20, uids
    assert all(r.ukey and re.fullmatch(r"[0-9a-f]{16}", r.ukey) for r in rows)
    assert len({r.ukey for r in rows}) == 10
    listed = {u.name: u for u in await b.list_users()}
    assert listed["u0"].home == "r1" and listed["u1"].home == "r2" and listed["u0"].ukey == rows[0].ukey
    with pytest.raises(UserExists):
        await b.add_user("u3", UIDS, 0, never)


async def test_uids_are_never_given_twice_and_run_out_clearly(stores: tuple[Store, Store]) -> None:
    a, b = stores
    first = await a.add_user("alice", UIDS, 0, never)
    await a.remove_user("alice", "kp-alice")
    again = await b.add_user("alice", UIDS, 0, lambda uid: uid == first.uid + 1)  # the host holds the next one
    assert again.uid == first.uid + 2 and again.reissued
    floor = await a.add_user("bob", UIDS, UIDS[0] + 15, never)  # above the owners of kept folders
    assert floor.uid == UIDS[0] + 16
    for i in range(4):
        await b.add_user(f"c{i}", UIDS, 0, never)
    with pytest.raises(NoUidLeft):
        await a.add_user("late", UIDS, 0, never)
    assert await a.get_user("late") is None


async def test_a_token_carries_its_users_key_and_a_revocation_reaches_the_other_process(stores: tuple[Store, Store]) -> None:
    a, b = stores
    row = await a.add_user("alice", UIDS, 0, never, home="r2")
    token_id, token = await create_token(a, "alice")
    assert token.split("_")[1] == token_id and token.split("_")[2] == row.ukey  # HAProxy: word(3,_)
    checker = TokenChecker(b)
    verdict = await checker.check(token)
    assert (verdict.user, verdict.uid, verdict.home) == ("alice", row.uid, "r2")
    assert await a.revoke_token(token_id)
    assert not await a.revoke_token(token_id)  # once
    revoked = time.monotonic()
    while (await checker.check(token)).user is not None:  # remembered until the other process hears of it
        assert time.monotonic() - revoked < 1.0, "the revocation did not reach the other process within a second"
        await asyncio.sleep(0.02)
    assert (await check_token(b, token)).refused == "revoked"
    assert [t.revoked_at is not None for t in await b.list_tokens("alice")] == [True]


async def test_removal_ends_logins_everywhere_and_keeps_a_tombstone(stores: tuple[Store, Store]) -> None:
    a, b = stores
    row = await a.add_user("alice", UIDS, 0, never)
    _, token = await create_token(a, "alice")
    checker = TokenChecker(b)
    assert (await checker.check(token)).user == "alice"
    await a.set_removing("alice", removing=True)
    assert await b.removing() == {"alice"} and not await b.admits("alice", row.uid)
    deadline = time.monotonic() + 1.0
    while (await checker.check(token)).user is not None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await a.set_removing("alice", removing=False)
    assert await b.admits("alice", row.uid)
    assert await a.remove_user("alice", "kp-alice")
    assert await b.get_user("alice") is None and (await check_token(b, token)).refused == "unknown"
    assert [tuple(r) for r in await b.rows("SELECT name, uid, account FROM removed_users")] == [("alice", row.uid, "kp-alice")]


async def test_each_replica_sees_and_reaps_only_its_own_kernels(stores: tuple[Store, Store]) -> None:
    a, b = stores
    await a.add_kernel(KernelRow("k1", "alice", "a.ipynb", 123, "cg/1", "run/1", 1.5))
    await b.add_kernel(KernelRow("k2", "bob", None, None, None, None, 2.5))
    await a.add_kernel(KernelRow("k1", "alice", "b.ipynb", 124, "cg/1", "run/1", 1.5))  # recorded again: replaced
    assert await a.list_kernels() == [KernelRow("k1", "alice", "b.ipynb", 124, "cg/1", "run/1", 1.5)]
    assert [k.id for k in await b.list_kernels()] == ["k2"]
    await b.set_kernel_notebook("k2", "c.ipynb")
    await b.remove_kernel("k1")  # another replica's row: never its own to reap, but a delete by id is exact
    assert await a.list_kernels() == []
    assert [k.notebook for k in await b.list_kernels()] == ["c.ipynb"]


async def test_audit_rows_carry_their_replica_and_read_back_filtered(stores: tuple[Store, Store]) -> None:
    a, b = stores
    await a.audit("alice", "execute_code", "a.ipynb", "ok", 12)
    await b.audit("bob", "read_cell", None, "error", 1.5, "boom")
    await a.flush_audit()
    await b.flush_audit()
    rows = await a.read_audit()
    assert [(r["user"], r["tool"], r["replica"], r["duration_ms"]) for r in rows] == [
        ("alice", "execute_code", "r1", 12.0), ("bob", "read_cell", "r2", 1.5)]
    assert [r["tool"] for r in await b.read_audit(user="bob")] == ["read_cell"]
    assert await b.read_audit(since=time.time() + 60) == []


async def test_oauth_tokens_carry_the_key_and_a_revoked_grant_ends_them_on_the_other_process(stores: tuple[Store, Store]) -> None:
    a, b = stores
    row = await a.add_user("alice", UIDS, 0, never, home="r1")
    grants_a, grants_b = GrantStore(a), GrantStore(b)
    await grants_a.add_client("c1", {"client_name": "C"})
    assert await grants_b.client("c1") == {"client_name": "C"}
    grant_id = await grants_a.create_grant("alice", "c1", "C", ["kernelpool"], "http://x/mcp")
    code = await grants_a.issue_code(grant_id, "http://cb", explicit=True, code_challenge="ch", ttl=60)
    taken = await grants_b.take_code(code)
    assert taken is not None and taken.grant.user == "alice"
    assert await grants_b.take_code(code) is None  # twice: the grant is revoked
    grant_id = await grants_a.create_grant("alice", "c1", "C", ["kernelpool"], "http://x/mcp")
    grant = await grants_b.grant(grant_id)
    assert grant is not None
    issued = await grants_b.issue_tokens(grant, access_ttl=60, refresh_ttl=600)
    assert issued.access.token.split("_")[2] == row.ukey
    checker = TokenChecker(a)
    assert (await checker.check(issued.access.token)).grant_id == grant_id
    assert await grants_b.revoke_grant(grant_id, "test")
    deadline = time.monotonic() + 1.0
    while (await checker.check(issued.access.token)).user is not None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert [g.id for g in await grants_a.grants("alice")][-1] == grant_id
    await grants_a.prune()


async def test_a_failed_transaction_leaves_nothing(stores: tuple[Store, Store]) -> None:
    a, b = stores
    with pytest.raises(RuntimeError):
        async with a.transaction() as tx:
            await tx.write("INSERT INTO replicas(name, started_at, seen_at) VALUES (?, ?, ?)", "r9", 1.0, 1.0)
            raise RuntimeError("half way")
    assert await b.rows("SELECT name FROM replicas") == []
    await a.write("INSERT INTO replicas(name, started_at, seen_at) VALUES (?, ?, ?)", "r9", 1.0, 1.0)
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        await b.write("INSERT INTO replicas(name, started_at, seen_at) VALUES (?, ?, ?)", "r9", 2.0, 2.0)


async def test_without_its_listener_postgresql_still_hears_of_revocations(tmp_path: Path, postgres: PostgresServer) -> None:
    """LISTEN's connection lost (killed on the server): the periodic recheck of the change counter
    still refuses a revoked token within a second, and the listener comes back."""
    url = postgres.new_database()
    a = await Store(tmp_path / "x.db", url=url).open()
    b = await Store(tmp_path / "x.db", url=url).open()
    try:
        await a.add_user("alice", UIDS, 0, never)
        token_id, token = await create_token(a, "alice")
        checker = TokenChecker(b)
        assert (await checker.check(token)).user == "alice"
        killed = await a.value("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
        assert killed == 2, killed  # both stores' listeners
        await asyncio.sleep(0.1)
        await a.revoke_token(token_id)
        revoked = time.monotonic()
        while (await checker.check(token)).user is not None:
            assert time.monotonic() - revoked < 1.0
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + 5
        while await a.value("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'") != 2:
            assert time.monotonic() < deadline, "the listeners did not come back"
            await asyncio.sleep(0.1)
    finally:
        await b.close()
        await a.close()
