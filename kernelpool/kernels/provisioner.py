"""The launch seam: a `jupyter_client` kernel provisioner that starts kernels through `sandbox`.

With a fork server (`KernelLaunch.fork_server`), the kernel is forked from it (the same
`sandbox.enter` runs in the child); without one, or while it is unavailable, `sandbox.spawn`
starts it the stock way.

`kernels.launch.KernelLauncher` passes a `KernelLaunch` as `start_kernel(sandbox=...)`;
jupyter_client hands the keyword on to `pre_launch`, where we take it. Everything the sandbox
does (uid, cgroup, network namespace, private views, seccomp, umask, scrubbed environment)
happens in `sandbox.spawn`; this class only translates between jupyter_client's expectations
and it. It removes nothing of the kernel's: its cgroup and runtime folder go in
`KernelLauncher.stop`, once the kernel is shut down.

The connection file and the ipc sockets live in the kernel's `sandbox.rundir.KernelRunDir`,
owned by root: jupyter_client writes the file while the folder is root's alone (`pre_launch`),
the kernel may create its sockets only until they are all there, and jupyter_client connects
to them (first in `_connect_control_socket`, right after `launch_kernel` returns) only after
the folder is locked and each socket checked to be the kernel's. Same for both start paths.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

from kernelpool.kernels.launch import KernelLaunch
from kernelpool.kernels.zygote.server import ZygoteUnavailable
from sandbox import LaunchSpec, spawn

log = logging.getLogger(__name__)


class SandboxProvisioner(LocalProvisioner):
    """Starts a kernel with `sandbox.spawn`, or forks it from the fork server."""

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
        if launch is None:
            raise RuntimeError("no launch given: KernelLauncher passes one to start_kernel(sandbox=...)")
        spec = LaunchSpec(
            argv=cmd,
            env=launch.env,
            cwd=launch.cwd,
            identity=launch.identity,
            cgroup=launch.cgroup,
            network=launch.network,
            private_views=launch.private_views,
            tmpfs_bytes=launch.tmpfs_bytes,
            replaced_files=launch.replaced_files,
            keep_paths=launch.keep_paths,
            hide_mounts_below=launch.hide_mounts_below,
            seccomp=launch.seccomp,
            netns=launch.netns,
        )
        self.process = None
        launch.rundir.open_for_binding()
        try:
            if launch.fork_server is not None:
                try:
                    self.process = await launch.fork_server.spawn(spec)  # type: ignore[assignment]  # Popen-shaped
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
        return [f"{prefix}-{info[port]}" for port in
                ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]
