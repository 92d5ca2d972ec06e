"""The server's end of the zygote's control socket, and the kernels forked through it.

- `Connection`: one running zygote (started by `zygote.server.ForkServer`): its process, its
  control socket, the forks it was asked for and the children it reported;
- `ZygoteProcess`: what `ForkServer.spawn` returns for a forked kernel, enough of
  `subprocess.Popen` (pid, poll, wait, send_signal, terminate, kill, returncode) for
  jupyter_client's LocalProvisioner logic.

Kernels are the zygote's children, so only it can reap them: it reports each exit status over
the control socket (messages: `zygote.child`). Each kernel also comes with a pidfd (sent by the
zygote before the child can have been reaped), so signals never hit a recycled pid, and a kernel
whose zygote died first (it lives on, reparented) is still watched: it is alive until its pidfd
says it exited, after which its exit status is unknown (`exit_unknown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sandbox import LaunchError

_MSG_MAX = 65536
_FDS = socket.CMSG_SPACE(4)
# an exit status the zygote could not report (it died first): -SIGKILL-like codes would lie
EXIT_UNKNOWN = 255


def _readable(fd: int, timeout: float) -> bool:
    """Whether `fd` is readable within `timeout` seconds. poll(), not select(): a server with
    hundreds of kernels has descriptors above select()'s limit of 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    events = poller.poll(timeout * 1000)
    if any(ev & select.POLLNVAL for _, ev in events):
        raise OSError(9, "bad file descriptor")
    return bool(events)


class ZygoteUnavailable(Exception):
    """The fork server is not running (or died during a request); start the kernel another way."""


class ZygoteProcess:
    """A kernel forked by the zygote, shaped like the `subprocess.Popen` jupyter_client expects."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int, pidfd: int, conn: Connection) -> None:
        self.pid = pid
        self.args: list[str] = []
        self.returncode: int | None = None
        self.exit_unknown = False
        self._pidfd: int | None = pidfd
        self._fd_lock = threading.Lock()
        self._conn = conn

    def __repr__(self) -> str:
        return f"<ZygoteProcess pid={self.pid} returncode={self.returncode}>"

    def _exited(self, returncode: int, *, unknown: bool = False) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self.exit_unknown = unknown
        with self._fd_lock:
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None

    def _has_ended(self) -> bool:
        fd = self._pidfd
        if fd is None or self.returncode is not None:
            return True
        try:
            return _readable(fd, 0)
        except OSError:  # closed by `_exited` in another thread: the exit has been reported
            return True

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if not self._has_ended():
            return None
        # the zygote reaps it and reports its status within moments, unless the zygote is gone
        self._conn.pump(timeout=0.2, until=lambda: self.returncode is not None)
        if self.returncode is None and (self._conn.eof or not self._conn.alive):
            self._exited(EXIT_UNKNOWN, unknown=True)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            fd = self._pidfd
            if fd is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(OSError):  # closed by `_exited` meanwhile: poll() sees it
                    _readable(fd, 0.05 if left is None else min(left, 0.05))
            if deadline is not None and time.monotonic() >= deadline and self.poll() is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        # under the lock: a pidfd closed and its number reused meanwhile would name another process
        with self._fd_lock:
            if self.returncode is None and self._pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass(eq=False)
class Connection:
    """One running zygote: its process, control socket, pending forks and live children."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    pid: int = 0
    loop: asyncio.AbstractEventLoop | None = None  # the event loop that owns this connection
    alive: bool = True
    eof: bool = False
    pending: dict[int, asyncio.Future[tuple[int, int]]] = field(default_factory=dict)
    children: dict[int, ZygoteProcess] = field(default_factory=dict)
    early_exits: dict[int, int] = field(default_factory=dict)
    on_lost: Callable[[Connection], None] | None = None

    def pump(self, *, timeout: float = 0.0, until: Callable[[], bool] | None = None) -> None:
        """Read and handle what the zygote sent; used by the event loop's reader and by `poll`."""
        deadline = time.monotonic() + timeout
        while self.alive and not self.eof:
            left = deadline - time.monotonic()
            if not _readable(self.sock.fileno(), max(0.0, left)):
                return
            self._read_one()
            if until is not None and until():
                return

    def _read_one(self) -> None:
        try:
            data, ancdata, _, _ = self.sock.recvmsg(_MSG_MAX, _FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        fds = [int.from_bytes(d[:4], sys.byteorder) for level, kind, d in ancdata
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS]
        if not data:
            for fd in fds:
                os.close(fd)
            self.eof = True  # the zygote is gone: it will report nothing more
            if _running_loop() is self.loop:
                self.lost()
            return
        msg = json.loads(data)
        op = msg.get("op")
        if op == "forked" and fds:
            fut = self.pending.pop(int(msg["id"]), None)
            if fut is not None and not fut.done():
                fut.set_result((int(msg["pid"]), fds[0]))
            else:
                os.close(fds[0])
        elif op == "failed":
            fut = self.pending.pop(int(msg["id"]), None)
            if fut is not None and not fut.done():
                fut.set_exception(LaunchError(f"fork server: {msg.get('error')}", step="fork"))
        elif op == "exited":
            pid, code = int(msg["pid"]), int(msg["returncode"])
            child = self.children.pop(pid, None)
            if child is not None:
                child._exited(code)
            else:
                self.early_exits[pid] = code
        elif op == "ready":
            self.pid = int(msg["pid"])
        for fd in fds if op not in ("forked",) else fds[1:]:
            os.close(fd)

    def lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ZygoteUnavailable("the fork server died during the request"))
        self.pending.clear()
        # its children live on, reparented: from now on their pidfds tell when they end
        if self.on_lost is not None:
            self.on_lost(self)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
