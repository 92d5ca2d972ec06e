"""The warm pool: kernels started ahead for a user, handed out by `KernelRegistry.acquire`.

Pool kernels are started for one user's identity and cgroup and are never handed to anyone
else: a kernel's uid cannot change once it runs. A user's pool is refilled after each kernel
it hands out (or starts) and emptied when the user has not asked for a kernel for as long as
an idle kernel is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from kernelpool.errors import LimitReached
from kernelpool.kernels.kernel import Kernel
from kernelpool.users.accounts import User

log = logging.getLogger(__name__)


class StopKernel(Protocol):
    """The registry's stop: `now` skips the polite shutdown request."""

    def __call__(self, kernel: Kernel, *, now: bool = False) -> Awaitable[None]: ...


class WarmPool:
    """Up to `size` warm kernels per active user, started with `start` and stopped with `stop`
    (the registry's: they admit kernels against the limits and give their slots back)."""

    def __init__(self, size: int, start: Callable[[User], Awaitable[Kernel]], stop: StopKernel,
                 starting: Callable[[str], int]) -> None:
        self._size = size
        self._start = start
        self._stop = stop
        self._starting = starting  # user -> kernels being started for it (refills included)
        self._pools: dict[str, deque[Kernel]] = {}
        self._refills: set[asyncio.Task[None]] = set()
        self._last_acquire: dict[str, float] = {}
        self._closed = False

    def kernels(self, user: str | None = None) -> list[Kernel]:
        if user is not None:
            return list(self._pools.get(user, ()))
        return [k for pool in self._pools.values() for k in pool]

    async def take(self, user: User) -> Kernel | None:
        """A live warm kernel of `user` with the user's current limits, or None."""
        pool = self._pools.get(user.name)
        while pool:
            kernel = pool.popleft()
            # a warm kernel started before the user's limits changed (`users set-limits`) would
            # keep the old ones, and one of a removed user of the same name runs as another uid:
            # it goes, and a kernel of this user with the current limits starts instead
            if kernel.limits != user.kernel_limits or kernel.uid != user.uid:
                await self._stop(kernel, now=True)
            elif await kernel.is_alive():
                return kernel
            else:
                kernel.explain_death()
                await self._stop(kernel, now=True)
        return None

    def discard(self, kernel: Kernel) -> bool:
        """Take `kernel` out of its user's pool (it is being stopped); False if it was not there."""
        pool = self._pools.get(kernel.user)
        if pool is None or kernel not in pool:
            return False
        pool.remove(kernel)
        return True

    def acquired(self, user: User) -> None:
        """`user` was handed a kernel: they count as active, and their pool fills up again."""
        self._last_acquire[user.name] = time.monotonic()
        if self._closed or self._size <= 0:
            return
        task = asyncio.get_running_loop().create_task(self._refill(user))
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def _refill(self, user: User) -> None:
        pool = self._pools.setdefault(user.name, deque())
        while not self._closed and len(pool) + self._starting(user.name) < self._size:
            try:
                kernel = await self._start(user)
            except LimitReached:
                return  # the user's kernels (or the server's) are at their limit: no warm one
            except Exception as exc:  # a refill that fails must not take anything else down
                log.warning("pool refill for %s failed: %s", user.name, exc)
                return
            if self._closed:
                await self._stop(kernel, now=False)
                return
            pool.append(kernel)

    def drop(self, user: str) -> list[Kernel]:
        """The user was removed: its warm kernels leave the pool (the caller stops them); a refill
        running for it fails on its own (`KernelRegistry` admits no kernel of a removed user)."""
        self._last_acquire.pop(user, None)
        return list(self._pools.pop(user, ()))

    async def retire_inactive(self, now: float, timeout: float) -> int:
        """Stop the warm kernels of users who have not asked for a kernel for `timeout` seconds."""
        retired = 0
        for user, pool in list(self._pools.items()):
            if pool and now - self._last_acquire.get(user, 0.0) > timeout:
                while pool:
                    kernel = pool.popleft()
                    log.info("retiring warm kernel %s of inactive user %s", kernel.id, user)
                    await self._stop(kernel, now=False)
                    retired += 1
        return retired

    async def close(self) -> list[Kernel]:
        """No more refills (running ones are cancelled); returns the warm kernels, for the caller to stop."""
        self._closed = True
        for task in list(self._refills):
            task.cancel()
        await asyncio.gather(*self._refills, return_exceptions=True)
        kernels = self.kernels()
        self._pools.clear()
        return kernels
