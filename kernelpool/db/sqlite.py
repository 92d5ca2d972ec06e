"""The embedded backend: one SQLite file in the data folder (WAL mode, so that the CLI can write
while the server runs). A single-node install needs nothing else. Used by `kernelpool.store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from kernelpool.db.base import Executor, Migrations
from kernelpool.errors import DataFromNewerVersion


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


def check_not_newer(path: Path, version: int) -> None:
    """Raise DataFromNewerVersion when the file was written by a kernelpool of a schema above `version`."""
    found = schema_version_on_disk(path)
    if found is not None and found > version:
        raise DataFromNewerVersion(str(path), found, version)


class _Tx:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        async with self._db.execute(sql, args) as cur:
            return list(await cur.fetchall())

    async def write(self, sql: str, *args: Any) -> int:
        cur = await self._db.execute(sql, args)
        return cur.rowcount


class SQLiteBackend:
    """One connection; writes take turns (a lock), so that one coroutine's commit never ends
    another's transaction half way."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[str], None]] = []

    @property
    def _db(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("the store is not open")
        return self._conn

    async def open(self, migrations: Migrations) -> None:
        check_not_newer(self.path, len(migrations))
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
            await _migrate(db, self.path, migrations)
        except BaseException:
            await db.close()
            raise
        self._conn = db

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        return await _Tx(self._db).rows(sql, *args)

    async def write(self, sql: str, *args: Any) -> int:
        async with self.transaction() as tx:
            return await tx.write(sql, *args)

    async def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._lock:
            try:
                await self._db.executemany(sql, rows)
                await self._db.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._db.rollback()
                raise

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")  # also keeps another process from writing meanwhile
            try:
                yield _Tx(self._db)
                await self._db.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._db.rollback()
                raise

    async def announce(self, tx: Executor, what: str) -> None:
        # one process: the listeners of this one hear it; other processes see data_version move
        for callback in self._listeners:
            callback(what)

    def listen(self, callback: Callable[[str], None]) -> None:
        self._listeners.append(callback)

    async def change_mark(self) -> tuple[int, ...]:
        # moves with every commit of another connection (the CLI's); reads no table
        async with self._db.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return (int(row[0]) if row else 0,)


async def _migrate(db: aiosqlite.Connection, path: Path, migrations: Migrations) -> None:
    version = len(migrations)
    await db.execute("BEGIN IMMEDIATE")  # also keeps a CLI command started meanwhile from migrating too
    try:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        found = int(row[0]) if row else 0
        if found > version:  # the header said otherwise: a newer server's write-ahead log
            raise DataFromNewerVersion(str(path), found, version)
        for number in range(found, version):
            for statement in migrations[number]:
                await db.execute(statement)
        if found != version:
            await db.execute(f"PRAGMA user_version = {version}")
        await db.commit()
    except BaseException:
        await db.rollback()
        raise
