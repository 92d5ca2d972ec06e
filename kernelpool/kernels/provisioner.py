"""The launch seam: a `jupyter_client` kernel provisioner that starts kernels through `sandbox`.

With a fork server (`KernelLaunch.extra["zygote"]`), the kernel is forked from it (the same
`sandbox.enter` runs in the child); without one, or while it is unavailable, `sandbox.spawn`
starts it the stock way.

`KernelRegistry` passes a `KernelLaunch` as `start_kernel(sandbox=...)`; jupyter_client hands
the keyword on to `pre_launch`, where we take it. Everything the sandbox does (uid, cgroup,
network namespace, private views, seccomp, umask, scrubbed environment) happens in `sandbox.spawn`; this class only
translates between jupyter_client's expectations and it.

The connection file and the ipc sockets live in the kernel's `sandbox.rundir.KernelRunDir`,
owned by root: jupyter_client writes the file while the folder is root's alone (`pre_launch`),
the kernel may create its sockets only until they are all there, and jupyter_client connects
to them (first in `_connect_control_socket`, right after `launch_kernel` returns) only after
the folder is locked and each socket checked to be the kernel's. Same for both start paths.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.provisioning import LocalProvisioner

from kernelpool.kernels.zygote.server import ForkServer, ZygoteUnavailable
from sandbox import Cgroup, Identity, LaunchSpec, spawn
from sandbox.rundir import KernelRunDir

log = logging.getLogger(__name__)

PROVISIONER_NAME = "kernelpool-sandbox"
KERNEL_NAME = "kernelpool-python3"


@dataclass
class KernelLaunch:
    """What the sandbox needs to start one kernel."""

    env: dict[str, str]
    cwd: str
    identity: Identity | None
    cgroup: Cgroup | None
    rundir: KernelRunDir  # created; holds the connection file (`connection_file`) and sockets (`ip`)
    network: str = "host"
    private_views: bool = False  # own mount and cgroup namespaces: private /tmp, /dev/shm, /proc, cgroupfs
    tmpfs_bytes: int = 512 << 20
    keep_paths: tuple[str, ...] = ()  # folders the kernel needs besides its cwd (kept visible under a private /tmp)
    hide_mounts_below: tuple[str, ...] = ()  # where other users' mounts (volumes) are detached in its namespace
    seccomp: bool = False
    start_timeout: float = 60.0  # seconds the kernel may take to create its sockets
    netns: str | None = None  # the user's network namespace to join (nsfs path), when there is one
    extra: dict[str, Any] = field(default_factory=dict)  # "zygote": a ForkServer to fork the kernel from


class SandboxProvisioner(LocalProvisioner):  # type: ignore[misc]
    """Starts a kernel with `sandbox.spawn`; removes its cgroup when the kernel is cleaned up."""

    _launch: KernelLaunch | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        launch = kwargs.pop("sandbox", None)
        if not isinstance(launch, KernelLaunch):
            raise RuntimeError("kernelpool-sandbox kernels must be started by kernelpool (no sandbox given)")
        km = self.parent
        rundir = launch.rundir
        if km is None or km.connection_file != rundir.connection_file or km.ip != rundir.socket_prefix:
            raise RuntimeError("kernelpool-sandbox kernels keep their connection file and sockets in their KernelRunDir")
        self._launch = launch
        # jupyter_client writes the connection file now, into a folder that is root's alone
        kwargs = await super().pre_launch(**kwargs)
        rundir.share()  # ...which the kernel may then read, but no tenant change
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        launch = self._launch
        assert launch is not None
        spec = LaunchSpec(
            argv=cmd,
            env=launch.env,
            cwd=launch.cwd,
            identity=launch.identity,
            cgroup=launch.cgroup,
            network=launch.network,  # type: ignore[arg-type]
            private_views=launch.private_views,
            tmpfs_bytes=launch.tmpfs_bytes,
            keep_paths=launch.keep_paths,
            hide_mounts_below=launch.hide_mounts_below,
            seccomp=launch.seccomp,
            netns=launch.netns,
        )
        self.process = None
        launch.rundir.open_for_binding()
        try:
            zygote = launch.extra.get("zygote")
            if isinstance(zygote, ForkServer):
                try:
                    self.process = await zygote.spawn(spec)  # type: ignore[assignment]  # Popen-shaped
                except ZygoteUnavailable as exc:
                    log.warning("starting a kernel without the fork server: %s", exc)
                    if launch.cgroup is not None:
                        # a child the zygote may have forked before it died must not share this kernel's files
                        launch.cgroup.kill_all()
            if self.process is None:
                self.process = spawn(spec)
            self.pid = self.process.pid
            self.pgid = self.process.pid  # spawn starts a new session: the kernel leads its process group
            self.cwd = launch.cwd
            process = self.process
            await launch.rundir.wait_for_sockets(
                self._socket_names(), alive=lambda: process.poll() is None, timeout=launch.start_timeout)
        finally:
            launch.rundir.lock()  # whatever happened: the kernel's group writes there no more
        if self.process.poll() is None:
            launch.rundir.check_sockets(self._socket_names())
        return self.connection_info

    def _socket_names(self) -> list[str]:
        info = self.connection_info
        prefix = os.path.basename(str(info["ip"]))
        return [f"{prefix}-{info[port]}" for port in  # type: ignore[literal-required]
                ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart and self._launch is not None:
            if self._launch.cgroup is not None:
                self._launch.cgroup.remove()
            self._launch.rundir.remove()


class KernelpoolSpecManager(KernelSpecManager):
    """Serves the one kernel spec kernelpool uses, built from settings rather than found on disk."""

    python: str = ""
    extensions: list[str] = []  # IPython extensions every kernel loads (kernelpool.kernels.pip_extension)

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
