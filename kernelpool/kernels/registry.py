"""Kernels: one per (user, notebook), started through the sandbox provisioner, kept warm in a pool.

`KernelRegistry` is the only owner of kernel processes. The tool layer asks it for the kernel
of a (user, notebook); it hands out a warm pool kernel of that user when one is ready, else
starts one. Pool kernels are started for one user's identity and cgroup and are never handed
to anyone else: a kernel's uid cannot change once it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from kernelpool.config import Settings
from kernelpool.errors import KernelFailed, LimitReached
from kernelpool.kernels import packages
from kernelpool.kernels.client import KernelpoolClient
from kernelpool.kernels.networks import UserNetworkPolicy
from kernelpool.kernels.provisioner import KERNEL_NAME, KernelLaunch, KernelpoolSpecManager
from kernelpool.kernels.zygote.server import ForkServer
from kernelpool.store import KernelRow, Store
from kernelpool.users.accounts import User, UserService
from sandbox import Cgroup, CgroupBackend, Identity, Limits, SafeRoot
from sandbox.fs import remove_tree
from sandbox.rundir import TMP, KernelRunDir, remove_kernel_folder

log = logging.getLogger(__name__)


class KernelState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"
    STOPPING = "stopping"


_TRANSITIONS: dict[KernelState, set[KernelState]] = {
    KernelState.STARTING: {KernelState.IDLE, KernelState.DEAD, KernelState.STOPPING},
    KernelState.IDLE: {KernelState.BUSY, KernelState.DEAD, KernelState.STOPPING},
    KernelState.BUSY: {KernelState.IDLE, KernelState.DEAD, KernelState.STOPPING},
    KernelState.DEAD: {KernelState.STOPPING},
    KernelState.STOPPING: set(),
}


@dataclass(eq=False)
class Kernel:
    id: str
    user: str
    manager: AsyncKernelManager
    cgroup: Cgroup | None
    memory_limit: int | None
    rundir: KernelRunDir | None = None
    limits: Limits | None = None  # the per-kernel limits it was started with
    notebook: str | None = None
    client: AsyncKernelClient | None = None
    state: KernelState = KernelState.STARTING
    started_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    executions: int = 0
    death_cause: str | None = None
    admitted: bool = False  # holds one of its user's kernel slots (KernelRegistry._admit) until stopped
    network_of: Identity | None = None  # whose network namespace this kernel counts in (until stopped)
    # one execution at a time: the kernel runs them in order anyway, and one reader per channel
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def transition(self, new: KernelState) -> None:
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"kernel {self.id}: no transition {self.state.value} -> {new.value}")
        self.state = new

    @property
    def pid(self) -> int | None:
        prov = self.manager.provisioner
        return getattr(prov, "pid", None) if prov is not None else None

    async def is_alive(self) -> bool:
        return self.state not in (KernelState.DEAD, KernelState.STOPPING) and await self.manager.is_alive()

    def explain_death(self) -> str:
        """Why the kernel process is gone, in words: out of memory, a signal, or an exit code."""
        if self.death_cause:
            return self.death_cause
        cause = "the kernel process died"
        prov = self.manager.provisioner
        code = getattr(getattr(prov, "process", None), "returncode", None)
        if self.cgroup is not None and self.cgroup.oom_kills() > 0:
            limit = f" of {_fmt_bytes(self.memory_limit)}" if self.memory_limit else ""
            cause = f"the kernel was killed because it ran out of memory (limit{limit})"
        elif getattr(getattr(prov, "process", None), "exit_unknown", False):
            cause = "the kernel process ended; its exit status was lost with the fork server that started it"
        elif code is not None and code < 0:
            import signal

            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            cause = f"the kernel process was killed by {name}"
        elif code is not None:
            cause = f"the kernel process exited with code {code}"
        self.death_cause = cause
        return cause


def user_cgroup_name(user: User) -> str:
    """The folder of a user's cgroup: "u<uid>" (cgroup folders are world-readable on the host)."""
    if user.identity is not None:
        return f"u{user.identity.uid}"
    # without a uid of its own (cgroups but no uid switching): a name derived from nothing secret
    # would still name the user, so a random one, kept by the registry for as long as it runs
    return f"s{secrets.token_hex(8)}"


