"""What a replica does as one of several (`replica` set): a heartbeat with its load, HAProxy's
maps kept current, its steps of users' moves, and users placed here since it last looked.

One loop, woken at once by the store's announcements (PostgreSQL LISTEN: a user placed or moved,
a move's step) and otherwise every `_TICK` seconds. Started and stopped in the app's lifespan;
`moving(user)` feeds the app's `HomeGate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from kernelpool.config import Settings
from kernelpool.db.base import HOMES, MOVES
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.replicas.haproxy import MapSync
from kernelpool.replicas.mover import Mover
from kernelpool.replicas.registry import Replicas
from kernelpool.store import Store
from kernelpool.users.accounts import UserService

log = logging.getLogger(__name__)

_TICK = 2.0  # seconds between rounds without announcements
_HEARTBEAT = 5.0


class ReplicaService:
    def __init__(self, settings: Settings, store: Store, users: UserService, kernels: KernelRegistry,
                 end_sessions: Callable[[str, str], Awaitable[int]]) -> None:
        if settings.replica is None:
            raise RuntimeError("a replica service needs settings.replica")
        self.name: str = settings.replica
        self._users, self._kernels = users, kernels
        self.replicas = Replicas(store, settings.replica_timeout)
        self.maps = MapSync(store, settings.haproxy_admin, settings.haproxy_maps) if settings.haproxy_admin else None
        self.mover = Mover(settings, store, users, kernels, end_sessions)
        self._wake = asyncio.Event()
        self._homes_changed = True
        self._task: asyncio.Task[None] | None = None
        self._beat_at = float("-inf")
        store.listen(self._heard)

    def moving(self, user: str) -> str | None:
        """The replica `user` is being moved to from here, while it moves; else None."""
        return self.mover.leaving.get(user)

    def _heard(self, what: str) -> None:
        if what in (HOMES, MOVES):
            self._homes_changed = self._homes_changed or what == HOMES
            self._wake.set()

    async def start(self) -> None:
        await self.replicas.heartbeat(self.name, len(self._kernels.all()), started=True)
        self._beat_at = time.monotonic()
        await self._round()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _TICK)
            self._wake.clear()
            try:
                await self._round()
            except Exception:
                log.exception("replica %s: a round of housekeeping failed", self.name)

    async def _round(self) -> None:
        if time.monotonic() - self._beat_at >= _HEARTBEAT:
            self._beat_at = time.monotonic()
            await self.replicas.heartbeat(self.name, len(self._kernels.all()))
        await self.mover.step()
        if self._homes_changed:
            self._homes_changed = False
            await self._users.load()  # users placed here: their accounts and folders
        if self.maps is not None:
            changed = await self.maps.sync()
            if changed:
                log.info("HAProxy maps: %d entr%s updated", changed, "y" if changed == 1 else "ies")
