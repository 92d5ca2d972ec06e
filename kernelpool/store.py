"""The SQLite store: users, token hashes, kernels and the audit log.

One `Store` is opened in the app's lifespan (and by each CLI command) and closed after. The
database runs in WAL mode so that the CLI can add users and tokens while the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from kernelpool.errors import DataFromNewerVersion, NoUidLeft, UserExists
from kernelpool.schema import MIGRATIONS as _MIGRATIONS

log = logging.getLogger(__name__)

_AUDIT_DELAY = 0.05  # seconds an audit row may wait to be written with others
_AUDIT_RETRY = (0.5, 10.0)  # first and longest wait between attempts while audit writes fail

SCHEMA_VERSION = len(_MIGRATIONS)


def schema_version_on_disk(path: Path) -> int | None:
    """The schema version in the database file's header, read without SQLite (so without writing
    anything, not even the shared-memory file); None when there is no database there yet."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return None  # empty, or not a database: SQLite itself will say what is wrong
    return int.from_bytes(header[60:64], "big", signed=True)


def check_not_newer(path: Path) -> None:
    """Raise DataFromNewerVersion when the database was written by a newer kernelpool. Called by
    `Store.open` and by `kernelpool serve` before it builds anything."""
    found = schema_version_on_disk(path)
    if found is not None and found > SCHEMA_VERSION:
        raise DataFromNewerVersion(str(path), found, SCHEMA_VERSION)


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    await db.execute("BEGIN IMMEDIATE")  # also keeps a CLI command started meanwhile from migrating too
    try:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:  # the header said otherwise: a newer server's write-ahead log
            raise DataFromNewerVersion(str(path), found, SCHEMA_VERSION)
        for version in range(found, SCHEMA_VERSION):
            for statement in _MIGRATIONS[version]:
                await db.execute(statement)
        if found != SCHEMA_VERSION:
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.commit()
    except BaseException:
        await db.rollback()
        raise


@dataclass(frozen=True)
class UserRow:
    name: str
    uid: int
    gid: int
    created_at: float
    limits: dict[str, Any]
    reissued: bool = False  # the name had an account before: this one is named after its uid


@dataclass(frozen=True)
class TokenRow:
    id: str
    user: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    uid: int | None = None  # the user's, when looked up to check the token
    grant_id: str | None = None  # an OAuth access token's grant (kernelpool/users/grants.py); None: pasted
    resource: str | None = None  # the MCP resource an OAuth access token is bound to (RFC 8707)


@dataclass(frozen=True)
class KernelRow:
    id: str
    user: str
    notebook: str | None
    pid: int | None
    cgroup: str | None
    connection_file: str | None
    started_at: float


