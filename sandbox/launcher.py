"""Start a command as a user's uid, in a cgroup, with no_new_privs and in a network namespace.

`spawn` is what kernelpool's kernel provisioner calls; `enter` is the part that runs in the
forked child before exec, kept separate so that a future fork server can reuse it. CPython
applies Popen's own `user`/`group` arguments *before* `preexec_fn`, after which the child could
no longer join a cgroup or create a network namespace: so every step happens in `enter`, in
the order that needs the least privilege last.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
from dataclasses import dataclass
from typing import Literal, Protocol

from sandbox import _libc
from sandbox.cgroups import Cgroup
from sandbox.errors import LaunchError
from sandbox.identity import Identity

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sh22x"  # struct ifreq: name, then ifr_flags in a 24-byte union


@dataclass
class LaunchSpec:
    """Everything `spawn` needs to start one sandboxed process. Built by kernelpool per kernel."""

    argv: list[str]
    env: dict[str, str]  # used as-is: the caller has scrubbed it
    cwd: str
    identity: Identity | None = None  # None = run as the server's own user (insecure dev mode)
    cgroup: Cgroup | None = None
    network: Literal["host", "none"] = "host"  # "none" = own network namespace, loopback only
    # a namespace to join (the user's, from `sandbox.network`): its nsfs path; overrides `network`
    netns: str | None = None
    umask: int = 0o077
    stdout: int | None = None  # fd, or None for /dev/null; stderr likewise
    stderr: int | None = None


class _SpecLike(Protocol):
    @property
    def cwd(self) -> str: ...
    @property
    def identity(self) -> Identity | None: ...
    @property
    def cgroup(self) -> Cgroup | None: ...
    @property
    def network(self) -> str: ...
    @property
    def netns(self) -> str | None: ...
    @property
    def umask(self) -> int: ...


def enter(spec: _SpecLike, errfd: int | None = None) -> None:
    """Sandbox the calling process; runs in the child between fork and exec.

    Order: join cgroup, network namespace (join `spec.netns`, or a new one with loopback up),
    drop supplementary groups,
    gid, uid (and check it cannot be regained), no_new_privs, umask, chdir. Raises on the
    first failure, after writing "step\\0message" to `errfd` if given: the caller must then
    not exec (Popen's preexec_fn does exactly that). No logging, no locks.
    """
    step = "start"
    try:
        if spec.cgroup is not None:
            step = "join cgroup"
            for path in spec.cgroup.procs_files():
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, b"0")  # "0" = the writing process itself
                finally:
                    os.close(fd)
        step = "network namespace"
        _enter_network(spec)
        identity = spec.identity
        if identity is not None:
            step = "setgroups"
            os.setgroups([])
            step = "setgid"
            os.setgid(identity.gid)
            step = "setuid"
            os.setuid(identity.uid)
            step = "verify uid"
            _verify_dropped(identity)
        step = "no_new_privs"
        _libc.set_no_new_privs()
        step = "umask"
        os.umask(spec.umask)
        step = "chdir"
        os.chdir(spec.cwd)
    except BaseException as exc:
        if errfd is not None:
            try:
                os.write(errfd, f"{step}\0{_describe(exc)}".encode("utf-8", "replace")[:4000])
            except OSError:
                pass
        raise


def _enter_network(spec: _SpecLike) -> None:
    # needs CAP_SYS_ADMIN (setns/unshare) and, for a new namespace, CAP_NET_ADMIN: before the uid drop.
    # Join by path before any mount namespace change, which could hide the path.
    if spec.netns is not None:
        fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _libc.setns(fd, _libc.CLONE_NEWNET)
        finally:
            os.close(fd)
    elif spec.network == "none":
        _libc.unshare(_libc.CLONE_NEWNET)
        _loopback_up()
    elif spec.network != "host":
        raise ValueError(f"unknown network mode {spec.network!r}")


def _loopback_up() -> None:
    # a fresh network namespace has "lo" DOWN: without it even 127.0.0.1 fails, and the
    # kernel's own ZMQ over ipc is fine but anything the user runs on localhost would not be
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        got = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0))
        flags = struct.unpack(_IFREQ, got)[1]
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


def _verify_dropped(identity: Identity) -> None:
    if os.getresuid() != (identity.uid,) * 3 or os.getresgid() != (identity.gid,) * 3 or os.getgroups():
        raise PermissionError(f"ids after drop are uid={os.getresuid()} gid={os.getresgid()} groups={os.getgroups()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PermissionError("root could be regained after dropping privileges")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename!r}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def spawn(spec: LaunchSpec) -> subprocess.Popen[bytes]:
    """Start `spec.argv` sandboxed as described by `spec`; returns the Popen.

    The child leads a new session (its pid is its process group id), has stdin on /dev/null
    and inherits no descriptors but stdout/stderr. Raises LaunchError (with `.step`) if
    sandboxing failed in the child, in which case the command was never executed; OSError
    (e.g. FileNotFoundError) if exec itself failed.
    """
    if not spec.argv:
        raise LaunchError("empty argv", step="spec")
    if not os.path.isabs(spec.cwd):
        raise LaunchError(f"cwd must be absolute, got {spec.cwd!r}", step="spec", path=spec.cwd)
    if spec.network not in ("host", "none"):
        raise LaunchError(f"unknown network mode {spec.network!r}", step="spec")
    if spec.netns is not None and not os.path.isabs(spec.netns):
        raise LaunchError(f"netns must be an absolute path, got {spec.netns!r}", step="spec", path=spec.netns)
    # the child reports what failed through this pipe; Popen itself only says
    # "Exception occurred in preexec_fn"
    read_end, write_end = os.pipe()
    try:
        try:
            return subprocess.Popen(
                spec.argv,
                env=spec.env,
                cwd=None,
                start_new_session=True,
                close_fds=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if spec.stdout is None else spec.stdout,
                stderr=subprocess.DEVNULL if spec.stderr is None else spec.stderr,
                preexec_fn=lambda: enter(spec, write_end),
            )
        except subprocess.SubprocessError as exc:
            os.close(write_end)
            write_end = -1
            step, message = _read_report(read_end)
            raise LaunchError(
                f"could not sandbox {spec.argv[0]!r} ({step or 'preexec'}): {message or exc}; the command was not run",
                step=step or None,
                path=spec.cwd if step == "chdir" else None,
            ) from exc
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)


def _read_report(fd: int) -> tuple[str, str]:
    # the child has exited by now, but another thread's fork may still hold the write end:
    # never block on it
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    except BlockingIOError:
        pass
    step, _, message = data.decode("utf-8", "replace").partition("\0")
    return step, message
