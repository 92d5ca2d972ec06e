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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

from kernelpool.config import Settings
from kernelpool.kernels import packages
from kernelpool.kernels.channels import KernelChannels
from kernelpool.kernels.environment import kernel_env, other_kernel_env
from kernelpool.kernels.kernel import Kernel
from kernelpool.kernels.manager import KernelpoolManager
from kernelpool.kernels.messages import ChannelLimits, Misbehaviour, Pace
from kernelpool.kernels.networks import UserNetworkPolicy
from kernelpool.kernels.specs import KernelSpecs, Spec
from kernelpool.kernels.zygote.server import ForkServer, ZygoteProcess
from kernelpool.metrics import Metrics
from kernelpool.users.accounts import User, UserService
from sandbox import Cgroup, CgroupBackend, Identity, SafeRoot
from sandbox.passwd import kernel_files
from sandbox.rundir import KernelRunDir

log = logging.getLogger(__name__)

PROVISIONER_NAME = "kernelpool-sandbox"  # `provisioner.SandboxProvisioner`'s entry point (pyproject.toml)
KERNEL_NAME = "kernelpool-python3"


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
    """Serves the kernel specs kernelpool starts: its own Python's, built from settings, and the
    allowed ones read at start-up (`kernels.specs`), each with the sandbox provisioner whatever
    its kernel.json says. Nothing else: no spec found on disk later is ever started."""

    def __init__(self, python: str, extensions: Sequence[str] = (), specs: KernelSpecs | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.python = python
        self.extensions = list(extensions)  # IPython extensions every kernel loads (kernelpool.kernels.pip_extension)
        self.specs = specs or KernelSpecs(())

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name != KERNEL_NAME:
            spec = self.specs.get(kernel_name)
            return KernelSpec(name=spec.name, display_name=spec.display_name, language=spec.language,
                              interrupt_mode="signal", argv=list(spec.argv), env=dict(spec.env),
                              resource_dir=spec.resource_dir,
                              metadata={"kernel_provisioner": {"provisioner_name": PROVISIONER_NAME}})
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
                 networks: UserNetworkPolicy, fork_server: ForkServer | None, metrics: Metrics,
                 on_misbehaviour: Callable[[Kernel, Misbehaviour], None], specs: KernelSpecs | None = None) -> None:
        self._settings = settings
        self._users = users
        self.python = settings.kernel_python or sys.executable
        extensions = [packages.EXTENSION] if settings.user_packages else []
        self.specs = specs or KernelSpecs(())
        self._spec_manager = KernelpoolSpecManager(python=self.python, extensions=extensions, specs=self.specs)
        self._cgroups = cgroups
        self._user_cgroups: dict[str, tuple[int, str]] = {}  # user name -> (its uid, the name of its cgroup)
        self._networks = networks
        self._fork_server = fork_server
        self._metrics = metrics
        self._on_misbehaviour = on_misbehaviour
        # the server's side of every kernel's channels is kernels.channels (no ZMQ context, no
        # libzmq queue): these are the bounds it reads them within
        self.channel_limits = ChannelLimits(
            max_message=settings.kernel_max_message_bytes, max_parse=settings.max_saved_execution_chars,
            flood_bytes=settings.kernel_flood_bytes, flood_rate=float(settings.kernel_flood_rate))
        self._paces: dict[str, Pace] = {}  # user -> how fast unread traffic of their kernels is passed through

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

    async def prepare(self, user: User, kid: str, spec: Spec) -> Kernel:
        """A kernel of `spec` not started yet: its runtime folder, cgroups and manager (nothing is
        left of them when this raises)."""
        ident = user.identity
        # the connection file and sockets: in a folder of root's (see sandbox.rundir)
        rundir = KernelRunDir(str(self._settings.run_dir), user.uid, kid,
                              ident.uid if ident else None, ident.gid if ident else None)
        rundir.create()
        try:
            if self._settings.user_packages and spec.own:
                uid, gid = (ident.uid, ident.gid) if ident else (None, None)
                root = SafeRoot(self._users.folder(user.name), uid, gid)
                await asyncio.to_thread(packages.ensure_folders, self.python, root)
            cgroup = self._create_cgroup(user)
        except BaseException:
            rundir.remove()
            raise
        manager = KernelpoolManager(
            kernel_name=KERNEL_NAME if spec.own else spec.name,
            kernel_spec_manager=self._spec_manager,
            transport="ipc",
            ip=rundir.socket_prefix,
            connection_file=rundir.connection_file,
            kernel_id=kid,
        )
        manager.shutdown_wait_time = 2.0
        return Kernel(id=kid, user=user.name, manager=manager, cgroup=cgroup, uid=user.uid,
                      memory_limit=user.kernel_limits.memory_bytes, rundir=rundir, limits=user.kernel_limits,
                      spec=spec.name)

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
        if rundir is None:
            raise RuntimeError(f"kernel {kernel.id} has no run folder (`start` makes it first)")
        folder = self._users.folder(user.name)
        runtime = self._users.runtime_folder(user.uid)
        account = user.identity.name if user.identity else os.environ.get("USER", "kernelpool")
        spec = self.specs.get(kernel.spec)
        # only the server's own Python is forked from the fork server (which preloads ipykernel)
        fork_server = self._fork_server if spec.own else None
        program = self.python if spec.own else spec.argv[0]
        if spec.own:
            env = kernel_env(self.python, account, folder, runtime, user_packages=self._settings.user_packages)
        else:
            env = other_kernel_env(program, spec.env, account, folder, runtime)
        return KernelLaunch(
            env=env,
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
            keep_paths=(runtime, os.path.dirname(rundir.connection_file), os.path.dirname(os.path.dirname(program)),
                        *((spec.resource_dir,) if spec.resource_dir else ())),
            # other users' volumes (Docker: one per user at DATA/users/NAME): not even their names
            hide_mounts_below=(str(self._settings.users_dir), str(self._settings.run_dir)),
            seccomp=user.identity is not None,
            start_timeout=self._settings.kernel_start_timeout,
            netns=netns,
            # not started (off, or it failed to) or closed: the stock start, without a warning each time
            fork_server=fork_server if fork_server is not None and fork_server.available else None,
        )

    async def open_channels(self, kernel: Kernel) -> None:
        """Connect to the started kernel's shell, IOPub and control sockets and wait until it answers."""
        info = kernel.manager.get_connection_info()
        prefix = info["ip"]
        paths = {"shell": f"{prefix}-{info['shell_port']}", "iopub": f"{prefix}-{info['iopub_port']}",
                 "control": f"{prefix}-{info['control_port']}"}
        timeout = self._settings.kernel_start_timeout
        kernel.channels = await asyncio.wait_for(
            KernelChannels.open(kernel.manager.session, paths, self.channel_limits, self._pace(kernel.user), kernel.manager.is_alive,
                                lambda exc: self._on_misbehaviour(kernel, exc)), timeout)
        await kernel.channels.ready(timeout)

    def _pace(self, user: str) -> Pace:
        pace = self._paces.get(user)
        if pace is None:
            # four times the refill: a flood still drains the budget, at a small share of the CPU
            rate = max(4.0 * self._settings.kernel_flood_rate, 16.0 * 2**20)
            pace = self._paces[user] = Pace(rate)
        return pace

    async def stop(self, kernel: Kernel, *, now: bool = False) -> None:
        """Shut the process down (shutdown request, then SIGKILL to its group), then remove its
        cgroup and runtime folder: the only place either is removed."""
        if kernel.channels is not None:
            if not now and kernel.channels.failure is None:
                await kernel.channels.request_shutdown()
            await kernel.channels.close()
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
                # which may wait (a freeze, a task that takes its time to exit), and the event loop
                # serves every other user meanwhile (a kernel that misbehaves in a loop is stopped
                # and replaced again and again)
                await asyncio.to_thread(kernel.cgroup.remove)
            except Exception as exc:
                log.warning("kernel %s: removing cgroup: %s", kernel.id, exc)
        if kernel.rundir is not None:
            try:
                kernel.rundir.remove()
            except Exception as exc:
                log.warning("kernel %s: removing its runtime folder: %s", kernel.id, exc)
