"""Start a command as a user's uid, in a cgroup, with no_new_privs, in a network namespace (the
user's own, or a new one with only loopback), an IPC namespace and private views of the shared
trees (/tmp, /dev/shm, /proc, /sys, cgroups, /etc/passwd, ...) of its own, and a seccomp filter.

`spawn` is what kernelpool's kernel provisioner calls; `enter` is the part that runs in the
forked child before exec, shared with the fork server (kernelpool.kernels.zygote.child). CPython
applies Popen's own `user`/`group` arguments *before* `preexec_fn`, after which the child could
no longer join a cgroup or create a network namespace: so every step happens in `enter`, in
the order that needs the least privilege last.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

from sandbox import _libc, seccomp, views
from sandbox.errors import LaunchError
from sandbox.identity import Identity

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sh22x"  # struct ifreq: name, then ifr_flags in a 24-byte union


class JoinableCgroup(Protocol):
    """What `enter` needs of a cgroup: the files to write the process into (a `Cgroup` has them)."""

    def procs_files(self) -> list[str]: ...


@dataclass(frozen=True)
class CgroupProcs:
    """A cgroup known only by its procs files: what crosses to another process in `LaunchSpec.to_json`."""

    paths: tuple[str, ...]

    def procs_files(self) -> list[str]:
        return list(self.paths)


@dataclass
class LaunchSpec:
    """Everything `spawn` needs to start one sandboxed process. Built by kernelpool per kernel."""

    argv: list[str]
    env: dict[str, str]  # used as-is: the caller has scrubbed it
    cwd: str
    identity: Identity | None = None  # None = run as the server's own user (insecure dev mode)
    cgroup: JoinableCgroup | None = None  # a `sandbox.Cgroup`
    network: Literal["host", "none"] = "host"  # "none" = own network namespace, loopback only
    # a namespace to join (the user's, from `sandbox.network`): its nsfs path; overrides `network`
    netns: str | None = None
    umask: int = 0o077
    # own mount, IPC and cgroup namespaces: private /tmp, /dev/shm, /proc, /sys, cgroupfs, ... (sandbox.views)
    private_views: bool = False
    tmpfs_bytes: int = 512 << 20  # size cap of each of the private /tmp and /dev/shm, and of SysV shared memory
    # with private_views: host files the process sees with this text instead (`sandbox.passwd.kernel_files`)
    replaced_files: dict[str, str] = field(default_factory=dict)
    keep_paths: tuple[str, ...] = ()  # folders besides cwd that stay visible if below /tmp (runtime, interpreter)
    hide_mounts_below: tuple[str, ...] = ()  # folders whose mounts, but cwd's and keep_paths', are detached
    seccomp: bool = False  # load `sandbox.seccomp`'s filter last
    stdout: int | None = None  # fd, or None for /dev/null; stderr likewise
    stderr: int | None = None

    def to_json(self) -> str:
        """The spec for a process that starts it elsewhere (kernelpool's fork server, whose child
        reads it back with `from_json`). The cgroup travels as its procs files; stdout and stderr,
        descriptors of this process, cannot travel: a spec with either is refused (ValueError)."""
        if self.stdout is not None or self.stderr is not None:
            raise ValueError("a LaunchSpec with stdout or stderr cannot be sent to another process")
        return json.dumps({
            "argv": self.argv,
            "env": self.env,
            "cwd": self.cwd,
            "identity": None if self.identity is None else asdict(self.identity),
            "cgroup_procs": None if self.cgroup is None else self.cgroup.procs_files(),
            "network": self.network,
            "netns": self.netns,
            "umask": self.umask,
            "private_views": self.private_views,
            "tmpfs_bytes": self.tmpfs_bytes,
            "replaced_files": self.replaced_files,
            "keep_paths": list(self.keep_paths),
            "hide_mounts_below": list(self.hide_mounts_below),
            "seccomp": self.seccomp,
        })

    @classmethod
    def from_json(cls, text: str | bytes) -> LaunchSpec:
        """The spec `to_json` wrote (its cgroup a `CgroupProcs`)."""
        raw = json.loads(text)
        procs = raw["cgroup_procs"]
        return cls(
            argv=[str(a) for a in raw["argv"]],
            env={str(k): str(v) for k, v in raw["env"].items()},
            cwd=str(raw["cwd"]),
            identity=None if raw["identity"] is None else Identity(**raw["identity"]),
            cgroup=None if procs is None else CgroupProcs(tuple(procs)),
            network=raw["network"],
            netns=raw["netns"],
            umask=int(raw["umask"]),
            private_views=bool(raw["private_views"]),
            tmpfs_bytes=int(raw["tmpfs_bytes"]),
            replaced_files={str(k): str(v) for k, v in raw["replaced_files"].items()},
            keep_paths=tuple(raw["keep_paths"]),
            hide_mounts_below=tuple(raw["hide_mounts_below"]),
            seccomp=bool(raw["seccomp"]),
        )


class _Steps:
    """The name of the step running, for the report if it fails."""

    name = "start"


def enter(spec: LaunchSpec, errfd: int | None = None, filter_program: bytes | None = None) -> None:
    """Sandbox the calling process; runs in the child between fork and exec.

    Order: join cgroup; network namespace (join `spec.netns`, or a new one with
    loopback up); private views (mount and IPC namespaces, other users' mounts detached, /tmp,
    account files, /dev/shm, mqueue, /dev/pts, /proc, shm limits, /sys, cgroup namespace,
    cgroupfs, hidden folders); drop supplementary groups, gid, uid
    (and check root cannot be regained); no_new_privs; umask; chdir; seccomp filter (last: it
    forbids mount and unshare, and needs no_new_privs). `filter_program` is
    `sandbox.seccomp.program()`, built by the caller before it forked. Raises on the first
    failure, after writing "step\\0message" to `errfd` if given: the caller must then not exec
    (Popen's preexec_fn does exactly that). No logging, no locks.
    """
    step = _Steps()
    try:
        _join_cgroup(spec, step)
        _network(spec, step)
        _private_views(spec, step)
        _drop_privileges(spec, step)
        step.name = "no_new_privs"
        _libc.set_no_new_privs()
        step.name = "umask"
        os.umask(spec.umask)
        step.name = "chdir"
        os.chdir(spec.cwd)
        _seccomp(spec, step, filter_program)
    except BaseException as exc:
        if errfd is not None:
            with contextlib.suppress(OSError):
                os.write(errfd, f"{step.name}\0{_describe(exc)}".encode("utf-8", "replace")[:4000])
        raise


def _join_cgroup(spec: LaunchSpec, step: _Steps) -> None:
    if spec.cgroup is None:
        return
    step.name = "join cgroup"
    for path in spec.cgroup.procs_files():
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")  # "0" = the writing process itself
        finally:
            os.close(fd)


def _network(spec: LaunchSpec, step: _Steps) -> None:
    # needs CAP_SYS_ADMIN (setns/unshare) and, for a new namespace, CAP_NET_ADMIN: before the uid
    # drop. Joined by path before any mount namespace change, which could hide the path.
    if spec.netns is not None:
        step.name = "network namespace"
        fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _libc.setns(fd, _libc.CLONE_NEWNET)
        finally:
            os.close(fd)
    elif spec.network == "none":
        step.name = "network namespace"
        _libc.unshare(_libc.CLONE_NEWNET)
        step.name = "loopback up"
        _loopback_up()
    elif spec.network != "host":
        raise ValueError(f"unknown network mode {spec.network!r}")


def _private_views(spec: LaunchSpec, step: _Steps) -> None:
    # after joining the cgroup (the cgroup namespace is rooted where the process is) and the network
    # namespace (the fresh sysfs shows the links of the caller's), before dropping root (mounting
    # needs CAP_SYS_ADMIN); see sandbox.views for what each step hides
    if not spec.private_views:
        return
    step.name = "mount namespace"
    views.enter_mount_namespace()
    step.name = "ipc namespace"
    views.enter_ipc_namespace()
    mountinfo = views.read_mountinfo()  # the host's table as this namespace got it: read once
    if spec.hide_mounts_below:
        # before /tmp is replaced: a data folder under /tmp keeps its volumes reachable until then
        step.name = "hide other mounts"
        views.hide_mounts(spec.hide_mounts_below, keep=(spec.cwd, *spec.keep_paths), mountinfo=mountinfo)
    step.name = "private /tmp"
    views.private_tmpfs("/tmp", spec.tmpfs_bytes, keep=(spec.cwd, *spec.keep_paths))  # noqa: S108 (the kernel's own, new)
    step.name = "account files"  # its scratch tmpfs sits on /dev/shm until the private one covers it
    views.replace_files(spec.replaced_files, views.MASKED_FILES, mountinfo)
    step.name = "private /dev/shm"
    views.private_tmpfs("/dev/shm", spec.tmpfs_bytes)  # noqa: S108 (the kernel's own, new)
    step.name = "private /dev/mqueue"
    views.private_mqueue(mountinfo)
    step.name = "private /dev/pts"
    views.private_devpts()
    step.name = "private /proc"
    views.private_proc()
    step.name = "shm limits"
    views.limit_shm(spec.tmpfs_bytes)
    step.name = "private /sys"
    views.private_sysfs()
    step.name = "cgroup namespace"
    views.enter_cgroup_namespace()
    step.name = "private cgroupfs"
    views.private_cgroupfs(spec.cgroup.procs_files() if spec.cgroup is not None else [], mountinfo=mountinfo)
    step.name = "hide folders"
    netns_dir = (os.path.dirname(spec.netns),) if spec.netns is not None else ()
    views.hide_dirs((*views.HIDDEN_DIRS, *netns_dir), mountinfo)


def _drop_privileges(spec: LaunchSpec, step: _Steps) -> None:
    identity = spec.identity
    if identity is None:
        return
    step.name = "setgroups"
    os.setgroups([])
    step.name = "setgid"
    os.setgid(identity.gid)
    step.name = "setuid"
    os.setuid(identity.uid)
    step.name = "verify uid"
    _verify_dropped(identity)


def _seccomp(spec: LaunchSpec, step: _Steps, filter_program: bytes | None) -> None:
    if not spec.seccomp:
        return
    step.name = "seccomp"
    if filter_program is None:
        raise ValueError("seccomp asked for, but no filter program was built before the fork")
    _libc.load_seccomp_filter(filter_program)


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
    try:
        # built here, in the parent: the child runs no libseccomp code between fork and exec
        filter_program = seccomp.program() if spec.seccomp else None
    except OSError as exc:
        raise LaunchError(f"cannot build the seccomp filter: {exc.strerror or exc}", step="seccomp") from exc
    # the child reports what failed through this pipe; Popen itself only says
    # "Exception occurred in preexec_fn"
    read_end, write_end = os.pipe()
    try:
        try:
            return subprocess.Popen(  # noqa: S603 (the kernel command: running it confined is this module's work)
                spec.argv,
                env=spec.env,
                cwd=None,
                start_new_session=True,
                close_fds=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if spec.stdout is None else spec.stdout,
                stderr=subprocess.DEVNULL if spec.stderr is None else spec.stderr,
                preexec_fn=lambda: enter(spec, write_end, filter_program),
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
