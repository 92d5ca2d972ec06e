"""The audit log's write queue: rows wait a moment to be written with others, off the request's
path; while writes fail (a full disk, a database that does not answer) they stay queued, up to
a bound, and are retried. Used by `kernelpool.store.Store.audit`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Protocol

log = logging.getLogger("kernelpool.store")

_DELAY = 0.05  # seconds a row may wait to be written with others
_RETRY = (0.5, 10.0)  # first and longest wait between attempts while writes fail
_INSERT = ("INSERT INTO audit(ts, user, tool, notebook, outcome, duration_ms, detail, client, replica)"
           " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


class _Writer(Protocol):
    async def many(self, sql: str, rows: Any) -> None: ...


class AuditQueue:
    def __init__(self, writer: _Writer, max_rows: int) -> None:
        self._writer = writer
        # rows not yet written: they stay here while writes fail, oldest first, up to max_rows;
        # past that the oldest are dropped and counted in `dropped`
        self._rows: deque[tuple[Any, ...]] = deque()
        self._max = max_rows
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.failing: str | None = None  # why the last write failed, while writes fail
        self._closed = False

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: tuple[Any, ...]) -> None:
        self._rows.append(row)
        excess = len(self._rows) - self._max
        if excess > 0:
            for _ in range(excess):
                self._rows.popleft()
            if self.dropped == 0:
                log.error("audit: queue full (%d rows, audit_queue_max): dropping the oldest rows", self._max)
            self.dropped += excess
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._soon())

    async def _soon(self) -> None:
        await asyncio.sleep(_DELAY)
        wait = _RETRY[0]
        while self._rows and not self._closed:
            try:
                await self.flush()
            except Exception as exc:
                if self.failing is None:
                    log.warning("audit: writing %d row(s) failed (%s); they stay queued and are retried", len(self._rows), exc)
                self.failing = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(wait)
                wait = min(wait * 2, _RETRY[1])
                continue
            if self.failing is not None:
                log.warning("audit: writes work again; the queued rows are written")
                self.failing = None

    async def flush(self) -> None:
        """Write the queued rows in one transaction; on failure nothing is taken off the queue."""
        if not self._rows:
            return
        rows = list(self._rows)
        dropped_before = self.dropped
        await self._writer.many(_INSERT, rows)
        # rows queued while the write ran stay; the written ones leave. The queue only ever loses
        # its oldest rows, so any dropped meanwhile were among `rows` and are gone already.
        written_left = max(0, len(rows) - (self.dropped - dropped_before))
        for _ in range(min(written_left, len(self._rows))):
            self._rows.popleft()

    async def close(self) -> None:
        """Write what is pending (called by `Store.close`, before the database closes)."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        try:
            await self.flush()
        except Exception as exc:
            log.error("audit: %d row(s) could not be written before closing: %s", len(self._rows), exc)
