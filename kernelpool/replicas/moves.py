"""Moving a user to another replica, and what a move has done so far (the `moves` table).

`kernelpool users move NAME --to R` asks (`Moves.request`); the replicas carry it out
(`replicas.mover`), each step announced (MOVES) so the next replica acts at once:

  draining  the source stops the user's kernels, closes their MCP sessions with a message and
            answers their requests 503 (Retry-After) meanwhile; it packs their folder with tar,
            run as the user's own uid, into `move_chunks` (1 MiB rows: the database carries the
            files, no file system is shared)
  copied    the target makes the user's account and folder and unpacks the chunks, again as the
            user's uid; once tar says all went well it makes itself the user's home and the proxy's
            map is flipped (one transaction: `done`)
  done      the source removes its old copy of the folder and forgets the move

A failure at any step is `failed` with its cause, and the user stays where it was, files and all.
Callers: the CLI (request, wait) and `replicas.mover`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kernelpool.db.base import HOMES, MOVES
from kernelpool.errors import InvalidArgument, UserNotFound
from kernelpool.store import Store

CHUNK = 1 << 20
DRAINING, COPIED, DONE, FAILED = "draining", "copied", "done", "failed"


@dataclass(frozen=True)
class MoveRow:
    user: str
    source: str
    target: str
    state: str
    started_at: float
    updated_at: float
    files: int | None
    bytes: int | None
    error: str | None




class Moves:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def all(self) -> list[MoveRow]:
        return [MoveRow(*r) for r in await self._store.rows(
            "SELECT user, source, target, state, started_at, updated_at, files, bytes, error FROM moves ORDER BY started_at")]

    async def get(self, user: str) -> MoveRow | None:
        found = await self._store.rows(
            "SELECT user, source, target, state, started_at, updated_at, files, bytes, error FROM moves WHERE user = ?", user)
        return MoveRow(*found[0]) if found else None

    async def request(self, user: str, target: str) -> MoveRow:
        """Ask for `user` to move to `target` (a running replica, checked by the caller). Raises
        UserNotFound, or InvalidArgument when it lives there already or another move is under way."""
        row = await self._store.get_user(user)
        if row is None:
            raise UserNotFound(user)
        if row.home is None:
            # never placed: nothing to copy, no replica to drain; placing it is the whole move
            async with self._store.access_transaction(HOMES) as tx:
                await self._store.set_home(tx, user, target)
            return MoveRow(user, "", target, DONE, time.time(), time.time(), 0, 0, None)
        if row.home == target:
            raise InvalidArgument("replica", f"user {user!r} lives on {target!r} already")
        now = time.time()
        async with self._store.transaction() as tx:
            found = await tx.rows("SELECT state FROM moves WHERE user = ?", user)
            if found and found[0][0] != FAILED:
                raise InvalidArgument("move", f"a move of {user!r} is under way (state {found[0][0]}): wait for it to end")
            await tx.write("DELETE FROM moves WHERE user = ?", user)
            await tx.write("INSERT INTO moves(user, source, target, state, started_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                           user, row.home, target, DRAINING, now, now)
            await self._store.announce(tx, MOVES)
        return MoveRow(user, row.home, target, DRAINING, now, now, None, None, None)

    async def set_state(self, user: str, state: str, *, error: str | None = None, size: int | None = None,
                        files: int | None = None) -> None:
        async with self._store.transaction() as tx:
            await tx.write("UPDATE moves SET state = ?, error = ?, bytes = COALESCE(?, bytes), files = COALESCE(?, files),"
                           " updated_at = ? WHERE user = ?", state, error, size, files, time.time(), user)
            if state == FAILED:
                await tx.write("DELETE FROM move_chunks WHERE user = ?", user)
            await self._store.announce(tx, MOVES)

    async def add_chunk(self, user: str, seq: int, data: bytes) -> None:
        await self._store.write("INSERT INTO move_chunks(user, seq, data) VALUES (?, ?, ?)", user, seq, data)

    async def chunks(self, user: str) -> AsyncIterator[bytes]:
        """The folder's archive, one chunk in memory at a time."""
        seq = 0
        while True:
            found = await self._store.rows("SELECT data FROM move_chunks WHERE user = ? AND seq = ?", user, seq)
            if not found:
                return
            yield bytes(found[0][0])
            seq += 1

    async def finish(self, user: str, target: str) -> None:
        """The files are on `target`: it becomes the user's home, and every replica and proxy hears it."""
        async with self._store.access_transaction(HOMES, MOVES) as tx:
            await self._store.set_home(tx, user, target)
            await tx.write("UPDATE moves SET state = ?, updated_at = ? WHERE user = ?", DONE, time.time(), user)
            await tx.write("DELETE FROM move_chunks WHERE user = ?", user)

    async def forget(self, user: str) -> None:
        await self._store.write("DELETE FROM moves WHERE user = ?", user)

    async def wait(self, user: str, started_at: float, timeout: float, interval: float = 0.2) -> MoveRow | None:
        """The move's row once it is done (or forgotten: done and cleaned up) or failed; None when
        `timeout` passed first. Called by the CLI."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = await self.get(user)
            if row is None or row.started_at != started_at:
                home = await self._store.get_user(user)
                return MoveRow(user, "", home.home if home and home.home else "", DONE, started_at, time.time(),
                               None, None, None)
            if row.state in (DONE, FAILED):
                return row
            await asyncio.sleep(interval)
        return None
