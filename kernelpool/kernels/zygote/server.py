"""The fork server (zygote): kernels forked from a process that has already imported ipykernel.

A stock kernel start spends most of its time importing; a fork of a process that has done
that is ready in a fraction of the time and shares the imported code and objects with every
other kernel (copy-on-write, kept clean by `gc.freeze()`). The zygote itself is
`kernelpool.kernels.zygote.child`; this module is the server's side of it:

- `ForkServer` starts it (opened in the app's lifespan, closed after the kernel registry),
  restarts it when it dies, and forks kernels through it (`spawn`, called by the provisioner);
- `ZygoteProcess` is what `spawn` returns: enough of `subprocess.Popen` (pid, poll, wait,
  send_signal, terminate, kill, returncode) for jupyter_client's LocalProvisioner logic.

Kernels are the zygote's children, so only it can reap them: it reports each exit status over
the control socket. Each kernel also comes with a pidfd (sent by the zygote before the child
can have been reaped), so signals never hit a recycled pid, and a kernel whose zygote died
first (it lives on, reparented) is still watched: it is alive until its pidfd says it exited,
after which its exit status is unknown (`exit_unknown`).

The sandbox is the same `sandbox.enter` that `sandbox.spawn` runs before exec; the child runs
it right after fork, before any socket, thread or event loop exists in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import kernelpool
from sandbox import LaunchError, LaunchSpec

log = logging.getLogger(__name__)

_MSG_MAX = 65536
_FDS = socket.CMSG_SPACE(4)
_START_TIMEOUT = 60.0  # the zygote imports ipykernel & co. before it says ready
_SPAWN_TIMEOUT = 30.0
_RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0)
_RESTART_WAIT = 10.0  # a start waits this long for a restarting zygote, then starts without
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

    def __init__(self, pid: int, pidfd: int, conn: _Connection) -> None:
        self.pid = pid
        self.args: list[str] = []
        self.returncode: int | None = None
        self.exit_unknown = False
        self._pidfd: int | None = pidfd
        self._fd_lock = threading.Lock()
        self._conn = conn

    def __repr__(self) -> str:
        return f"<ZygoteProcess pid={self.pid} returncode={self.returncode}>"

    def _exited(self, returncode: int, unknown: bool = False) -> None:
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
        while self.poll() is None:
            fd = self._pidfd
            if fd is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(OSError):  # closed by `_exited` meanwhile: poll() sees it
                    _readable(fd, 0.05 if left is None else min(left, 0.05))
            if deadline is not None and time.monotonic() >= deadline and self.poll() is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

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
class _Connection:
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
    on_lost: Any = None

    def pump(self, timeout: float = 0.0, until: Any = None) -> None:
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


class ForkServer:
    """Starts, supervises and talks to the zygote. One per server, opened in the app's lifespan."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.restarts = 0
        self._conn: _Connection | None = None
        self._next_id = 0
        self._closed = False
        self._starting: asyncio.Task[_Connection] | None = None

    @property
    def pid(self) -> int | None:
        return self._conn.pid if self._conn is not None and self._conn.alive else None

    @property
    def available(self) -> bool:
        return not self._closed and (self._conn is not None and self._conn.alive or self._starting is not None)

    async def start(self) -> None:
        """Start the zygote and wait until it has preloaded; raises if it cannot start."""
        self._conn = await self._launch()

    async def _ensure(self, wait: float) -> _Connection:
        if self._closed:
            raise ZygoteUnavailable("the fork server is closed")
        if self._conn is not None and self._conn.alive:
            return self._conn
        if self._starting is None:
            raise ZygoteUnavailable("the fork server is not running")
        try:
            return await asyncio.wait_for(asyncio.shield(self._starting), wait)
        except (TimeoutError, Exception) as exc:
            raise ZygoteUnavailable(f"the fork server is restarting: {exc!r}") from exc

    async def _launch(self) -> _Connection:
        env, kernel_path = await asyncio.to_thread(_zygote_env, self.python)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "kernelpool.kernels.zygote.child", "--fd", str(theirs.fileno()), "--kernel-path", kernel_path],
                env=env, cwd="/", pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None, start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        conn = _Connection(proc=proc, sock=ours, loop=loop, on_lost=self._on_lost)
        ready: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            conn.pump()
            if not ready.done():
                if conn.pid:
                    ready.set_result(None)
                elif not conn.alive:
                    ready.set_exception(ZygoteUnavailable(f"the fork server exited at start-up ({proc.poll()})"))

        loop.add_reader(ours.fileno(), on_readable)
        try:
            await asyncio.wait_for(ready, _START_TIMEOUT)
        except BaseException:
            conn.on_lost = None
            conn.lost()
            await asyncio.to_thread(_stop_proc, proc)
            raise
        log.info("fork server ready (pid %s)", conn.pid)
        return conn

    def _on_lost(self, conn: _Connection) -> None:
        if conn is not self._conn or self._closed:
            return
        log.warning("fork server (pid %s) is gone (exit %s); %d kernel(s) it started live on",
                    conn.pid, conn.proc.poll(), len(conn.children))
        self._starting = asyncio.get_running_loop().create_task(self._restart(conn))

    async def _restart(self, old: _Connection) -> _Connection:
        """Supervisor: start a new zygote, backing off while it keeps failing."""
        await asyncio.to_thread(_stop_proc, old.proc)
        attempt = 0
        while True:
            await asyncio.sleep(_RESTART_BACKOFF[min(attempt, len(_RESTART_BACKOFF) - 1)])
            try:
                conn = await self._launch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                log.error("fork server restart failed (attempt %d): %s", attempt, exc)
                continue
            self._conn = conn
            self._starting = None
            self.restarts += 1
            return conn

    async def spawn(self, spec: LaunchSpec) -> ZygoteProcess:
        """Fork a kernel for `spec`; raises ZygoteUnavailable (use `sandbox.spawn` instead),
        LaunchError (sandboxing failed in the child: the kernel never ran)."""
        argv = spec.argv
        if len(argv) < 3 or argv[0] != self.python or argv[1:3] != ["-m", "ipykernel_launcher"]:
            raise ZygoteUnavailable(f"not a kernel the fork server can start: {argv[:3]}")
        if spec.stdout is not None or spec.stderr is not None:
            raise ZygoteUnavailable("the fork server gives kernels no stdout/stderr")
        conn = await self._ensure(wait=_RESTART_WAIT)
        payload = json.dumps({
            "kernel_args": argv[3:],
            "env": spec.env,
            "cwd": spec.cwd,
            "identity": None if spec.identity is None else {
                "name": spec.identity.name, "uid": spec.identity.uid,
                "gid": spec.identity.gid, "home": spec.identity.home,
            },
            "cgroup_procs": None if spec.cgroup is None else spec.cgroup.procs_files(),
            "network": spec.network,
            "netns": spec.netns,
            "umask": spec.umask,
            "private_views": spec.private_views,
            "tmpfs_bytes": spec.tmpfs_bytes,
            "keep_paths": list(spec.keep_paths),
            "hide_mounts_below": list(spec.hide_mounts_below),
            "seccomp": spec.seccomp,
        }).encode()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        loop = asyncio.get_running_loop()
        with ours:
            try:
                ours.sendall(payload)  # waits in the socket for the child
                self._next_id += 1
                req = self._next_id
                fut: asyncio.Future[tuple[int, int]] = loop.create_future()
                conn.pending[req] = fut
                try:
                    conn.sock.sendmsg([json.dumps({"op": "fork", "id": req}).encode()],
                                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, theirs.fileno().to_bytes(4, sys.byteorder))])
                except OSError as exc:
                    conn.pending.pop(req, None)
                    raise ZygoteUnavailable(f"fork server unreachable: {exc}") from exc
            finally:
                theirs.close()
            pid, pidfd = await asyncio.wait_for(fut, _SPAWN_TIMEOUT)
            child = ZygoteProcess(pid, pidfd, conn)
            child.args = list(argv)
            if pid in conn.early_exits:
                child._exited(conn.early_exits.pop(pid))
            else:
                conn.children[pid] = child
            # the child says "ok" once sandboxed, or what failed; EOF = it died first
            ours.setblocking(False)
            report = await asyncio.wait_for(loop.sock_recv(ours, 4096), _SPAWN_TIMEOUT)
        if report != b"ok":
            step, _, message = report.decode("utf-8", "replace").partition("\0")
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(child.wait, 5)
            raise LaunchError(
                f"could not sandbox the kernel ({step or 'start'}): {message or 'the child died'}; the kernel was not run",
                step=step or None, path=spec.cwd if step == "chdir" else None,
            )
        return child

    async def close(self) -> None:
        """Stop the zygote (after the registry has stopped its kernels)."""
        self._closed = True
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        conn = self._conn
        if conn is not None:
            conn.on_lost = None
            conn.lost()
            await asyncio.to_thread(_stop_proc, conn.proc)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _stop_proc(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


_PATH_PROBE = """
import importlib.util, json, os, sys
def origin(name):
    try:
        spec = importlib.util.find_spec(name)
    except Exception:
        return None
    return os.path.realpath(spec.origin) if spec is not None and spec.origin else None
print(json.dumps({"path": sys.path[1:], "kernelpool": origin("kernelpool"), "sandbox": origin("sandbox")}))
"""


def _base_env(python: str) -> dict[str, str]:
    # built from nothing, like a kernel's: no server variable (tokens, config) is in the zygote,
    # so none can be in the memory its children inherit. What is here is read at import time
    # by what the zygote preloads, so it must already be what a kernel's environment says.
    return {
        "PATH": f"{os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/nonexistent",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


def _zygote_env(python: str) -> tuple[dict[str, str], str]:
    """The zygote's environment, and the `sys.path` its kernels must have (JSON).

    A stock kernel is `python -m ipykernel_launcher` with an environment built from nothing:
    its `sys.path` is the interpreter's own (stdlib, the venv's site-packages with its .pth
    files), whatever the server's working folder or PYTHONPATH. That path is read off the
    interpreter here, started the same way, and the zygote takes it as its kernels' path once it
    has imported what it preloads. PYTHONPATH is set only when the interpreter would not find
    this very `kernelpool` by itself (a source checkout): it serves the zygote's own imports and
    never reaches a kernel.
    """
    env = _base_env(python)
    ours = os.path.dirname(os.path.realpath(kernelpool.__file__))
    probe = subprocess.run([python, "-c", _PATH_PROBE], env=env, cwd="/", capture_output=True,
                           text=True, timeout=60, check=False)
    if probe.returncode != 0:
        raise ZygoteUnavailable(f"{python} cannot run: {probe.stderr.strip()[-500:]}")
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    # both packages from where the server has them, or the zygote would run another version
    ours_sandbox = os.path.join(os.path.dirname(ours), "sandbox", "__init__.py")
    if found["kernelpool"] != os.path.join(ours, "__init__.py") or found["sandbox"] != ours_sandbox:
        env["PYTHONPATH"] = os.path.dirname(ours)
    return env, json.dumps(found["path"])
