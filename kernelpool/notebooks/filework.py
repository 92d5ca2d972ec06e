"""The server's threads for reading and writing users' files, shared fairly between users.

Every notebook read and write, listing and stat the server does in a user's folder runs in a
thread (the file system blocks). They used to share the event loop's default pool: 24 slow
`list_files` calls of one user filled it, and every other user's notebook reads queued behind
them for tens of seconds. Here the work goes to a pool of its own, and each user has one turn
in it at a time (`per_user`); a user's further calls wait for that user's turn, in order, so one
user's slow calls queue behind each other, not in front of everyone. One turn, not two: with two,
a user's 24 concurrent listings of a folder of 200,000 files kept two threads busy in Python code
that competed with the event loop for the GIL, and another user's p50 for list_files went over 2x
its idle value in 2 of 6 runs of tests/test_starve.py; with one, it stayed at 0.8-1.6x in 4 runs.

Listings of folders (`scan`) run in the user's turn too, but in a scanner process
(`kernelpool.notebooks.scanner`) instead of a thread: their loop over thousands of names would
otherwise hold the interpreter's lock that the event loop needs.

A turn ends when its thread's work ends, not when the caller stops waiting: a cancelled call
cannot free a turn while its thread still runs. Callers: `kernelpool.notebooks.service`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kernelpool.notebooks.scanner import Scanners

T = TypeVar("T")


class FileWork:
    """A thread pool of `workers`, of which one user holds at most `per_user` at once."""

    def __init__(self, *, workers: int = 6, per_user: int = 1, scanners: int = 2) -> None:
        self.workers = workers
        self.per_user = per_user
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kp-files")
        self.scanners = Scanners(scanners)  # started at the first listing
        # user -> [semaphore, holders and waiters]: dropped when nobody uses it, so that the
        # table does not grow with every user the server ever saw
        self._turns: dict[str, list[Any]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, user: str) -> AsyncIterator[None]:
        """Hold one of `user`'s turns; `call` inside it runs work in the pool."""
        slot = self._turns.get(user)
        if slot is None:
            slot = self._turns[user] = [asyncio.Semaphore(self.per_user), 0]
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                self._turns.pop(user, None)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the pool, for a caller that holds a turn. A cancellation waits for the
        thread to finish (it cannot be stopped) and then goes on."""
        work = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # the thread goes on: the caller's turn lasts until it ends, then the cancellation goes on
            while not work.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([work])
            raise

    async def run(self, user: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the pool, in one of `user`'s turns."""
        async with self.turn(user):
            return await self.call(fn, *args)

    async def scan(self, user: str, kind: str, *args: Any) -> Any:
        """A listing (`kernelpool.notebooks.listing`'s `kind`) in a scanner process, in one of `user`'s turns."""
        async with self.turn(user):
            return await self.scanners.run(kind, *args)

    def busy(self, user: str) -> int:
        """How many of `user`'s calls hold or wait for a turn (for tests and metrics)."""
        slot = self._turns.get(user)
        return slot[1] if slot is not None else 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.scanners.close()
