"""The store: users, token hashes, kernels and the audit log, in SQLite or PostgreSQL.

One `Store` is opened in the app's lifespan (and by each CLI command) and closed after. Without
`url` it is the SQLite file in the data folder (WAL mode, so that the CLI can add users and
tokens while the server runs); with a `postgresql://` URL it is a database that several
replicas share (`kernelpool.db.postgres`). The statements are the same for both
(`kernelpool.db.sql`), and so are the migrations (`kernelpool.schema`). `replica` names this
process's replica: its kernel and audit rows carry it, and it reaps only its own.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from kernelpool.db import sqlite as _sqlite
from kernelpool.db.audit import AuditQueue
from kernelpool.db.base import ACCESS, HOMES, Backend, Executor
from kernelpool.errors import NoUidLeft, UserExists
from kernelpool.rows import KernelRow, TokenRow, UserRow
from kernelpool.schema import MIGRATIONS as _MIGRATIONS

# the rows are kernelpool/rows.py's, importable from here as before they moved
__all__ = ["SCHEMA_VERSION", "KernelRow", "Store", "TokenRow", "UserRow", "check_not_newer", "new_user_key",
           "schema_version_on_disk"]

SCHEMA_VERSION = len(_MIGRATIONS)
schema_version_on_disk = _sqlite.schema_version_on_disk


def check_not_newer(path: Path) -> None:
    """Raise DataFromNewerVersion when the database was written by a newer kernelpool. Called by
    `Store.open` and by `kernelpool serve` before it builds anything."""
    _sqlite.check_not_newer(path, SCHEMA_VERSION)


def new_user_key() -> str:
    """A user's key: 16 hex digits, random, stable for the user's life, and opaque (it says
    nothing of the name). Tokens carry it so that a proxy can route them (`users.tokens`)."""
    return secrets.token_hex(8)


class Store:
    """Async access to the database: `await store.open()` once, `await store.close()` at the end."""

    def __init__(self, path: Path, *, audit_queue_max: int = 100_000, url: str | None = None,
                 replica: str | None = None) -> None:
        self.path = path
        self.replica = replica
        self.backend: Backend
        if url:
            from kernelpool.db.postgres import PostgresBackend

            self.backend = PostgresBackend(url)
        else:
            self.backend = _sqlite.SQLiteBackend(path)
        self._audit = AuditQueue(self, audit_queue_max)
        # commits of this process that can end a login (revocations, removals, moves): counted
        # here, because SQLite's data_version only moves for other connections' commits
        self._access_changes = 0

    @property
    def kind(self) -> str:
        return self.backend.kind

    async def open(self) -> Store:
        """Open the database and bring its schema up to SCHEMA_VERSION; raises DataFromNewerVersion
        (having written nothing) for a database of a newer kernelpool."""
        await self.backend.open(_MIGRATIONS)
        for (name,) in await self.rows("SELECT name FROM users WHERE ukey IS NULL"):  # users from before keys
            await self.write("UPDATE users SET ukey = ? WHERE name = ? AND ukey IS NULL", new_user_key(), name)
        return self

    async def close(self) -> None:
        await self._audit.close()
        await self.backend.close()

    # statements, for the stores of other nouns on this database (`users.grants`, `replicas`)
    async def rows(self, sql: str, *args: Any) -> list[Any]:
        return await self.backend.rows(sql, *args)

    async def write(self, sql: str, *args: Any) -> int:
        return await self.backend.write(sql, *args)

    async def value(self, sql: str, *args: Any) -> Any:
        found = await self.rows(sql, *args)
        return found[0][0] if found else None

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Executor]:
        return self.backend.transaction()

    async def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.backend.many(sql, rows)

    async def announce(self, tx: Executor, what: str) -> None:
        await self.backend.announce(tx, what)

    def listen(self, callback: Callable[[str], None]) -> None:
        """`callback(what)` for each change announced on this database (`kernelpool.db.base`)."""
        self.backend.listen(callback)

    @contextlib.asynccontextmanager
    async def access_transaction(self, *also: str) -> AsyncIterator[Executor]:
        """A transaction that may end logins (a revocation, a removal, a move): it bumps the change
        counter and announces ACCESS (and `also`) to every process on the database."""
        async with self.transaction() as tx:
            yield tx
            await tx.write("UPDATE changes SET n = n + 1 WHERE one = 1")
            for what in (ACCESS, *also):
                await self.announce(tx, what)
        self._access_changes += 1

    async def access_write(self, sql: str, *args: Any) -> int:
        async with self.access_transaction() as tx:
            return await tx.write(sql, *args)

    # users
    async def add_user(self, name: str, uids: tuple[int, int], floor: int, in_use: Callable[[int], bool],
                       home: str | None = None) -> UserRow:
        """Add `name` with a uid (its gid the same number) in `uids`, above every uid ever given
        and above `floor`, skipping those `in_use` says the host gives away; `home` is its replica.
        One transaction: two commands at once never get the same uid. Raises UserExists, NoUidLeft."""
        low, high = uids
        ukey, now = new_user_key(), time.time()
        async with self.transaction() as tx:
            if self.kind == "postgresql":
                from kernelpool.db.postgres import UID_LOCK

                await tx.rows("SELECT pg_advisory_xact_lock(?)", UID_LOCK)  # the uid and the mark move together
            if await tx.rows("SELECT 1 FROM users WHERE name = ?", name):
                raise UserExists(name)
            mark = (await tx.rows("SELECT uid FROM uid_mark") or [[0]])[0][0] or 0
            reissued = bool(await tx.rows("SELECT 1 FROM removed_users WHERE name = ? LIMIT 1", name))
            start = max(low, mark + 1, floor + 1)
            uid = await self._next_uid(tx, start, high, in_use)
            if uid is None:
                removed = (await tx.rows("SELECT COUNT(*) FROM removed_users WHERE uid IS NOT NULL"))[0][0]
                raise NoUidLeft(low, high, max(start - 1, low), removed or 0)
            await tx.write("INSERT INTO users(name, uid, gid, created_at, limits, reissued, home, ukey)"
                           " VALUES (?, ?, ?, ?, '{}', ?, ?, ?)", name, uid, uid, now, int(reissued), home, ukey)
            await tx.write("INSERT INTO uid_mark(one, uid) VALUES (1, ?) ON CONFLICT (one) DO UPDATE SET uid = excluded.uid", uid)
            if home is not None:
                await self.announce(tx, HOMES)
        return UserRow(name, uid, uid, now, {}, reissued, home, ukey)

    async def _next_uid(self, tx: Executor, start: int, high: int, in_use: Callable[[int], bool]) -> int | None:
        if self.kind != "postgresql":
            return next((u for u in range(start, high + 1) if not in_use(u)), None)
        # PostgreSQL: from the sequence (never back: a uid is given once), moved up to `start` first
        await tx.rows("SELECT setval('kernelpool_uids', ?, false) WHERE (SELECT CASE WHEN is_called THEN last_value + 1"
                      " ELSE last_value END FROM kernelpool_uids) < ?", start, start)
        while True:
            uid = int((await tx.rows("SELECT nextval('kernelpool_uids')"))[0][0])
            if uid > high:
                return None
            if uid >= start and not in_use(uid):
                return uid

    async def get_user(self, name: str) -> UserRow | None:
        found = await self.rows("SELECT name, uid, gid, created_at, limits, reissued, home, ukey, admin FROM users WHERE name = ?", name)
        return _user(found[0]) if found else None

    async def list_users(self) -> list[UserRow]:
        return [_user(r) for r in await self.rows(
            "SELECT name, uid, gid, created_at, limits, reissued, home, ukey, admin FROM users ORDER BY name")]

    async def admits(self, name: str, uid: int) -> bool:
        """Whether `name` is a user with this uid that is not being removed (checked by the server
        once a kernel of theirs runs: a removal that began before may have missed it)."""
        return bool(await self.rows("SELECT 1 FROM users WHERE name = ? AND uid = ? AND name NOT IN (SELECT user FROM removing)",
                                    name, uid))

    async def removing(self) -> set[str]:
        """The users `users remove` has marked and not yet removed."""
        return {r[0] for r in await self.rows("SELECT user FROM removing")}

    async def set_user_limits(self, name: str, limits: dict[str, Any]) -> None:
        await self.write("UPDATE users SET limits = ? WHERE name = ?", json.dumps(limits), name)

    async def set_removing(self, name: str, *, removing: bool) -> None:
        """Mark a user as being removed (its tokens stop working at once) or unmark it."""
        if removing:
            await self.access_write("INSERT INTO removing(user, since) VALUES (?, ?)"
                                    " ON CONFLICT (user) DO UPDATE SET since = excluded.since", name, time.time())
        else:
            await self.access_write("DELETE FROM removing WHERE user = ?", name)

    async def remove_user(self, name: str, account: str | None) -> bool:
        """Drop the user's row with its tokens, mark and kernel rows, keeping its name, uid and
        Unix `account` among the removed (neither is given again)."""
        async with self.access_transaction(HOMES) as tx:
            kept = await tx.write("INSERT INTO removed_users(name, uid, account, removed_at)"
                                  " SELECT name, uid, ?, ? FROM users WHERE name = ?", account, time.time(), name)
            await tx.write("DELETE FROM kernels WHERE user = ?", name)
            await tx.write("DELETE FROM users WHERE name = ?", name)
        return kept > 0

    async def discard_user(self, name: str) -> None:
        """Drop a user whose `add` failed half way: no tombstone, but its uid stays given (the mark)."""
        await self.access_write("DELETE FROM users WHERE name = ?", name)

    async def set_home(self, tx: Executor, name: str, home: str) -> None:
        """Make `home` the user's replica, in a transaction of `access_transaction(HOMES)`."""
        await tx.write("UPDATE users SET home = ? WHERE name = ?", home, name)

    # tokens
    async def add_token(self, token_id: str, user: str, token_hash: str, expires_at: float | None, *,
                        keyed: bool = True) -> TokenRow:
        now = time.time()
        await self.write("INSERT INTO tokens(id, user, hash, created_at, expires_at, keyed) VALUES (?, ?, ?, ?, ?, ?)",
                         token_id, user, token_hash, now, expires_at, int(keyed))
        return TokenRow(token_id, user, now, expires_at, None)

    async def token_by_hash(self, token_hash: str) -> TokenRow | None:
        found = await self.rows(
            # a user being removed has no valid token: its agents start nothing while it goes
            # and an OAuth access token only while its grant stands
            "SELECT t.id, t.user, t.created_at, t.expires_at, t.revoked_at, u.uid, t.grant_id, t.resource, u.home FROM tokens t"
            " JOIN users u ON u.name = t.user WHERE t.hash = ? AND t.user NOT IN (SELECT user FROM removing) AND"
            " (t.grant_id IS NULL OR t.grant_id IN (SELECT id FROM oauth_grants WHERE revoked_at IS NULL))", token_hash)
        return TokenRow(*found[0]) if found else None

    async def change_mark(self) -> tuple[int, ...]:
        """Moves whenever a login may have ended: a commit of another process (the CLI's `tokens
        revoke`, `users remove`, another replica's), or a revocation or removal by this one.
        Cheap enough to poll: it reads no table (PostgreSQL: a counter, every few seconds)."""
        return (*await self.backend.change_mark(), self._access_changes)

    async def list_tokens(self, user: str | None = None) -> list[TokenRow]:
        found = await self.rows("SELECT id, user, created_at, expires_at, revoked_at FROM tokens WHERE grant_id IS NULL"
                                " AND (CAST(? AS TEXT) IS NULL OR user = ?) ORDER BY created_at", user, user)
        return [TokenRow(*r) for r in found]

    async def revoke_token(self, token_id: str) -> bool:
        return await self.access_write("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                       time.time(), token_id) > 0

    # kernels: what is running, so that a restarted server can find what a dead one left behind
    async def add_kernel(self, row: KernelRow) -> None:
        await self.write("INSERT INTO kernels(id, user, notebook, pid, cgroup, connection_file, started_at, replica)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET user = excluded.user,"
                         " notebook = excluded.notebook, pid = excluded.pid, cgroup = excluded.cgroup,"
                         " connection_file = excluded.connection_file, started_at = excluded.started_at,"
                         " replica = excluded.replica",
                         row.id, row.user, row.notebook, row.pid, row.cgroup, row.connection_file, row.started_at, self.replica)

    async def set_kernel_notebook(self, kernel_id: str, notebook: str | None) -> None:
        await self.write("UPDATE kernels SET notebook = ? WHERE id = ?", notebook, kernel_id)

    async def remove_kernel(self, kernel_id: str) -> None:
        await self.write("DELETE FROM kernels WHERE id = ?", kernel_id)

    async def list_kernels(self) -> list[KernelRow]:
        """This replica's kernel rows (each replica reaps only what it started)."""
        found = await self.rows("SELECT id, user, notebook, pid, cgroup, connection_file, started_at FROM kernels"
                                " WHERE COALESCE(replica, '') = ?", self.replica or "")
        return [KernelRow(*r) for r in found]

    # audit
    async def audit(self, user: str | None, tool: str, notebook: str | None, outcome: str, duration_ms: float,
                    detail: str | None = None, *, client: str | None = None) -> None:
        """Record one tool call (`client`: the MCP client's name, from its clientInfo); written in
        batches a moment later, off the request's path (`AuditQueue`)."""
        self._audit.add((time.time(), user, tool, notebook, outcome, float(duration_ms), detail, client, self.replica))

    async def flush_audit(self) -> None:
        await self._audit.flush()

    audit_pending = property(lambda self: len(self._audit))
    audit_dropped = property(lambda self: self._audit.dropped)
    audit_failing = property(lambda self: self._audit.failing)

    async def read_audit(self, *, user: str | None = None, since: float | None = None,
                         limit: int = 1000) -> list[dict[str, Any]]:
        found = await self.rows(
            "SELECT ts, user, tool, notebook, outcome, duration_ms, detail, replica FROM audit"
            " WHERE (CAST(? AS TEXT) IS NULL OR user = ?) AND (CAST(? AS DOUBLE PRECISION) IS NULL OR ts >= ?)"
            " ORDER BY id LIMIT ?", user, user, since, since, limit)
        # a row's replica only where one wrote it: single-node output stays as it was
        return [{k: v for k, v in dict(r).items() if k != "replica" or v is not None} for r in found]


def _user(row: Any) -> UserRow:
    return UserRow(row["name"], row["uid"], row["gid"], row["created_at"], json.loads(row["limits"]),
                   bool(row["reissued"]), row["home"], row["ukey"], bool(row["admin"]))
