"""The launch seam: a `jupyter_client` kernel provisioner that starts kernels through `sandbox`.

With a fork server (`KernelLaunch.extra["zygote"]`), the kernel is forked from it (the same
`sandbox.enter` runs in the child); without one, or while it is unavailable, `sandbox.spawn`
starts it the stock way.

`KernelRegistry` passes a `KernelLaunch` as `start_kernel(sandbox=...)`; jupyter_client hands
the keyword on to `pre_launch`, where we take it. Everything the sandbox does (uid, cgroup,
network namespace, umask, scrubbed environment) happens in `sandbox.spawn`; this class only
translates between jupyter_client's expectations and it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.provisioning import LocalProvisioner

from kernelpool.zygote import ForkServer, ZygoteUnavailable
from sandbox import Cgroup, Identity, LaunchSpec, spawn

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
    network: str = "host"
    netns: str | None = None  # the user's network namespace to join (nsfs path), when there is one
    extra: dict[str, Any] = field(default_factory=dict)  # "zygote": a ForkServer to fork the kernel from


class SandboxProvisioner(LocalProvisioner):  # type: ignore[misc]
    """Starts a kernel with `sandbox.spawn`; removes its cgroup when the kernel is cleaned up."""

    _launch: KernelLaunch | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        launch = kwargs.pop("sandbox", None)
        if not isinstance(launch, KernelLaunch):
            raise RuntimeError("kernelpool-sandbox kernels must be started by kernelpool (no sandbox given)")
        self._launch = launch
        kwargs = await super().pre_launch(**kwargs)
        # jupyter_client wrote the connection file as us; the kernel reads it as the user
        if launch.identity is not None and self.parent is not None:
            os.chown(self.parent.connection_file, launch.identity.uid, launch.identity.gid)
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
            netns=launch.netns,
        )
        self.process = None
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
        return self.connection_info

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart and self._launch is not None and self._launch.cgroup is not None:
            self._launch.cgroup.remove()


class KernelpoolSpecManager(KernelSpecManager):
    """Serves the one kernel spec kernelpool uses, built from settings rather than found on disk."""

    python: str = ""

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
            ],
            metadata={"kernel_provisioner": {"provisioner_name": PROVISIONER_NAME}},
        )
