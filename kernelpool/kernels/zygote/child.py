"""The fork server's own process: `python -m kernelpool.kernels.zygote.child --fd N` (started by `kernelpool.kernels.zygote.server`).

It imports what a kernel needs (ipykernel, IPython, the debugger, ...), freezes those objects
out of the garbage collector so that forked kernels keep sharing their pages, and then only
forks. It never runs user code and never even reads a kernel's launch spec: the server sends,
with each fork request, one end of a fresh socket pair over which the *child* receives its spec
and reports whether sandboxing worked. So no user's environment, paths or names ever sit in
the zygote's memory, where a later user's child would inherit them.

Control channel (an inherited SOCK_SEQPACKET socket pair end; nothing on disk, so nobody but the
server can reach it), JSON messages:

    server -> zygote   {"op": "fork", "id": N}  + SCM_RIGHTS [spec socket]
    zygote -> server   {"op": "ready", "pid": P}                         once, after preloading
                       {"op": "forked", "id": N, "pid": P} + SCM_RIGHTS [pidfd of the child]
                       {"op": "failed", "id": N, "error": "..."}          fork itself failed
                       {"op": "exited", "pid": P, "returncode": R}        a child was reaped

Spec socket, server <-> child: the server writes one spec (`sandbox.LaunchSpec.to_json`, read
back with `LaunchSpec.from_json`); the child answers b"ok" once `sandbox.enter` succeeded, or
b"step\\0message" (then exits 127) if it did not.

The child: closes every inherited descriptor but its spec socket, resets signal handling,
calls `sandbox.enter` (cgroup, network namespace, IPC namespace, private /tmp, /dev/shm, /proc,
/sys, cgroup and account views, uid/gid, no_new_privs, umask, chdir, seccomp filter) before it
has created any socket, thread or event loop, starts a new session, points stdio at /dev/null,
replaces the environment with exactly the spec's, re-seeds what forked state would share, and
runs ipykernel's launcher code. When the server's end of the control socket closes (the server
died or stopped), the zygote kills its remaining children's process groups and exits.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import site
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.launcher import LaunchSpec

# Modules a kernel imports while it starts (measured: `sys.modules` of a started kernel); the
# ones that read the environment at import time are listed in `kernels.environment.scrubbed_env`. Not
# matplotlib: it reads MPLBACKEND at import.
PRELOAD = (
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.iostream",
    "ipykernel.heartbeat",
    "ipykernel.parentpoller",
    "ipykernel.debugger",
    "ipykernel.comm",
    "ipykernel.eventloops",
    "ipykernel.subshell_manager",
    "ipykernel.shellchannel",
    "ipykernel.control",
    "ipykernel.displayhook",
    "ipykernel.compiler",
    "ipykernel.jsonutil",
    "IPython",
    "IPython.core.interactiveshell",
    "IPython.core.completer",
    "IPython.core.magics",
    "IPython.core.history",
    "IPython.core.formatters",
    "IPython.display",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "IPython.core.logger",
    "IPython.core.oinspect",
    "IPython.extensions.storemagic",
    "IPython.utils.wildcard",
    "pdb",
    "faulthandler",
    "runpy",
    "jupyter_client.session",
    "jupyter_client.connect",
    "zmq",
    "zmq.asyncio",
    "tornado.ioloop",
    "tornado.queues",
    "tornado.platform.asyncio",
    "comm",
    "jedi",
    "pygments",
    "pygments.lexers.python",
    "pygments.formatters.terminal256",
    "psutil",
    "uuid",
    "random",
    "tempfile",
    "sqlite3",
    "multiprocessing",
    "ipykernel_launcher",
    "kernelpool.kernels.pip_extension",  # the IPython extension every kernel loads (per-user pip)
)

_MSG_MAX = 65536
_FDS = socket.CMSG_SPACE(4)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional module missing only costs start-up time
            print(f"kernelpool zygote: not preloaded {name}: {exc}", file=sys.stderr, flush=True)


def _kernel_sys_path(stock: list[str]) -> None:
    # A kernel's path is what a stock `python -m ipykernel_launcher` from the same interpreter
    # has (the server read it off the interpreter: `zygote.server._zygote_env`), not ours: ours began
    # with the zygote's working folder and, from a source checkout, the PYTHONPATH that found
    # this module. IPython's init_path adds '' in the kernel, as in a stock one.
    sys.path[:] = stock


def _send(sock: socket.socket, msg: dict[str, Any], fd: int | None = None) -> None:
    data = json.dumps(msg).encode()
    if fd is None:
        sock.sendmsg([data])
    else:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])


def _set_pdeathsig(sig: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG


class _Zygote:
    def __init__(self, control: socket.socket, import_env: dict[str, str], filter_program: bytes | None) -> None:
        self.control = control
        self.import_env = import_env
        self.filter_program = filter_program  # the seccomp filter, built once; None if libseccomp is unusable
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping = False

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        sel = selectors.DefaultSelector()
        sel.register(self.control, selectors.EVENT_READ)
        sel.register(self.wake_r, selectors.EVENT_READ)
        _send(self.control, {"op": "ready", "pid": os.getpid()})
        while not self.stopping:
            for key, _ in sel.select():
                if key.fd == self.wake_r:
                    self._drain_wakeup()
                elif not self._on_control():
                    self.stopping = True
            self._reap()
        self._kill_children()

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _on_control(self) -> bool:
        try:
            data, ancdata, _, _ = self.control.recvmsg(_MSG_MAX, _FDS)
        except InterruptedError:
            return True
        fds = [int.from_bytes(d[:4], sys.byteorder) for level, kind, d in ancdata
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS]
        if not data:
            return False  # the server is gone
        msg = json.loads(data)
        if msg.get("op") == "fork" and len(fds) == 1:
            self._fork(int(msg["id"]), fds[0])
        else:
            for fd in fds:
                os.close(fd)
        return True

    def _fork(self, req: int, spec_fd: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(spec_fd)
            _send(self.control, {"op": "failed", "id": req, "error": f"fork: {exc.strerror}"})
            return
        if pid == 0:
            _child(spec_fd, self.import_env, self.filter_program)  # never returns
        os.close(spec_fd)
        self.children.add(pid)
        # not reaped before this (reaping happens only in the main loop): the pid is still ours
        pidfd = os.pidfd_open(pid)
        try:
            _send(self.control, {"op": "forked", "id": req, "pid": pid}, pidfd)
        finally:
            os.close(pidfd)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            with contextlib.suppress(OSError):
                _send(self.control, {"op": "exited", "pid": pid, "returncode": os.waitstatus_to_exitcode(status)})

    def _kill_children(self) -> None:
        # the server is gone: its kernels would be unreachable, so they go too (each leads its
        # own process group: that takes what they started as well)
        for pid in list(self.children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _child(spec_fd: int, import_env: dict[str, str], filter_program: bytes | None) -> None:
    """The forked kernel: sandbox first, then become a fresh ipykernel. Never returns."""
    code = 127
    reported = False
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        # nothing of the zygote's stays open: the control socket, the wakeup pipe, ...
        os.closerange(3, spec_fd)
        os.closerange(spec_fd + 1, 1 << 20)
        os.set_blocking(spec_fd, True)
        raw = os.read(spec_fd, 1 << 20)
        if not raw:
            os._exit(127)
        from sandbox import _libc
        from sandbox.launcher import LaunchSpec, enter

        spec = LaunchSpec.from_json(raw)
        try:
            enter(spec, spec_fd, filter_program)
        except BaseException:
            os._exit(127)  # enter wrote "step\0message" to spec_fd
        # as exec would: changing uid made the process undumpable, which hides it from its own
        # subprocesses in a hidepid /proc and roots its /proc/PID files. Safe here, not in the stock
        # start: the zygote's memory holds nothing of the server's or of another user's.
        _libc.set_dumpable(dumpable=True)
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        _fresh_state(spec, import_env)
        os.write(spec_fd, b"ok")
        reported = True
        os.close(spec_fd)
        code = _run_kernel(spec)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        if not reported:
            with contextlib.suppress(OSError):
                os.write(spec_fd, f"start\0{type(exc).__name__}: {exc}".encode()[:4000])
    finally:
        os._exit(code)


def _fresh_state(spec: LaunchSpec, import_env: dict[str, str]) -> None:
    """Whatever the zygote computed at start-up from its own process, recomputed for this kernel."""
    import random
    import tempfile

    os.environ.clear()
    os.environ.update(spec.env)
    for key, value in import_env.items():
        os.environ.setdefault(key, value)
    # PYTHONPATH as Python's start-up applies it: made absolute, ahead of the standard library
    # and site-packages (where `python -m ipykernel_launcher` has it once it drops its cwd entry)
    extra = [os.path.abspath(p) for p in spec.env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for i, p in enumerate(extra) if p not in sys.path and p not in extra[:i]]
    random.seed()  # CPython also re-seeds at fork; explicit, and covers a `random` imported later
    tempfile.tempdir = None  # cached from the zygote's TMPDIR
    if getattr(site, "ENABLE_USER_SITE", False):
        # user site-packages follow HOME, which the zygote did not share with this user
        site.USER_BASE = None
        site.USER_SITE = None
        site.addusersitepackages(set(sys.path))
    # the preloaded objects stay frozen: the collector never writes to their pages, so they stay shared


def _run_kernel(spec: LaunchSpec) -> int:
    # what `python -m ipykernel_launcher ARGS` does after its sys.path fix-up (the server checked
    # that argv is `PYTHON -m ipykernel_launcher ARGS`)
    import ipykernel_launcher
    from ipykernel import kernelapp

    kernel_args = spec.argv[3:]
    sys.argv = [ipykernel_launcher.__file__, *kernel_args]
    kernelapp.launch_new_instance(argv=kernel_args)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4 or args[0] != "--fd" or args[2] != "--kernel-path":
        print("usage: python -m kernelpool.kernels.zygote.child --fd N --kernel-path JSON", file=sys.stderr)
        raise SystemExit(2)
    control = socket.socket(fileno=int(args[1]))
    os.set_inheritable(control.fileno(), False)  # noqa: FBT003 (os takes no keyword here)
    _set_pdeathsig(signal.SIGTERM)
    stock_path = json.loads(args[3])
    os.environ.pop("PYTHONPATH", None)  # found this module; a kernel's own PYTHONPATH comes with its spec
    before = dict(os.environ)
    _preload()
    # what imports put into the environment (debugpy: PYDEVD_USE_FRAME_EVAL=NO), a stock
    # kernel has too; each child gets it back after its environment is replaced
    import_env = {k: v for k, v in os.environ.items() if before.get(k) != v}
    import sandbox.launcher  # noqa: F401  (the child needs it before it may import anything else)
    from sandbox import seccomp

    try:
        filter_program: bytes | None = seccomp.program()
    except OSError as exc:  # a child asked for the filter then fails to start and says why
        print(f"kernelpool zygote: no seccomp filter: {exc}", file=sys.stderr, flush=True)
        filter_program = None

    _kernel_sys_path(stock_path)
    gc.collect()
    gc.freeze()
    _Zygote(control, import_env, filter_program).run()


if __name__ == "__main__":
    main()
