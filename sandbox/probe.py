"""What this host lets us isolate; reported by kernelpool at start-up and on /healthz.

Nothing here changes the server process: the namespace, mount, no_new_privs and seccomp checks
run in a throwaway forked child (its mounts die with its mount namespace).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from sandbox import _libc, _nft, seccomp, views
from sandbox.accounts import can_manage_accounts
from sandbox.cgroups import detect

_CAP_SETUID = 7


def _has_cap_setuid() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SETUID & 1)
    except OSError:
        pass
    return False


_CHECKS = ("netns", "no_new_privs", "mount_namespace", "proc_hidepid", "cgroup_namespace", "seccomp", "ipc_namespace",
           "private_sysfs", "etc_overlay")


def _try_in_child(filter_program: bytes | None) -> dict[str, bool]:
    """Which of `_CHECKS` a child can do: each bit of the number it writes back is one of them."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish calls, then _exit
        code = 0
        with contextlib.suppress(BaseException):  # a failure is the answer: its bit stays 0
            _libc.unshare(_libc.CLONE_NEWNET)
            # a namespace whose loopback cannot be brought up (no CAP_NET_ADMIN) is no use to a kernel
            from sandbox.launcher import _loopback_up

            _loopback_up()
            code |= 1
        code |= _try_views()
        with contextlib.suppress(BaseException):  # a failure is the answer: its bit stays 0
            _libc.set_no_new_privs()
            code |= 2
            if filter_program is not None:
                _libc.load_seccomp_filter(filter_program)
                try:
                    _libc.unshare(_libc.CLONE_NEWNS)
                except PermissionError:
                    code |= 32  # loaded, and in force
        try:
            os.write(w, code.to_bytes(4, "little"))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as report:
        data = report.read()
    os.waitpid(pid, 0)
    code = int.from_bytes(data, "little") if len(data) == 4 else 0
    return {name: bool(code >> i & 1) for i, name in enumerate(_CHECKS)}


def _try_views() -> int:
    code = 0
    with contextlib.suppress(BaseException):  # a failure is the answer: its bit stays 0
        views.enter_mount_namespace()
        views.private_tmpfs("/tmp", 1 << 20)  # noqa: S108 (in the probe's own mount namespace)
        code |= 4
        views.private_proc()
        code |= 8
    with contextlib.suppress(BaseException):  # a failure is the answer: its bit stays 0
        views.enter_cgroup_namespace()
        code |= 16
    with contextlib.suppress(BaseException):  # a failure is the answer: its bit stays 0
        views.enter_ipc_namespace()
        views.limit_shm(1 << 20)
        code |= 64
    if code & 4:  # only in the child's own mount namespace: never the host's /sys or /etc
        with contextlib.suppress(BaseException):  # a failure is the answer: its bit stays 0
            views.private_sysfs()
            code |= 128
        with contextlib.suppress(BaseException):  # a failure is the answer: its bit stays 0
            views.replace_files({"/etc/passwd": "root:x:0:0::/root:/bin/sh\n"}, (), views.read_mountinfo())
            code |= 256
    return code


def _nftables() -> str | None:
    """None if the nft command is there and lets us read the ruleset (CAP_NET_ADMIN), else why not."""
    missing = _nft.available()
    if missing is not None:
        return missing
    try:
        _nft.list_json("tables")
    except _nft.NftError as exc:
        return f"nft cannot read the ruleset ({str(exc).strip() or 'no reason given'}; it needs CAP_NET_ADMIN)"
    return None


def _ip_forward() -> bool | None:
    try:
        with open("/proc/sys/net/ipv4/ip_forward", encoding="ascii") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def probe(cgroup_prefix: str = "kernelpool") -> dict[str, Any]:
    """A summary of this host's isolation abilities.

    {"root", "setuid", "accounts", "cgroup": {"version", "controllers", "writable"},
    "netns", "nftables", "nftables_error" (why not, or None), "ip_forward", "no_new_privs",
    "mount_namespace" (with a private tmpfs), "proc_hidepid", "cgroup_namespace", "seccomp" (loaded and refusing
    unshare), "seccomp_error", "ipc_namespace" (with its shm limits set), "private_sysfs", "etc_overlay" (an overlay on /etc)}.
    kernelpool decides from it whether it can run isolated, and refuses to pretend when it cannot.
    """
    root = os.geteuid() == 0
    backend = detect(cgroup_prefix)
    seccomp_error = None
    try:
        filter_program: bytes | None = seccomp.program()
    except OSError as exc:
        filter_program, seccomp_error = None, str(exc.strerror or exc)
    checks = _try_in_child(filter_program)
    nftables_error = _nftables()
    return {
        "root": root,
        "setuid": root or _has_cap_setuid(),
        "accounts": can_manage_accounts(),
        "cgroup": {
            "version": backend.version if backend else None,
            "controllers": sorted(backend.controllers) if backend else [],
            "writable": backend.writable() if backend else False,
        },
        **checks,
        "seccomp_error": seccomp_error,
        "nftables": nftables_error is None,
        "nftables_error": nftables_error,
        "ip_forward": _ip_forward(),
    }
