"""Kernels: one per (user, notebook), started through the sandbox provisioner, kept warm in a pool.

`KernelRegistry` is the only owner of kernel processes. The tool layer asks it for the kernel
of a (user, notebook); it hands out a warm pool kernel of that user when one is ready
(`kernels.pool`), else starts one (`kernels.launch`). Every kernel is admitted against the
per-user and server limits before it starts and counted until its process is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import shlex
import time
import uuid
from collections.abc import Awaitable, Callable, Collection

from kernelpool.config import Settings
from kernelpool.errors import KernelFailed, LimitReached
from kernelpool.kernels import reaper
from kernelpool.kernels.kernel import Kernel, KernelState
from kernelpool.kernels.launch import KernelLauncher
from kernelpool.kernels.messages import Misbehaviour
from kernelpool.kernels.networks import UserNetworkPolicy
from kernelpool.kernels.pool import WarmPool
from kernelpool.kernels.specs import DEFAULT, KernelSpecs, Spec
from kernelpool.kernels.zygote.server import ForkServer
from kernelpool.metrics import Metrics
from kernelpool.store import KernelRow, Store
from kernelpool.users.accounts import User, UserService
from sandbox import CgroupBackend

__all__ = ["KernelRegistry"]

log = logging.getLogger(__name__)


def chdir_code(language: str, folder: str) -> str | None:
    """Code that moves a kernel of `language` into the notebook's `folder` (relative to the user's
    folder, where kernels start), quoted for that language; None for a language we cannot say it in."""
    lang = language.lower()
    if lang == "python":
        return f"import os as _o; _o.chdir({folder!r}); del _o"
    if lang == "r":
        return f"setwd({json.dumps(folder)})"  # R reads JSON's escapes (\\, \", \uXXXX) in a string
    if lang == "bash":
        return f"cd -- {shlex.quote(folder)}"
    return None


class KernelRegistry:
    """Owns every kernel; opened in the app's lifespan, `close()` shuts them all down.

    `fork_server` (started or not: the app's lifespan starts it) is what kernels are forked
    from while it runs; `disk_check` raises when the data folder is too full to start a kernel;
    `launcher` builds the one `KernelLauncher` (the unit tests give one that starts no process).
    """

    def __init__(self, settings: Settings, store: Store, users: UserService, cgroups: CgroupBackend | None,
                 networks: UserNetworkPolicy | None = None, *, fork_server: ForkServer | None = None,
                 disk_check: Callable[[str], None] | None = None, metrics: Metrics | None = None,
                 launcher: Callable[..., KernelLauncher] = KernelLauncher,
                 specs: KernelSpecs | None = None,
                 spec_of: Callable[[str, str], Awaitable[str]] | None = None) -> None:
        self._settings = settings
        self.networks = networks or UserNetworkPolicy(None)
        self._store = store
        self._users = users
        self._cgroups = cgroups
        self._disk_check = disk_check
        self._metrics = metrics or Metrics()
        self.specs = specs or KernelSpecs(())
        # the kernelspec a notebook records (kernels.specs), for a kernel started without one given
        self._spec_of = spec_of
        self._launcher = launcher(settings, users, cgroups, self.networks, fork_server, self._metrics,
                                  self._misbehaved, self.specs)
        # warm kernels per kernelspec: python3's pool_size, the others' kernelspec_pool_sizes (default 0)
        self._pools = {name: WarmPool(settings.pool_size if name == DEFAULT else settings.kernelspec_pool_sizes.get(name, 0),
                                      functools.partial(self._start, spec=name), self._stop,
                                      functools.partial(self._starting_of, spec=name))
                       for name in self.specs.specs}
        self._kernels: dict[tuple[str, str], Kernel] = {}
        # user -> kernels admitted and not yet fully stopped: starting, warm, assigned or shutting down.
        # A slot is taken in the same synchronous step that checks the limits (`_admit`), so that
        # concurrent starts can never together exceed them; it is given back when the process is gone.
        self._slots: dict[str, int] = {}
        self._starting: dict[tuple[str, str], int] = {}  # (user, spec) -> kernels being started (refills included)
        self._key_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # kernels stopped for misbehaving
        # told (user, path, cause) when a kernel no call was running on is stopped for misbehaving
        self.listeners: list[Callable[[str, str, str], None]] = []

    # ---- queries ---------------------------------------------------------------------

    def get(self, user: str, path: str) -> Kernel | None:
        return self._kernels.get((user, path))

    def of_user(self, user: str) -> list[Kernel]:
        return [k for (u, _), k in self._kernels.items() if u == user]

    def all(self) -> list[Kernel]:
        return list(self._kernels.values())

    def pooled(self, user: str | None = None) -> list[Kernel]:
        return [k for pool in self._pools.values() for k in pool.kernels(user)]

    def _starting_of(self, user: str, spec: str) -> int:
        return self._starting.get((user, spec), 0)

    def count(self, user: str | None = None) -> int:
        """Kernels counted against the limits: every admitted one until its process is gone."""
        if user is None:
            return sum(self._slots.values())
        return self._slots.get(user, 0)

    # ---- acquiring -------------------------------------------------------------------

    async def acquire(self, name: str, path: str, spec: str | None = None) -> Kernel:
        """The live kernel of (user, notebook at `path`): the existing one, a warm one, or a new one, of
        kernelspec `spec` (None: the one running, else the one the notebook records).

        The user's record (identity, limits) is read only when a kernel has to be found or started.
        """
        key = (name, path)
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        async with lock:
            kernel = self._kernels.get(key)
            if kernel is not None:
                if await kernel.is_alive() and spec in (None, kernel.spec):
                    kernel.last_used = time.monotonic()
                    return kernel
                # a dead kernel (or one of another kind: the notebook was made anew) is replaced
                if spec is None:
                    spec = kernel.spec
                await self._discard(kernel)
            if spec is None:
                spec = await self._spec_of(name, path) if self._spec_of is not None else DEFAULT
            self.specs.get(spec)  # KernelNotAllowed, with what is offered
            user = await self._users.get(name)
            pool = self._pools[spec]
            kernel = await pool.take(user)
            if kernel is None:
                self._metrics.pool_misses.inc()
                kernel = await self._start(user, spec)  # admits it against the limits, or raises LimitReached
            else:
                self._metrics.pool_hits.inc()
            await self._assign(kernel, path)
            self._kernels[key] = kernel
            pool.acquired(user)
            return kernel

    async def _assign(self, kernel: Kernel, path: str) -> None:
        kernel.path = path
        kernel.last_used = time.monotonic()
        folder = path.rpartition("/")[0]
        code = chdir_code(self.specs.get(kernel.spec).language, folder) if folder else None
        if code is not None:
            # kernels start in the user's folder; Jupyter runs a notebook's code in the notebook's folder
            if kernel.channels is None:  # started kernels only are assigned
                raise RuntimeError(f"kernel {kernel.id} has no channels: it was not started")
            await kernel.channels.execute(code, silent=True, store_history=False, listen=False)
        await self._store.set_kernel_notebook(kernel.id, path)

    def _admit(self, user: str) -> None:
        """Check the limits and take a slot in one step (no await between): the only way a kernel is counted."""
        if self.count(user) >= self._settings.max_kernels_per_user:
            raise LimitReached("kernels per user", self._settings.max_kernels_per_user)
        if self.count() >= self._settings.max_kernels:
            raise LimitReached("kernels on this server", self._settings.max_kernels)
        self._slots[user] = self._slots.get(user, 0) + 1

    def _release(self, kernel: Kernel) -> None:
        if kernel.admitted:
            kernel.admitted = False
            self._slots[kernel.user] -= 1

    # ---- starting and stopping --------------------------------------------------------

    async def _start(self, user: User, spec: str = DEFAULT) -> Kernel:
        if self._disk_check is not None:
            self._disk_check("start a kernel")
        self._admit(user.name)  # before any await: the check and the count are one step
        kid = uuid.uuid4().hex[:12]
        key = (user.name, spec)
        self._starting[key] = self._starting.get(key, 0) + 1
        try:
            return await self._start_admitted(user, kid, self.specs.get(spec))
        finally:
            self._starting[key] -= 1
            if not self._starting[key]:
                del self._starting[key]

    async def _start_admitted(self, user: User, kid: str, spec: Spec) -> Kernel:
        """Start a kernel in the slot `_start` took: the Kernel holds it from here, `_stop` gives it back."""
        try:
            kernel = await self._launcher.prepare(user, kid, spec)
        except BaseException:
            self._slots[user.name] -= 1
            raise
        kernel.admitted = True
        try:
            await self._launcher.start(kernel, user)
            # now that its process runs: `users remove` either began after this (and will kill it)
            # or has marked the user already, and the kernel goes at once
            if not await self._users.admits(user):
                raise KernelFailed("(new kernel)", f"user {user.name!r} is being removed")
            await self._store.add_kernel(KernelRow(
                id=kid, user=user.name, notebook=None, pid=kernel.pid,
                cgroup=kernel.cgroup.relpath if kernel.cgroup else None,
                connection_file=kernel.manager.connection_file, started_at=kernel.started_at,
            ))
            await self._launcher.open_channels(kernel)
        except KernelFailed:  # refused (the user is being removed): that is the reason, not how the process ended
            await self._stop(kernel)
            raise
        except Exception as exc:
            cause = kernel.explain_death() if kernel.pid else str(exc)
            await self._stop(kernel)
            raise KernelFailed("(new kernel)", f"could not start: {cause or type(exc).__name__}") from exc
        kernel.transition(KernelState.IDLE)
        log.info("kernel %s started for %s (pid %s)", kid, user.name, kernel.pid)
        return kernel

    async def _stop(self, kernel: Kernel, *, now: bool = False) -> None:
        """Shut one kernel down (`KernelLauncher.stop`) and give back what it held."""
        with contextlib.suppress(RuntimeError):
            kernel.transition(KernelState.STOPPING)
        await self._launcher.stop(kernel, now=now)
        self._release(kernel)  # the process is gone (or beyond our reach): its slot is free again
        if kernel.network_of is not None:
            # after the cgroup is gone: nothing of the user's is left in the namespace
            identity, kernel.network_of = kernel.network_of, None
            await self.networks.leave(identity)
        await self._store.remove_kernel(kernel.id)

    def _misbehaved(self, kernel: Kernel, exc: Misbehaviour) -> None:
        """A kernel's channel reader found it breaking a bound (kernels.channels): it is stopped
        and no longer read. A call running on it ends with the cause; otherwise `listeners` hear it."""
        if kernel.death_cause is not None or kernel.state not in (KernelState.IDLE, KernelState.BUSY):
            kernel.death_cause = kernel.death_cause or f"the kernel was stopped because {exc}"
            return  # starting (the start path fails with the cause) or already going
        kernel.death_cause = f"the kernel was stopped because {exc}"
        self._metrics.misbehaving_kernels.labels(exc.reason).inc()
        log.warning("kernel %s of %s stopped as misbehaving: %s", kernel.id, kernel.user, exc)
        task = asyncio.get_running_loop().create_task(self._stop_misbehaving(kernel, busy=kernel.state is KernelState.BUSY))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_misbehaving(self, kernel: Kernel, *, busy: bool) -> None:
        if kernel.path is not None and self._kernels.get((kernel.user, kernel.path)) is kernel:
            del self._kernels[(kernel.user, kernel.path)]
        self._pools[kernel.spec].discard(kernel)
        await self._stop(kernel, now=True)
        if not busy and kernel.path is not None and kernel.death_cause is not None:
            for listener in self.listeners:
                listener(kernel.user, kernel.path, kernel.death_cause)

    async def _discard(self, kernel: Kernel) -> None:
        kernel.explain_death()
        if kernel.path is not None and self._kernels.get((kernel.user, kernel.path)) is kernel:
            del self._kernels[(kernel.user, kernel.path)]
        await self._stop(kernel, now=True)

    async def shutdown(self, user: str, path: str) -> bool:
        kernel = self._kernels.pop((user, path), None)
        if kernel is None:
            return False
        await self._stop(kernel)
        return True

    async def restart(self, user: User, path: str, spec: str | None = None) -> Kernel:
        """A fresh kernel of the same kind (`spec`, else the running one's, else the notebook's)."""
        running = self._kernels.get((user.name, path))
        spec = spec or (running.spec if running is not None else None)
        await self.shutdown(user.name, path)
        return await self.acquire(user.name, path, spec)

    async def interrupt(self, kernel: Kernel) -> None:
        await kernel.interrupt()

    async def mark_dead(self, kernel: Kernel) -> str:
        return kernel.mark_dead()

    async def cull_idle(self) -> int:
        """Shut down kernels idle longer than kernel_idle_timeout; returns how many."""
        timeout = self._settings.kernel_idle_timeout
        if timeout <= 0:
            return 0
        now = time.monotonic()
        culled = 0
        for (user, path), kernel in list(self._kernels.items()):
            if kernel.state is KernelState.IDLE and not kernel.lock.locked() and now - kernel.last_used > timeout:
                log.info("culling idle kernel %s of %s (%s)", kernel.id, user, path)
                await self.shutdown(user, path)
                culled += 1
        # warm kernels follow activity: a user who has not opened a kernel for as long goes without
        for pool in self._pools.values():
            culled += await pool.retire_inactive(now, timeout)
        return culled

    async def forget_removed(self, current: dict[str, int], removing: Collection[str] = ()) -> int:
        """Stop the kernels (warm ones too) of users who are no longer in `current` (name -> uid),
        or are there with another uid: `users remove` (in the CLI) has ended their processes
        already; this drops what the server kept of them. Called after each user reload.

        The cgroup of a user in `removing` stays: `users remove` takes it when it succeeds, and
        when it stops (a task it cannot kill) the user is back as they were, with new kernels in
        that cgroup, which taking it apart from here would kill."""
        def stale(kernel: Kernel) -> bool:
            return current.get(kernel.user) != kernel.uid

        stopped = 0
        for user in sorted({k.user for k in self.all() + self.pooled() if stale(k)}):
            doomed = [k for k in self.of_user(user) if stale(k)] + [k for p in self._pools.values() for k in p.drop(user)]
            for key in [key for key, kernel in self._kernels.items() if kernel in doomed]:
                del self._kernels[key]
            for kernel in doomed:
                log.info("kernel %s of %s: dropped (the user was removed)", kernel.id, user)
                await self._stop(kernel, now=True)
                stopped += 1
            if user not in removing:
                await self._launcher.forget(user, current.get(user))
        return stopped

    async def reap_leftovers(self) -> int:
        """At start-up: kill what a server that died without cleaning up left behind."""
        return await reaper.reap_leftovers(self._store, self._cgroups, str(self._settings.run_dir))

    def usage(self) -> dict[str, tuple[int | None, float | None]]:
        """Per user: memory in bytes and CPU seconds of all its kernels (from its cgroup, else the processes)."""
        users = {k.user for k in self.all()} | {k.user for k in self.pooled()}
        out: dict[str, tuple[int | None, float | None]] = {}
        for user in users:
            cg = self._launcher.user_cgroup(user)
            if cg is not None:
                out[user] = (cg.memory_current(), cg.cpu_usage_seconds())
                continue
            memory, cpu = 0, 0.0
            for kernel in self.of_user(user) + self.pooled(user):
                kernel_memory, kernel_cpu = kernel.process_usage()
                memory += kernel_memory
                cpu += kernel_cpu
            out[user] = (memory, cpu)
        return out

    async def close(self) -> None:
        pooled = [k for pool in self._pools.values() for k in await pool.close()]
        kernels = list(self._kernels.values()) + pooled
        self._kernels.clear()
        await asyncio.gather(*(self._stop(k) for k in kernels), *self._stopping, return_exceptions=True)
        if self._cgroups is not None:
            # the users' cgroups and our prefix folder: a stopped server leaves nothing in the tree
            root = self._cgroups.get("")
            if root is not None:
                try:
                    root.remove()
                except Exception as exc:
                    log.warning("removing cgroups: %s", exc)
