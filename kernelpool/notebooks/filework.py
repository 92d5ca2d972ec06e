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

from kernelpool.notebooks.listing import Listing
from kernelpool.notebooks.scanner import Scanners
from sandbox import SafeRoot

T = TypeVar("T")

# Entries of listings one user gets a second, at most. Each entry costs the event loop that serves
# every user (the reply's JSON, the SDK's validation and serialization: about 20 us an entry, a
# page of 500 about 10 ms): a user whose agent lists a 200,000-file folder 24 times at once would
# otherwise keep the loop busy, and another user's list_files p50 went to 1.5-1.9x idle
# (tests/test_starve.py), with the scans already out of the server's interpreter. A user's turn
# is held after a listing for its share of this rate (50 ms after a full page of 500); a single
# listing is answered at once, and the next of the same user's file calls waits out the rest.
LISTED_PER_SECOND = 10_000


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
        slot = await self._take(user)
        try:
            yield
        finally:
            self._give_back(user, slot)

    async def _take(self, user: str) -> list[Any]:
        slot = self._turns.get(user)
        if slot is None:
            slot = self._turns[user] = [asyncio.Semaphore(self.per_user), 0]
        slot[1] += 1
        try:
            await slot[0].acquire()
        except BaseException:
            self._leave(user, slot)
            raise
        return slot

    def _give_back(self, user: str, slot: list[Any]) -> None:
        slot[0].release()
        self._leave(user, slot)

    def _leave(self, user: str, slot: list[Any]) -> None:
        slot[1] -= 1
        if slot[1] == 0 and self._turns.get(user) is slot:
            del self._turns[user]

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the pool, for a caller that holds a turn. A cancellation waits for the
        thread to finish (it cannot be stopped) and then goes on."""
        return await _outlasting(asyncio.get_running_loop().run_in_executor(self._pool, fn, *args))

    async def run(self, user: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the pool, in one of `user`'s turns."""
        async with self.turn(user):
            return await self.call(fn, *args)

    async def scan(self, user: str, kind: str, root: SafeRoot, *args: Any) -> Listing:
        """A listing (`kernelpool.notebooks.listing`'s `kind`) in a scanner process, in one of `user`'s
        turns, which stays held after the answer for as long as its entries take at `LISTED_PER_SECOND`."""
        slot = await self._take(user)
        hold = 0.0
        try:
            found = await _outlasting(asyncio.ensure_future(self.scanners.run(kind, root, *args)))
            hold = len(found.items) / LISTED_PER_SECOND
            return found
        finally:
            if hold > 0:
                asyncio.get_running_loop().call_later(hold, self._give_back, user, slot)
            else:
                self._give_back(user, slot)

    def busy(self, user: str) -> int:
        """How many of `user`'s calls hold or wait for a turn (for tests and metrics)."""
        slot = self._turns.get(user)
        return slot[1] if slot is not None else 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.scanners.close()

    async def aclose(self) -> None:
        """`close`, then wait for the scanner processes to exit."""
        self.close()
        await self.scanners.wait_closed()


async def _outlasting(work: asyncio.Future[T]) -> T:
    """`work`'s result; a cancelled caller waits for `work` to end (a thread cannot be stopped; a
    scanner's answer is read whole) and then is cancelled: its turn lasts as long as its work."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([work])
        raise
