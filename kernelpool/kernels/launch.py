"""Assembling a kernel launch: its runtime folder, cgroups, environment, `AsyncKernelManager`
and the `KernelLaunch` the provisioner (`kernels.provisioner`) starts it from; and taking
apart what was assembled once the kernel stops. Called by `kernels.registry.KernelRegistry`,
which admits kernels against the limits and records them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import zmq
import zmq.asyncio
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from kernelpool.config import Settings
from kernelpool.kernels import packages
from kernelpool.kernels.channels import KernelChannels
from kernelpool.kernels.client import KernelpoolClient
from kernelpool.kernels.environment import kernel_env
from kernelpool.kernels.kernel import Kernel
from kernelpool.kernels.networks import UserNetworkPolicy
from kernelpool.kernels.zygote.server import ForkServer, ZygoteProcess
from kernelpool.metrics import Metrics
from kernelpool.users.accounts import User, UserService
from sandbox import Cgroup, CgroupBackend, Identity, SafeRoot
from sandbox.passwd import kernel_files
from sandbox.rundir import KernelRunDir

log = logging.getLogger(__name__)

PROVISIONER_NAME = "kernelpool-sandbox"  # `provisioner.SandboxProvisioner`'s entry point (pyproject.toml)
KERNEL_NAME = "kernelpool-python3"
_MAX_ZMQ_SOCKETS = 65536  # about 3 a kernel (shell, IOPub, control); max_kernels is far below


@dataclass
class KernelLaunch:
    """What the sandbox needs to start one kernel (passed as `start_kernel(sandbox=...)`)."""

    env: dict[str, str]
    cwd: str
    identity: Identity | None
    cgroup: Cgroup | None
    rundir: KernelRunDir  # created; holds the connection file (`connection_file`) and sockets (`ip`)
    network: Literal["host", "none"] = "host"
    private_views: bool = False  # own mount, IPC and cgroup namespaces: private /tmp, /dev/shm, /proc, /sys, cgroupfs
    tmpfs_bytes: int = 512 << 20
    replaced_files: dict[str, str] = field(default_factory=dict)  # /etc/passwd and /etc/group with its own user only
    keep_paths: tuple[str, ...] = ()  # folders the kernel needs besides its cwd (kept visible under a private /tmp)
    hide_mounts_below: tuple[str, ...] = ()  # where other users' mounts (volumes) are detached in its namespace
    seccomp: bool = False
    start_timeout: float = 60.0  # seconds the kernel may take to create its sockets
    netns: str | None = None  # the user's network namespace to join (nsfs path), when there is one
    fork_server: ForkServer | None = None  # to fork the kernel from; None: `sandbox.spawn` starts it


class KernelpoolSpecManager(KernelSpecManager):
    """Serves the one kernel spec kernelpool uses, built from settings rather than found on disk."""

    def __init__(self, python: str, extensions: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.python = python
        self.extensions = list(extensions)  # IPython extensions every kernel loads (kernelpool.kernels.pip_extension)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name != KERNEL_NAME:
            return super().get_kernel_spec(kernel_name)
        return KernelSpec(
            name=KERNEL_NAME,
            display_name="Python 3 (kernelpool)",
            language="python",
            interrupt_mode="signal",
            argv=[
                self.python, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                # one history database per user would be shared by all its kernels and lock up
                "--HistoryManager.hist_file=:memory:",
                *(f"--IPKernelApp.extensions={name}" for name in self.extensions),
            ],
            metadata={"kernel_provisioner": {"provisioner_name": PROVISIONER_NAME}},
        )


def user_cgroup_name(user: User) -> str:
    """The folder of a user's cgroup: "u<uid>" (cgroup folders are world-readable on the host)."""
    if user.identity is not None:
        return f"u{user.identity.uid}"
    # without a uid of its own (cgroups but no uid switching): a name derived from nothing secret
    # would still name the user, so a random one, kept by the launcher for as long as it runs
    return f"s{secrets.token_hex(8)}"


