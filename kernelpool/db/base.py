"""What the store needs of a database: statements, transactions, and word of other writers.

Rows are the driver's own (`sqlite3.Row`, `asyncpg.Record`): both give a column by index or by
name, unpack as a tuple and convert with `dict(row)`. Implemented by `kernelpool.db.sqlite` and
`kernelpool.db.postgres`; used by `kernelpool.store.Store`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

Migrations = Sequence[Sequence[str]]
# channel of the store's notifications, and what each names (the payload)
CHANNEL = "kernelpool"
ACCESS = "access"  # a login may have ended: a revocation, a removal, a user moved
HOMES = "homes"  # a user was placed or moved: the proxy's map must follow
MOVES = "moves"  # a move advanced a step


class Executor(Protocol):
    async def rows(self, sql: str, *args: Any) -> list[Any]:
        """The rows of a query."""

    async def write(self, sql: str, *args: Any) -> int:
        """Run a statement; the rows it touched."""


class Backend(Executor, Protocol):
    kind: str  # "sqlite" or "postgresql"

    async def open(self, migrations: Migrations) -> None:
        """Connect and bring the schema up to len(migrations), in one transaction; raises
        DataFromNewerVersion, having written nothing, for a database of a newer kernelpool."""

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[Executor]:
        """Statements that commit together or not at all; other writers of this backend wait."""

    async def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for each row, in one transaction."""

    async def announce(self, tx: Executor, what: str) -> None:
        """Tell the other processes on this database `what` changed, when `tx` commits."""

    def listen(self, callback: Callable[[str], None]) -> None:
        """Call `callback(what)` for each announcement of another process (and of this one)."""

    async def change_mark(self) -> tuple[int, ...]:
        """Moves whenever another process may have ended a login (see `Store.change_mark`)."""
