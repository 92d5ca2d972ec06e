"""How much disk a user's folder takes, against `user_disk_quota`, without walking it on every write.

All users' folders share one disk: one user must not fill it under everyone's notebooks. The
file systems here offer no project quotas, so the usage is a counter: a bounded walk of the
folder (`sandbox.fs.SafeRoot.usage`: at most `max_scan` names, each stat'ed once) when the
count is missing or older than `max_age` seconds, and between walks the server's own writes add
their growth. A kernel writes to the folder directly, as the user: the quota cannot stop that;
it is seen at the next walk, and from then on the server refuses its own writes that add bytes
(write_file, new notebooks, notebook saves that grow a file) until the folder is under the quota
again. A folder of more names than `max_scan` counts as what was seen (a lower bound).

Runs in file-work threads (`kernelpool.notebooks.filework`), in the user's turn: a walk delays
that user's own calls only. Callers: `kernelpool.notebooks.service` and `kernelpool.notebooks.files`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kernelpool.errors import QuotaReached
from sandbox import SafeRoot
from sandbox.errors import SandboxError

MAX_SCAN = 200_000  # names one count reads at most (about 0.2-0.5 s of one thread here)
MAX_AGE = 300.0  # seconds a count is trusted before the next write walks the folder again


@dataclass
class _Count:
    bytes: int
    at: float
    cut: bool


class DiskQuota:
    """`limit` bytes per user folder (None: no quota), as counted here."""

    def __init__(self, roots: Callable[[str], SafeRoot], limit: int | None, max_scan: int = MAX_SCAN,
                 max_age: float = MAX_AGE) -> None:
        self._roots = roots
        self.limit = limit
        self._max_scan = max_scan
        self._max_age = max_age
        self._counts: dict[str, _Count] = {}
        self._guard = threading.Lock()

    def check(self, user: str, path: str, growth: int) -> None:
        """Raise QuotaReached if writing `path` adds `growth` bytes to a folder at or past its
        quota. A write that adds nothing (or frees space) always passes. In a file-work thread."""
        if self.limit is None or growth <= 0:
            return
        used = self.used(user)
        if used + growth > self.limit:
            raise QuotaReached(path, self.limit, used, growth)

    def used(self, user: str) -> int:
        """The folder's usage: the last count plus the server's writes since, or a new count."""
        with self._guard:
            count = self._counts.get(user)
            if count is not None and time.monotonic() - count.at < self._max_age:
                return count.bytes
        found = self._count(user)
        with self._guard:
            self._counts[user] = found
        return found.bytes

    def _count(self, user: str) -> _Count:
        try:
            usage = self._roots(user).usage(self._max_scan)
        except (OSError, SandboxError):
            return _Count(0, time.monotonic(), cut=False)  # no folder yet
        return _Count(usage.bytes, time.monotonic(), usage.cut)

    def changed(self, user: str, delta: int) -> None:
        """The server wrote to (or deleted from) the folder: `delta` bytes more (or fewer)."""
        with self._guard:
            count = self._counts.get(user)
            if count is not None:
                count.bytes = max(0, count.bytes + delta)

    def forget(self, user: str) -> None:
        """Count afresh at the next check (tests; a folder changed outside the server's writes)."""
        with self._guard:
            self._counts.pop(user, None)