def _user_run_folders(run_dir: str) -> list[str]:
    """RUN/<uid> folders (root's: listing them follows nothing a tenant made)."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return [os.path.join(run_dir, n) for n in names if n.isdigit() and not os.path.islink(os.path.join(run_dir, n))]


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "none"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"


class KernelRegistry:
    """Owns every kernel; opened in the app's lifespan, `close()` shuts them all down."""

    def __init__(self, settings: Settings, store: Store, users: UserService, cgroups: CgroupBackend | None,
                 networks: UserNetworkPolicy | None = None) -> None:
        self._settings = settings
        self.networks = networks or UserNetworkPolicy(None)
        self._store = store
        self._users = users
        self._cgroups = cgroups
        self._spec_manager = KernelpoolSpecManager()
        self._spec_manager.python = settings.kernel_python or sys.executable
        if settings.user_packages:
            self._spec_manager.extensions = [packages.EXTENSION]
        self._kernels: dict[tuple[str, str], Kernel] = {}
        self._pools: dict[str, deque[Kernel]] = {}
        # user -> kernels admitted and not yet fully stopped: starting, warm, assigned or shutting down.
        # A slot is taken in the same synchronous step that checks the limits (`_admit`), so that
        # concurrent starts can never together exceed them; it is given back when the process is gone.
        self._slots: dict[str, int] = {}
        self._starting: dict[str, int] = {}  # user -> kernels being started (pool refills included)
        self.disk_check: Callable[[str], None] | None = None  # raises when the data folder is too full
        self._key_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._refills: set[asyncio.Task[None]] = set()
        self._last_acquire: dict[str, float] = {}
        self._user_cgroups: dict[str, str] = {}  # user name -> the name of the user's cgroup
        self._closed = False
        self.pool_hits = 0
        self.pool_misses = 0
        self.fork_server: ForkServer | None = None  # set by the app's lifespan when one runs

    # ---- queries ---------------------------------------------------------------------

    def get(self, user: str, notebook: str) -> Kernel | None:
        return self._kernels.get((user, notebook))

    def of_user(self, user: str) -> list[Kernel]:
        return [k for (u, _), k in self._kernels.items() if u == user]

    def all(self) -> list[Kernel]:
        return list(self._kernels.values())

    def pooled(self, user: str | None = None) -> list[Kernel]:
        if user is not None:
            return list(self._pools.get(user, ()))
        return [k for pool in self._pools.values() for k in pool]

    def count(self, user: str | None = None) -> int:
        """Kernels counted against the limits: every admitted one until its process is gone."""
        if user is None:
            return sum(self._slots.values())
        return self._slots.get(user, 0)

    # ---- acquiring -------------------------------------------------------------------

    async def acquire(self, user: User, notebook: str) -> Kernel:
        """The live kernel of (user, notebook): the existing one, a warm one, or a new one."""
        key = (user.name, notebook)
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        async with lock:
            kernel = self._kernels.get(key)
            if kernel is not None:
                if await kernel.is_alive():
                    kernel.last_used = time.monotonic()
                    return kernel
                # a dead kernel is replaced by a fresh one on the next call
                await self._discard(kernel)
            kernel = await self._take_warm(user)
            if kernel is None:
                self.pool_misses += 1
                kernel = await self._start(user)  # admits it against the limits, or raises LimitReached
            else:
                self.pool_hits += 1
            await self._assign(kernel, notebook)
            self._kernels[key] = kernel
            self._last_acquire[user.name] = time.monotonic()
            self._schedule_refill(user)
            return kernel

    async def _take_warm(self, user: User) -> Kernel | None:
        pool = self._pools.get(user.name)
        while pool:
            kernel = pool.popleft()
            # a warm kernel started before the user's limits changed (`users set-limits`) would
            # keep the old ones: it goes, and a kernel with the current limits starts instead
            if kernel.limits != user.kernel_limits:
                await self._stop(kernel, now=True)
            elif await kernel.is_alive():
                return kernel
            else:
                await self._discard(kernel)
        return None

    async def _assign(self, kernel: Kernel, notebook: str) -> None:
        kernel.notebook = notebook
        kernel.last_used = time.monotonic()
        folder = notebook.rpartition("/")[0]
        if folder:
            # kernels start in the user's folder; Jupyter runs a notebook's code in the notebook's folder
            assert kernel.client is not None
            kernel.client.execute(f"import os as _o; _o.chdir({folder!r}); del _o", silent=True, store_history=False)
        await self._store.set_kernel_notebook(kernel.id, notebook)

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

    # ---- the pool --------------------------------------------------------------------

    def _schedule_refill(self, user: User) -> None:
        if self._closed or self._settings.pool_size <= 0:
            return
        task = asyncio.get_running_loop().create_task(self._refill(user))
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def _refill(self, user: User) -> None:
        pool = self._pools.setdefault(user.name, deque())
        while not self._closed and len(pool) + self._starting.get(user.name, 0) < self._settings.pool_size:
            try:
                kernel = await self._start(user)
            except LimitReached:
                return  # the user's kernels (or the server's) are at their limit: no warm one
            except Exception as exc:  # a refill that fails must not take anything else down
                log.warning("pool refill for %s failed: %s", user.name, exc)
                return
            if self._closed:
                await self._stop(kernel)
                return
            pool.append(kernel)

    # ---- starting and stopping --------------------------------------------------------

    async def _start(self, user: User) -> Kernel:
        if self.disk_check is not None:
            self.disk_check("start a kernel")
        self._admit(user.name)  # before any await: the check and the count are one step
        kid = uuid.uuid4().hex[:12]
        self._starting[user.name] = self._starting.get(user.name, 0) + 1
        try:
            return await self._start_inner(user, kid)
        finally:
            self._starting[user.name] -= 1

    async def _start_inner(self, user: User, kid: str) -> Kernel:
        """Start a kernel in the slot `_start` took: the Kernel holds it from here, `_stop` gives it back."""
        try:
            runtime = self._users.runtime_folder(user.uid)
            folder = self._users.folder(user.name)
            ident = user.identity
            # the connection file and sockets: in a folder of root's (see sandbox.rundir)
            rundir = KernelRunDir(str(self._settings.run_dir), user.uid, kid,
                                  ident.uid if ident else None, ident.gid if ident else None)
            rundir.create()
            cgroup = None
            if self._settings.user_packages:
                uid, gid = (user.identity.uid, user.identity.gid) if user.identity else (None, None)
                await asyncio.to_thread(packages.ensure_folders, self._spec_manager.python, SafeRoot(folder, uid, gid))
            try:
                if self._cgroups is not None:
                    # world-readable names: the uid and a random id, never the user's name or the kernel's id
                    # (a kernel id known in advance names its connection file)
                    user_cgroup = self._user_cgroups.setdefault(user.name, user_cgroup_name(user))
                    self._cgroups.create(user_cgroup, user.user_limits)
                    cgroup = self._cgroups.create(f"{user_cgroup}/k{secrets.token_hex(8)}", user.kernel_limits)
            except BaseException:
                rundir.remove()
                raise
            manager = AsyncKernelManager(
                kernel_name=KERNEL_NAME,
                kernel_spec_manager=self._spec_manager,
                transport="ipc",
                ip=rundir.socket_prefix,
                connection_file=rundir.connection_file,
                kernel_id=kid,
                client_class="kernelpool.kernels.client.KernelpoolClient",
            )
        except BaseException:
            self._slots[user.name] -= 1
            raise
        manager.shutdown_wait_time = 2.0
        kernel = Kernel(id=kid, user=user.name, manager=manager, cgroup=cgroup,
                        memory_limit=user.kernel_limits.memory_bytes, rundir=rundir, admitted=True,
                        limits=user.kernel_limits)
        launch = KernelLaunch(
            env=self._kernel_env(user, folder, runtime),
            cwd=folder,
            identity=ident,
            cgroup=cgroup,
            rundir=rundir,
            network="host",  # or the user's namespace, joined by path below
            # with a uid of its own, a kernel gets its own views and the syscall filter too
            private_views=user.identity is not None,
            tmpfs_bytes=self._settings.tmpfs_bytes,
            # the interpreter's environment (sys.prefix) may lie below /tmp too, as in a test venv
            keep_paths=(runtime, os.path.dirname(rundir.connection_file), os.path.dirname(os.path.dirname(self._spec_manager.python))),
            # other users' volumes (Docker: one per user at DATA/users/NAME): not even their names
            hide_mounts_below=(str(self._settings.users_dir), str(self._settings.run_dir)),
            seccomp=user.identity is not None,
            start_timeout=self._settings.kernel_start_timeout,
            extra={"zygote": self.fork_server} if self.fork_server is not None else {},
        )
        try:
            launch.netns = await self.networks.join(user.identity)
            kernel.network_of = user.identity if launch.netns is not None else None
            await manager.start_kernel(sandbox=launch)
            await self._store.add_kernel(KernelRow(
                id=kid, user=user.name, notebook=None, pid=kernel.pid,
                cgroup=cgroup.relpath if cgroup else None, connection_file=manager.connection_file,
                started_at=kernel.started_at,
            ))
            client = manager.client()
            assert isinstance(client, KernelpoolClient)
            client.max_message_bytes = self._settings.max_saved_execution_chars
            client.start_channels()
            kernel.client = client
            await client.wait_for_ready(timeout=self._settings.kernel_start_timeout)
        except Exception as exc:
            cause = kernel.explain_death() if kernel.pid else str(exc)
            await self._stop(kernel)
            raise KernelFailed("(new kernel)", f"could not start: {cause or type(exc).__name__}") from exc
        kernel.transition(KernelState.IDLE)
        log.info("kernel %s started for %s (pid %s)", kid, user.name, kernel.pid)
        return kernel

    def _kernel_env(self, user: User, folder: str, runtime: str) -> dict[str, str]:
        # built from nothing: none of the server's own variables (tokens, paths, config) reach a kernel
        python_bin = os.path.dirname(self._spec_manager.python)
        account = user.identity.name if user.identity else os.environ.get("USER", "kernelpool")
        own = packages.kernel_env(self._spec_manager.python, folder) if self._settings.user_packages else {}
        first = own.pop("PATH", None)
        return {
            **own,
            "PATH": ":".join(p for p in (first, python_bin, "/usr/local/bin:/usr/bin:/bin") if p),
            "HOME": folder,
            "USER": account,
            "LOGNAME": account,
            "LANG": "C.UTF-8",
            "TMPDIR": runtime,
            "JUPYTER_RUNTIME_DIR": runtime,
            "IPYTHONDIR": os.path.join(folder, ".ipython"),
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }

    async def _stop(self, kernel: Kernel, now: bool = False) -> None:
        """Shut one kernel down: shutdown request, then SIGKILL to its group, then its cgroup."""
        with contextlib.suppress(RuntimeError):
            kernel.transition(KernelState.STOPPING)
        if kernel.client is not None:
            kernel.client.stop_channels()
        try:
            if kernel.manager.has_kernel:
                await kernel.manager.shutdown_kernel(now=now)
            else:
                await kernel.manager.cleanup_resources()
        except Exception as exc:
            log.warning("kernel %s: shutdown: %s", kernel.id, exc)
        if kernel.cgroup is not None:
            try:
                kernel.cgroup.remove()
            except Exception as exc:
                log.warning("kernel %s: removing cgroup: %s", kernel.id, exc)
        if kernel.rundir is not None:
            try:
                kernel.rundir.remove()  # done by the provisioner's cleanup, unless it never ran
            except Exception as exc:
                log.warning("kernel %s: removing its runtime folder: %s", kernel.id, exc)
        self._release(kernel)  # the process is gone (or beyond our reach): its slot is free again
        if kernel.network_of is not None:
            # after the cgroup is gone: nothing of the user's is left in the namespace
            identity, kernel.network_of = kernel.network_of, None
            await self.networks.leave(identity)
        await self._store.remove_kernel(kernel.id)

    async def _discard(self, kernel: Kernel) -> None:
        kernel.explain_death()
        if kernel.notebook is not None and self._kernels.get((kernel.user, kernel.notebook)) is kernel:
            del self._kernels[(kernel.user, kernel.notebook)]
        await self._stop(kernel, now=True)

    async def shutdown(self, user: str, notebook: str) -> bool:
        kernel = self._kernels.pop((user, notebook), None)
        if kernel is None:
            return False
        await self._stop(kernel)
        return True

    async def restart(self, user: User, notebook: str) -> Kernel:
        await self.shutdown(user.name, notebook)
        return await self.acquire(user, notebook)

    async def interrupt(self, kernel: Kernel) -> None:
        await kernel.manager.interrupt_kernel()

    async def mark_dead(self, kernel: Kernel) -> str:
        cause = kernel.explain_death()
        with contextlib.suppress(RuntimeError):
            kernel.transition(KernelState.DEAD)
        return cause

    async def cull_idle(self) -> int:
        """Shut down kernels idle longer than kernel_idle_timeout; returns how many."""
        timeout = self._settings.kernel_idle_timeout
        if timeout <= 0:
            return 0
        now = time.monotonic()
        culled = 0
        for (user, notebook), kernel in list(self._kernels.items()):
            if kernel.state is KernelState.IDLE and not kernel.lock.locked() and now - kernel.last_used > timeout:
                log.info("culling idle kernel %s of %s (%s)", kernel.id, user, notebook)
                await self.shutdown(user, notebook)
                culled += 1
        # warm kernels follow activity: a user who has not opened a kernel for as long goes without
        for user, pool in list(self._pools.items()):
            if pool and now - self._last_acquire.get(user, 0.0) > timeout:
                while pool:
                    kernel = pool.popleft()
                    log.info("retiring warm kernel %s of inactive user %s", kernel.id, user)
                    await self._stop(kernel)
                    culled += 1
        return culled

    async def reap_leftovers(self) -> int:
        """At start-up: kill what a server that died without cleaning up left behind."""
        import psutil

        reaped = 0
        for row in await self._store.list_kernels():
            if row.pid:
                with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                    proc = psutil.Process(row.pid)
                    cmdline = " ".join(proc.cmdline())  # a forked kernel shows its zygote's
                    if ("ipykernel" in cmdline or "kernelpool.kernels.zygote.child" in cmdline) and abs(proc.create_time() - row.started_at) < 120:
                        os.killpg(row.pid, 9)
            if row.cgroup and self._cgroups is not None:
                cg = self._cgroups.get(row.cgroup)
                if cg is not None:
                    with contextlib.suppress(Exception):
                        cg.remove()
            if row.connection_file:
                # its folder of root's; files of older versions in a user's own folder are left
                # alone (the root server does not touch paths a user can change)
                try:
                    remove_kernel_folder(str(self._settings.run_dir), row.connection_file)
                except Exception as exc:
                    log.warning("kernel %s: removing its runtime folder: %s", row.id, exc)
            await self._store.remove_kernel(row.id)
            reaped += 1
        # kernel folders that no row names (a crash between creating one and recording it)
        for user_run in _user_run_folders(str(self._settings.run_dir)):
            for name in os.listdir(user_run):
                if name != TMP:
                    with contextlib.suppress(Exception):
                        remove_tree(user_run, name)
                        reaped += 1
        if self._cgroups is not None:
            # no kernel of ours runs yet, so everything below our prefix is left over: cgroups no
            # row names (a crash between creating one and recording it), and whatever layout an
            # older version used (other names, other depths). Processes in them are killed.
            root = self._cgroups.get("")
            if root is not None:
                stale = [d for top in root.directories() for d, _, _ in os.walk(top) if d != top]
                try:
                    root.remove()
                    reaped += len(stale)
                except Exception as exc:
                    log.warning("removing leftover cgroups: %s", exc)
        return reaped

    def usage(self) -> dict[str, tuple[int | None, float | None]]:
        """Per user: memory in bytes and CPU seconds of all its kernels (from its cgroup, else the processes)."""
        import psutil

        users = {k.user for k in self.all()} | {k.user for k in self.pooled()}
        out: dict[str, tuple[int | None, float | None]] = {}
        for user in users:
            name = self._user_cgroups.get(user)
            cg = self._cgroups.get(name) if self._cgroups is not None and name is not None else None
            if cg is not None:
                out[user] = (cg.memory_current(), cg.cpu_usage_seconds())
                continue
            memory, cpu = 0, 0.0
            for kernel in self.of_user(user) + self.pooled(user):
                with contextlib.suppress(psutil.Error, TypeError, ValueError):
                    proc = psutil.Process(kernel.pid)
                    memory += proc.memory_info().rss
                    times = proc.cpu_times()
                    cpu += times.user + times.system
            out[user] = (memory, cpu)
        return out

    async def close(self) -> None:
        self._closed = True
        for task in list(self._refills):
            task.cancel()
        await asyncio.gather(*self._refills, return_exceptions=True)
        kernels = list(self._kernels.values()) + self.pooled()
        self._kernels.clear()
        self._pools.clear()
        await asyncio.gather(*(self._stop(k) for k in kernels), return_exceptions=True)
        if self._cgroups is not None:
            # the users' cgroups and our prefix folder: a stopped server leaves nothing in the tree
            root = self._cgroups.get("")
            if root is not None:
                try:
                    root.remove()
                except Exception as exc:
                    log.warning("removing cgroups: %s", exc)
