"""The kernel manager kernelpool uses: jupyter_client's, without a socket of its own to the kernel.

jupyter_client's manager connects a ZMQ socket to the kernel's control channel when the kernel
starts, and sends its shutdown and interrupt requests there. Nothing ever reads that socket, so
libzmq would queue whatever the kernel sends on it, without a bound on a message's bytes (see
`kernels.wire`). Here the manager opens no socket: the server's only connections to a kernel
are `kernels.channels.KernelChannels`, which sends the shutdown request
(`KernelLauncher.stop`), and interrupts are signals (the kernel spec's interrupt mode).
Created by `kernels.launch.KernelLauncher.prepare`.
"""

from __future__ import annotations

from jupyter_client.manager import AsyncKernelManager, _ShutdownStatus


class KernelpoolManager(AsyncKernelManager):
    def _connect_control_socket(self) -> None:
        """No socket: `KernelChannels` is the server's one connection to the control channel."""

    async def _async_request_shutdown(self, restart: bool = False) -> None:  # noqa: FBT001, FBT002 (jupyter_client's signature, which it overrides)
        # the request itself went through KernelChannels.request_shutdown; the provisioner is told
        if self.provisioner is None:
            raise RuntimeError("no provisioner: the kernel was not started")
        await self.provisioner.shutdown_requested(restart=restart)
        self._shutdown_status = _ShutdownStatus.ShutdownRequest

    request_shutdown = _async_request_shutdown

    async def interrupt_kernel(self) -> None:  # type: ignore[override]
        """SIGINT (the message mode would need the control socket this manager does not open)."""
        if self.kernel_spec is not None and self.kernel_spec.interrupt_mode != "signal":
            raise RuntimeError("kernelpool interrupts kernels with a signal only")
        await super().interrupt_kernel()
