"""The fork server (zygote): kernels forked from a process that has already imported ipykernel.

A stock kernel start spends most of its time importing; a fork of a process that has done
that is ready in a fraction of the time and shares the imported code and objects with every
other kernel (copy-on-write, kept clean by `gc.freeze()`). The zygote itself is
`kernelpool.kernels.zygote.child`; this module is the server's side of it:

- `ForkServer` starts it (opened in the app's lifespan, closed after the kernel registry),
  restarts it when it dies, and forks kernels through it (`spawn`, called by the provisioner);
- `ZygoteProcess` (`zygote.process`) is what `spawn` returns, a `subprocess.Popen` look-alike.

A kernel's spec goes to the child that runs it as `sandbox.LaunchSpec.to_json`, never through
the zygote (see `zygote.child`).

The sandbox is the same `sandbox.enter` that `sandbox.spawn` runs before exec; the child runs
it right after fork, before any socket, thread or event loop exists in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys

import kernelpool
from kernelpool.kernels.environment import fork_server_env
from kernelpool.kernels.zygote.process import Connection, ZygoteProcess, ZygoteUnavailable
from sandbox import LaunchError, LaunchSpec

__all__ = ["ForkServer", "ZygoteProcess", "ZygoteUnavailable"]

log = logging.getLogger(__name__)

_START_TIMEOUT = 60.0  # the zygote imports ipykernel & co. before it says ready
_SPAWN_TIMEOUT = 30.0
_RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0)
_RESTART_WAIT = 10.0  # a start waits this long for a restarting zygote, then starts without


class ForkServer:
    """Starts, supervises and talks to the zygote. One per server, opened in the app's lifespan."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.restarts = 0
        self._conn: Connection | None = None
        self._next_id = 0
        self._closed = False
        self._starting: asyncio.Task[Connection] | None = None

    @property
    def pid(self) -> int | None:
        return self._conn.pid if self._conn is not None and self._conn.alive else None

    @property
    def available(self) -> bool:
        return not self._closed and (self._conn is not None and self._conn.alive or self._starting is not None)

    async def start(self) -> None:
        """Start the zygote and wait until it has preloaded; raises if it cannot start."""
        self._conn = await self._launch()

    async def _ensure(self, wait: float) -> Connection:
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

    async def _launch(self) -> Connection:
        env, kernel_path = await asyncio.to_thread(_zygote_env, self.python)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(  # noqa: S603 (the configured kernel interpreter running our module)
                [self.python, "-m", "kernelpool.kernels.zygote.child", "--fd", str(theirs.fileno()), "--kernel-path", kernel_path],
                env=env, cwd="/", pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None, start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)  # noqa: FBT003 (the socket module takes no keyword)
        loop = asyncio.get_running_loop()
        conn = Connection(proc=proc, sock=ours, loop=loop, on_lost=self._on_lost)
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

    def _on_lost(self, conn: Connection) -> None:
        if conn is not self._conn or self._closed:
            return
        log.warning("fork server (pid %s) is gone (exit %s); %d kernel(s) it started live on",
                    conn.pid, conn.proc.poll(), len(conn.children))
        self._starting = asyncio.get_running_loop().create_task(self._restart(conn))

    async def _restart(self, old: Connection) -> Connection:
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
        payload = spec.to_json().encode()
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
            ours.setblocking(False)  # noqa: FBT003 (the socket module takes no keyword)
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
    env = fork_server_env(python)
    ours = os.path.dirname(os.path.realpath(kernelpool.__file__))
    probe = subprocess.run([python, "-c", _PATH_PROBE],  # noqa: S603 (the kernel interpreter, our program)
                           env=env, cwd="/", capture_output=True,
                           text=True, timeout=60, check=False)
    if probe.returncode != 0:
        raise ZygoteUnavailable(f"{python} cannot run: {probe.stderr.strip()[-500:]}")
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    # both packages from where the server has them, or the zygote would run another version
    ours_sandbox = os.path.join(os.path.dirname(ours), "sandbox", "__init__.py")
    if found["kernelpool"] != os.path.join(ours, "__init__.py") or found["sandbox"] != ours_sandbox:
        env["PYTHONPATH"] = os.path.dirname(ours)
    return env, json.dumps(found["path"])