class Store:
    """Async access to the database: `await store.open()` once, `await store.close()` at the end."""

    def __init__(self, path: Path, audit_queue_max: int = 100_000) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        # audit rows not yet written: they stay here while writes fail (a full disk), oldest first,
        # up to audit_queue_max; past that the oldest are dropped and counted in audit_dropped
        self._audit_rows: deque[tuple[Any, ...]] = deque()
        self._audit_flush: asyncio.Task[None] | None = None
        self._audit_queue_max = audit_queue_max
        self.audit_dropped = 0
        self.audit_failing: str | None = None  # why the last write failed, while writes fail
        # commits of this connection that can end a login (revocations, removals): counted here,
        # because PRAGMA data_version only moves for other connections' commits
        self._access_changes = 0

    @property
    def _db(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("the store is not open")
        return self._conn

    @property
    def db(self) -> aiosqlite.Connection:
        """The open connection, for the stores of other nouns on this database (`users.grants`)."""
        return self._db

    def access_changed(self) -> None:
        """A commit of this connection ended a login (a grant revoked): moves `change_mark`."""
        self._access_changes += 1

    async def open(self) -> Store:
        """Open the database and bring its schema up to SCHEMA_VERSION; raises DataFromNewerVersion
        (having written nothing) for a database of a newer kernelpool."""
        check_not_newer(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        db = await aiosqlite.connect(self.path, timeout=30)
        try:
            if fresh:
                os.chmod(self.path, 0o600)
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await _migrate(db, self.path)
        except BaseException:
            await db.close()
            raise
        self._conn = db
        return self

    async def close(self) -> None:
        if self._audit_flush is not None and not self._audit_flush.done():
            self._audit_flush.cancel()
        if self._conn is not None:
            try:
                await self.flush_audit()
            except Exception as exc:
                log.error("audit: %d row(s) could not be written before closing: %s", len(self._audit_rows), exc)
            await self._conn.close()
            self._conn = None

    # users
    async def add_user(self, name: str, uids: tuple[int, int], floor: int, in_use: Callable[[int], bool]) -> UserRow:
        """Add `name` with the lowest uid (its gid the same number) in `uids` that is above every uid
        ever given (the mark) and above `floor`, skipping those `in_use` says the host gives away.
        One transaction: two commands at once never get the same uid. Raises UserExists, NoUidLeft."""
        low, high = uids
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            if await self._value("SELECT 1 FROM users WHERE name = ?", name) is not None:
                raise UserExists(name)
            mark = await self._value("SELECT uid FROM uid_mark")
            reissued = await self._value("SELECT 1 FROM removed_users WHERE name = ? LIMIT 1", name) is not None
            start = max(low, (mark or 0) + 1, floor + 1)
            uid = next((u for u in range(start, high + 1) if not in_use(u)), None)
            if uid is None:
                removed = await self._value("SELECT COUNT(*) FROM removed_users WHERE uid IS NOT NULL")
                raise NoUidLeft(low, high, max(start - 1, low), removed or 0)
            now = time.time()
            await self._db.execute("INSERT INTO users(name, uid, gid, created_at, limits, reissued) VALUES (?, ?, ?, ?, '{}', ?)",
                                   (name, uid, uid, now, int(reissued)))
            await self._db.execute("INSERT OR REPLACE INTO uid_mark(one, uid) VALUES (1, ?)", (uid,))
            await self._db.commit()
        except BaseException:
            await self._db.rollback()
            raise
        return UserRow(name, uid, uid, now, {}, reissued)

    async def _value(self, sql: str, *args: Any) -> Any:
        async with self._db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return row[0] if row else None

    async def get_user(self, name: str) -> UserRow | None:
        async with self._db.execute("SELECT * FROM users WHERE name = ?", (name,)) as cur:
            row = await cur.fetchone()
        return _user(row) if row else None

    async def list_users(self) -> list[UserRow]:
        async with self._db.execute("SELECT * FROM users ORDER BY name") as cur:
            return [_user(r) for r in await cur.fetchall()]

    async def admits(self, name: str, uid: int) -> bool:
        """Whether `name` is a user with this uid that is not being removed (checked by the server
        once a kernel of theirs runs: a removal that began before may have missed it)."""
        return await self._value("SELECT 1 FROM users WHERE name = ? AND uid = ? AND name NOT IN (SELECT user FROM removing)",
                                 name, uid) is not None

    async def removing(self) -> set[str]:
        """The users `users remove` has marked and not yet removed."""
        async with self._db.execute("SELECT user FROM removing") as cur:
            return {r[0] for r in await cur.fetchall()}

    async def set_user_limits(self, name: str, limits: dict[str, Any]) -> None:
        await self._commit("UPDATE users SET limits = ? WHERE name = ?", json.dumps(limits), name)

    async def set_removing(self, name: str, removing: bool) -> None:
        """Mark a user as being removed (its tokens stop working at once) or unmark it."""
        if removing:
            await self._db.execute("INSERT OR REPLACE INTO removing(user, since) VALUES (?, ?)", (name, time.time()))
        else:
            await self._db.execute("DELETE FROM removing WHERE user = ?", (name,))
        await self._db.commit()
        self._access_changes += 1

    async def remove_user(self, name: str, account: str | None) -> bool:
        """Drop the user's row with its tokens, mark and kernel rows, keeping its name, uid and
        Unix `account` among the removed (neither is given again)."""
        try:
            cur = await self._db.execute(
                "INSERT INTO removed_users(name, uid, account, removed_at) SELECT name, uid, ?, ? FROM users WHERE name = ?",
                (account, time.time(), name))
            await self._db.execute("DELETE FROM kernels WHERE user = ?", (name,))
            await self._db.execute("DELETE FROM users WHERE name = ?", (name,))
            await self._db.commit()
        except BaseException:
            await self._db.rollback()
            raise
        self._access_changes += 1
        return cur.rowcount > 0

    async def discard_user(self, name: str) -> None:
        """Drop a user whose `add` failed half way: no tombstone, but its uid stays given (the mark)."""
        await self._commit("DELETE FROM users WHERE name = ?", name)
        self._access_changes += 1

    # tokens
    async def add_token(self, token_id: str, user: str, token_hash: str, expires_at: float | None) -> TokenRow:
        now = time.time()
        await self._commit("INSERT INTO tokens(id, user, hash, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                           token_id, user, token_hash, now, expires_at)
        return TokenRow(token_id, user, now, expires_at, None)

    async def token_by_hash(self, token_hash: str) -> TokenRow | None:
        async with self._db.execute(
            # a user being removed has no valid token: its agents start nothing while it goes
            # and an OAuth access token only while its grant stands
            "SELECT t.id, t.user, t.created_at, t.expires_at, t.revoked_at, u.uid, t.grant_id, t.resource FROM tokens t"
            " JOIN users u ON u.name = t.user WHERE t.hash = ? AND t.user NOT IN (SELECT user FROM removing) AND"
            " (t.grant_id IS NULL OR t.grant_id IN (SELECT id FROM oauth_grants WHERE revoked_at IS NULL))", (token_hash,)
        ) as cur:
            row = await cur.fetchone()
        return TokenRow(*row) if row else None

    async def change_mark(self) -> tuple[int, int]:
        """Moves whenever a login may have ended: any commit by another connection (the CLI's
        `tokens revoke`, `users remove`: SQLite's data_version), or a revocation or removal by
        this one. Cheap enough to poll: it reads no table."""
        async with self._db.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return (row[0] if row else 0, self._access_changes)

    async def list_tokens(self, user: str | None = None) -> list[TokenRow]:
        sql = "SELECT id, user, created_at, expires_at, revoked_at FROM tokens WHERE grant_id IS NULL"  # pasted ones
        args: tuple[Any, ...] = ()
        if user is not None:
            sql += " AND user = ?"
            args = (user,)
        async with self._db.execute(sql + " ORDER BY created_at", args) as cur:
            return [TokenRow(*r) for r in await cur.fetchall()]

    async def revoke_token(self, token_id: str) -> bool:
        cur = await self._db.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), token_id)
        )
        await self._db.commit()
        self._access_changes += 1
        return cur.rowcount > 0

    # kernels: what is running, so that a restarted server can find what a dead one left behind
    async def add_kernel(self, row: KernelRow) -> None:
        await self._commit("INSERT OR REPLACE INTO kernels(id, user, notebook, pid, cgroup, connection_file, started_at)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?)",
                           row.id, row.user, row.notebook, row.pid, row.cgroup, row.connection_file, row.started_at)

    async def set_kernel_notebook(self, kernel_id: str, notebook: str | None) -> None:
        await self._commit("UPDATE kernels SET notebook = ? WHERE id = ?", notebook, kernel_id)

    async def remove_kernel(self, kernel_id: str) -> None:
        await self._commit("DELETE FROM kernels WHERE id = ?", kernel_id)

    async def _commit(self, sql: str, *args: Any) -> None:
        await self._db.execute(sql, args)
        await self._db.commit()

    async def list_kernels(self) -> list[KernelRow]:
        async with self._db.execute("SELECT * FROM kernels") as cur:
            return [KernelRow(**dict(r)) for r in await cur.fetchall()]

    # audit
    async def audit(
        self, user: str | None, tool: str, notebook: str | None, outcome: str, duration_ms: float,
        detail: str | None = None,
    ) -> None:
        """Record one tool call. Rows are written in batches a moment later, off the request's path;
        while writes fail (a full disk) they stay queued and are retried; `flush_audit` (and `close`)
        write what is pending."""
        self._audit_rows.append((time.time(), user, tool, notebook, outcome, duration_ms, detail))
        excess = len(self._audit_rows) - self._audit_queue_max
        if excess > 0:
            for _ in range(excess):
                self._audit_rows.popleft()
            if self.audit_dropped == 0:
                log.error("audit: queue full (%d rows, audit_queue_max): dropping the oldest rows", self._audit_queue_max)
            self.audit_dropped += excess
        if self._audit_flush is None or self._audit_flush.done():
            self._audit_flush = asyncio.get_running_loop().create_task(self._flush_audit_soon())

    audit_pending = property(lambda self: len(self._audit_rows))

    async def _flush_audit_soon(self) -> None:
        await asyncio.sleep(_AUDIT_DELAY)
        wait = _AUDIT_RETRY[0]
        while self._audit_rows and self._conn is not None:
            try:
                await self.flush_audit()
            except Exception as exc:
                if self.audit_failing is None:
                    log.warning("audit: writing %d row(s) failed (%s); they stay queued and are retried",
                                len(self._audit_rows), exc)
                self.audit_failing = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(wait)
                wait = min(wait * 2, _AUDIT_RETRY[1])
                continue
            if self.audit_failing is not None:
                log.warning("audit: writes work again; the queued rows are written")
                self.audit_failing = None

    async def flush_audit(self) -> None:
        """Write the queued rows in one transaction; on failure nothing is taken off the queue."""
        if not self._audit_rows:
            return
        rows = list(self._audit_rows)
        dropped_before = self.audit_dropped
        try:
            await self._db.executemany(
                "INSERT INTO audit(ts, user, tool, notebook, outcome, duration_ms, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            await self._db.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await self._db.rollback()
            raise
        # rows queued while the write ran stay; the written ones leave. The queue only ever loses
        # its oldest rows, so any dropped meanwhile were among `rows` and are gone already.
        written_left = max(0, len(rows) - (self.audit_dropped - dropped_before))
        for _ in range(min(written_left, len(self._audit_rows))):
            self._audit_rows.popleft()

    async def read_audit(self, user: str | None = None, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if user is not None:
            clauses.append("user = ?")
            args.append(user)
        if since is not None:
            clauses.append("ts >= ?")
            args.append(since)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        async with self._db.execute(
            f"SELECT ts, user, tool, notebook, outcome, duration_ms, detail FROM audit{where} ORDER BY id LIMIT ?",
            (*args, limit),
        ) as cur:
            return [dict(r) for r in await cur.fetchall()]


def _user(row: aiosqlite.Row) -> UserRow:
    return UserRow(row["name"], row["uid"], row["gid"], row["created_at"], json.loads(row["limits"]), bool(row["reissued"]))