class KernelLauncher:
    """Builds, starts and takes apart kernels; one per registry."""

    def __init__(self, settings: Settings, users: UserService, cgroups: CgroupBackend | None,
                 networks: UserNetworkPolicy, fork_server: ForkServer | None, metrics: Metrics) -> None:
        self._settings = settings
        self._users = users
        self.python = settings.kernel_python or sys.executable
        extensions = [packages.EXTENSION] if settings.user_packages else []
        self._spec_manager = KernelpoolSpecManager(python=self.python, extensions=extensions)
        self._cgroups = cgroups
        self._user_cgroups: dict[str, tuple[int, str]] = {}  # user name -> (its uid, the name of its cgroup)
        self._networks = networks
        self._fork_server = fork_server
        self._metrics = metrics
        # One ZMQ context for every kernel's manager and client. jupyter_client makes one per
        # manager and one per client otherwise, each with an I/O thread and a reaper thread:
        # 4 threads a kernel, 1,800 at 300 sessions. Its default cap of 1,024 sockets (set before
        # its first socket, when it allocates its slots) would stop it near 300 kernels.
        self.zmq_context = zmq.asyncio.Context()
        self.zmq_context.set(zmq.MAX_SOCKETS, _MAX_ZMQ_SOCKETS)

    def close(self) -> None:
        """After every kernel stopped: the shared ZMQ context goes (its sockets are closed)."""
        self.zmq_context.destroy(linger=0)

    def user_cgroup(self, user: str) -> Cgroup | None:
        """The cgroup of all the user's kernels, once one has started."""
        known = self._user_cgroups.get(user)
        return self._cgroups.get(known[1]) if self._cgroups is not None and known is not None else None

    async def forget(self, user: str, uid: int | None) -> None:
        """The user was removed (`KernelRegistry.forget_removed`, after its kernels stopped; `uid`
        is the uid the name has now, if it was added again): the cgroup of the removed one goes,
        if `users remove` has not taken it already."""
        known = self._user_cgroups.get(user)
        if known is None or known[0] == uid:
            return
        cgroup = self.user_cgroup(user)
        del self._user_cgroups[user]
        if cgroup is not None:
            try:
                await asyncio.to_thread(cgroup.remove)
            except Exception as exc:
                log.warning("removing the cgroup of removed user %s: %s", user, exc)

    async def prepare(self, user: User, kid: str) -> Kernel:
        """A kernel not started yet: its runtime folder, cgroups and manager (nothing is left of
        them when this raises)."""
        ident = user.identity
        # the connection file and sockets: in a folder of root's (see sandbox.rundir)
        rundir = KernelRunDir(str(self._settings.run_dir), user.uid, kid,
                              ident.uid if ident else None, ident.gid if ident else None)
        rundir.create()
        try:
            if self._settings.user_packages:
                uid, gid = (ident.uid, ident.gid) if ident else (None, None)
                root = SafeRoot(self._users.folder(user.name), uid, gid)
                await asyncio.to_thread(packages.ensure_folders, self.python, root)
            cgroup = self._create_cgroup(user)
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
            context=self.zmq_context,
        )
        manager.shutdown_wait_time = 2.0
        return Kernel(id=kid, user=user.name, manager=manager, cgroup=cgroup, uid=user.uid,
                      memory_limit=user.kernel_limits.memory_bytes, rundir=rundir, limits=user.kernel_limits)

    def _create_cgroup(self, user: User) -> Cgroup | None:
        if self._cgroups is None:
            return None
        # world-readable names: the uid and a random id, never the user's name or the kernel's id
        # (a kernel id known in advance names its connection file)
        known = self._user_cgroups.get(user.name)
        if known is None or known[0] != user.uid:  # new, or the name was removed and added again
            known = self._user_cgroups[user.name] = (user.uid, user_cgroup_name(user))
        user_cgroup = known[1]
        self._cgroups.create(user_cgroup, user.user_limits)
        return self._cgroups.create(f"{user_cgroup}/k{secrets.token_hex(8)}", user.kernel_limits)

    async def start(self, kernel: Kernel, user: User) -> None:
        """Start the kernel's process, in the user's network namespace (counted there from now on)."""
        netns = await self._networks.join(user.identity)
        kernel.network_of = user.identity if netns is not None else None
        await kernel.manager.start_kernel(sandbox=self._launch(kernel, user, netns))
        forked = isinstance(getattr(kernel.manager.provisioner, "process", None), ZygoteProcess)
        self._metrics.kernel_starts.labels("fork_server" if forked else "stock").inc()

    def _launch(self, kernel: Kernel, user: User, netns: str | None) -> KernelLaunch:
        rundir = kernel.rundir
        assert rundir is not None
        folder = self._users.folder(user.name)
        runtime = self._users.runtime_folder(user.uid)
        account = user.identity.name if user.identity else os.environ.get("USER", "kernelpool")
        fork_server = self._fork_server
        return KernelLaunch(
            env=kernel_env(self.python, account, folder, runtime, self._settings.user_packages),
            cwd=folder,
            identity=user.identity,
            cgroup=kernel.cgroup,
            rundir=rundir,
            network="host",  # or the user's namespace, joined by path (netns)
            # with a uid of its own, a kernel gets its own views and the syscall filter too
            private_views=user.identity is not None,
            tmpfs_bytes=self._settings.tmpfs_bytes,
            # its own account only: the host's /etc/passwd lists every user, with their folders
            replaced_files=kernel_files(user.identity) if user.identity is not None else {},
            # the interpreter's environment (sys.prefix) may lie below /tmp too, as in a test venv
            keep_paths=(runtime, os.path.dirname(rundir.connection_file), os.path.dirname(os.path.dirname(self.python))),
            # other users' volumes (Docker: one per user at DATA/users/NAME): not even their names
            hide_mounts_below=(str(self._settings.users_dir), str(self._settings.run_dir)),
            seccomp=user.identity is not None,
            start_timeout=self._settings.kernel_start_timeout,
            netns=netns,
            # not started (off, or it failed to) or closed: the stock start, without a warning each time
            fork_server=fork_server if fork_server is not None and fork_server.available else None,
        )

    async def open_channels(self, kernel: Kernel) -> None:
        """Open the started kernel's channels and wait until it answers."""
        client = kernel.manager.client(context=self.zmq_context)
        assert isinstance(client, KernelpoolClient)
        client.start_channels()
        kernel.client = client
        await client.wait_for_ready(timeout=self._settings.kernel_start_timeout)
        # from now on every message is read by these, and handed to the request it answers
        kernel.channels = KernelChannels(client.session, client.iopub_channel.socket, client.shell_channel.socket,
                                         max_bytes=self._settings.max_saved_execution_chars)

    async def stop(self, kernel: Kernel, now: bool = False) -> None:
        """Shut the process down (shutdown request, then SIGKILL to its group), then remove its
        cgroup and runtime folder: the only place either is removed."""
        if kernel.channels is not None:
            await kernel.channels.close()
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
                # off the event loop: what the kernel left running is frozen and killed first,
                # which may wait (a freeze, a task that takes its time to exit)
                await asyncio.to_thread(kernel.cgroup.remove)
            except Exception as exc:
                log.warning("kernel %s: removing cgroup: %s", kernel.id, exc)
        if kernel.rundir is not None:
            try:
                kernel.rundir.remove()
            except Exception as exc:
                log.warning("kernel %s: removing its runtime folder: %s", kernel.id, exc)
