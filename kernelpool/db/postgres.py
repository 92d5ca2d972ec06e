"""The shared backend for several replicas: PostgreSQL through asyncpg.

asyncpg rather than psycopg 3: it is asyncio-native (as the rest of the server), its wheels carry
no libpq, and it brings a connection pool and LISTEN support of its own, so one small dependency
covers what the store needs. Statements are the store's own, rewritten by `kernelpool.db.sql`.

Other writers are heard two ways: LISTEN on one channel (each replica's token cache is forgotten
when a login may have ended, within milliseconds), and, as the fallback when that connection is
down, a counter row (`changes`) that every such write bumps and that `change_mark` reads every
few seconds, or on every call while the listener is lost. Used by `kernelpool.store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg

from kernelpool.db.base import ACCESS, CHANNEL, Executor, Migrations
from kernelpool.db.sql import rowcount, to_postgres
from kernelpool.errors import DataFromNewerVersion

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x6B70_0001  # pg_advisory_xact_lock keys of kernelpool ("kp")
UID_LOCK = 0x6B70_0002
_COUNTER_EVERY = 5.0  # seconds between reads of the change counter while the listener works
_RECONNECT_EVERY = 1.0


def shown(dsn: str) -> str:
    """The database URL without its password, for messages."""
    parts = urllib.parse.urlsplit(dsn)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Tx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        return list(await self._conn.fetch(to_postgres(sql), *args))

    async def write(self, sql: str, *args: Any) -> int:
        return rowcount(await self._conn.execute(to_postgres(sql), *args))


class PostgresBackend:
    kind = "postgresql"

    def __init__(self, dsn: str, *, pool_size: int = 10) -> None:
        self.dsn = dsn
        self._pool_size = pool_size
        self._pool: Any = None
        self._listener: Any = None
        self._callbacks: list[Callable[[str], None]] = []
        self._heard = 0  # ACCESS announcements heard
        self._generation = 0  # listener connections made: a gap between two may have missed some
        self._counter: int | None = None
        self._counter_at = float("-inf")
        self._watch: asyncio.Task[None] | None = None

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    async def open(self, migrations: Migrations) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self._pool_size, command_timeout=60)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await _migrate(conn, migrations, shown(self.dsn))
            await self._connect_listener()
        except BaseException:
            await self.close()
            raise
        self._watch = asyncio.get_running_loop().create_task(self._keep_listening())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=5)
            self._listener = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
            self._pool = None

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        return list(await self.pool.fetch(to_postgres(sql), *args))

    async def write(self, sql: str, *args: Any) -> int:
        return rowcount(await self.pool.execute(to_postgres(sql), *args))

    async def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(to_postgres(sql), rows)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield _Tx(conn)

    async def announce(self, tx: Executor, what: str) -> None:
        await tx.rows("SELECT pg_notify(?, ?)", CHANNEL, what)  # sent when the transaction commits

    def listen(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)

    async def change_mark(self) -> tuple[int, ...]:
        listening = self._listener is not None and not self._listener.is_closed()
        now = time.monotonic()
        if not listening or now - self._counter_at >= _COUNTER_EVERY:
            self._counter_at = now
            self._counter = await self.pool.fetchval("SELECT n FROM changes WHERE one = 1")
        return (self._generation if listening else -1, self._heard, self._counter or 0)

    # the listener
    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload == ACCESS:
            self._heard += 1
        for callback in self._callbacks:
            try:
                callback(payload)
            except Exception:
                log.exception("a listener of the store failed")

    async def _connect_listener(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        await conn.add_listener(CHANNEL, self._on_notify)
        self._listener = conn
        self._generation += 1
        for callback in self._callbacks:  # whatever was said while no one listened: look again
            callback(ACCESS)

    async def _keep_listening(self) -> None:
        while True:
            await asyncio.sleep(_RECONNECT_EVERY)
            if self._listener is not None and not self._listener.is_closed():
                continue
            try:
                await self._connect_listener()
                log.warning("store: listening to %s again", shown(self.dsn))
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("store: cannot listen to %s (%s); the change counter is read at every check meanwhile",
                            shown(self.dsn), exc)


async def _migrate(conn: Any, migrations: Migrations, where: str) -> None:
    version = len(migrations)
    await conn.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")  # one process migrates at a time
    await conn.execute("CREATE TABLE IF NOT EXISTS kernelpool_schema (version INTEGER NOT NULL)")
    found = await conn.fetchval("SELECT max(version) FROM kernelpool_schema") or 0
    if found > version:
        raise DataFromNewerVersion(where, found, version)
    for number in range(found, version):
        for statement in migrations[number]:
            await conn.execute(to_postgres(statement))
    # uids come from a sequence here (`Store.add_user`): not part of the SQLite schema
    await conn.execute("CREATE SEQUENCE IF NOT EXISTS kernelpool_uids")
    if found != version:
        await conn.execute("DELETE FROM kernelpool_schema")
        await conn.execute("INSERT INTO kernelpool_schema(version) VALUES ($1)", version)
