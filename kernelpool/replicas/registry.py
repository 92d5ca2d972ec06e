"""Which replicas run, how loaded each is, and where a new user goes.

Each replica writes a heartbeat (`replicas` table) every few seconds with its kernel count; a
replica not heard from for `replica_timeout` seconds is not placed on. Placement picks the
running replica with the fewest users homed on it (ties: fewer kernels, then the name), so
that users, the unit that cannot be split, spread evenly. Callers: `replicas.service` (the
heartbeat), the CLI (`users add`, `users move`, `replicas`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kernelpool.errors import InvalidArgument
from kernelpool.store import Store


@dataclass(frozen=True)
class ReplicaRow:
    name: str
    started_at: float
    seen_at: float
    kernels: int
    users: int
    running: bool


class Replicas:
    def __init__(self, store: Store, timeout: float = 30.0) -> None:
        self._store = store
        self._timeout = timeout

    async def heartbeat(self, name: str, kernels: int, *, started: bool = False) -> None:
        now = time.time()
        if started:
            await self._store.write("INSERT INTO replicas(name, started_at, seen_at, kernels) VALUES (?, ?, ?, ?)"
                                    " ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at,"
                                    " seen_at = excluded.seen_at, kernels = excluded.kernels", name, now, now, kernels)
        else:
            await self._store.write("INSERT INTO replicas(name, started_at, seen_at, kernels) VALUES (?, ?, ?, ?)"
                                    " ON CONFLICT (name) DO UPDATE SET seen_at = excluded.seen_at,"
                                    " kernels = excluded.kernels", name, now, now, kernels)

    async def all(self) -> list[ReplicaRow]:
        now = time.time()
        rows = await self._store.rows(
            "SELECT r.name, r.started_at, r.seen_at, r.kernels, (SELECT COUNT(*) FROM users u WHERE u.home = r.name)"
            " FROM replicas r ORDER BY r.name")
        return [ReplicaRow(n, s, seen, k, int(u), now - seen <= self._timeout) for n, s, seen, k, u in rows]

    async def place(self, given: str | None = None) -> str:
        """The replica a new (or moved) user goes to: `given` if it runs, else the least loaded
        running one. Raises InvalidArgument naming the running replicas."""
        rows = await self.all()
        running = [r for r in rows if r.running]
        names = ", ".join(r.name for r in running) or "none"
        if given is not None:
            if given not in {r.name for r in running}:
                known = "" if given in {r.name for r in rows} else " (never seen)"
                raise InvalidArgument("replica", f"{given!r} is not running{known}; running: {names}")
            return given
        if not running:
            raise InvalidArgument("replica", "no replica is running (none has written a heartbeat in the last "
                                  f"{self._timeout:g} s): start one, or give --replica")
        return min(running, key=lambda r: (r.users, r.kernels, r.name)).name
