"""What this host lets us isolate; reported by kernelpool at start-up and on /healthz.

Nothing here changes the server process: the namespace and no_new_privs checks run in a
throwaway forked child.
"""

from __future__ import annotations

import os
from typing import Any

from sandbox import _libc, _nft
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


def _try_in_child() -> tuple[bool, bool]:
    """(netns, no_new_privs): can a child unshare its network namespace / set no_new_privs?"""
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish calls, then _exit
        code = 0
        try:
            _libc.unshare(_libc.CLONE_NEWNET)
            # a namespace whose loopback cannot be brought up (no CAP_NET_ADMIN) is no use to a kernel
            from sandbox.launcher import _loopback_up

            _loopback_up()
            code |= 1
        except BaseException:
            pass
        try:
            _libc.set_no_new_privs()
            code |= 2
        except BaseException:
            pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return False, False
    return bool(code & 1), bool(code & 2)


def _nftables() -> bool:
    """libnftables loads and lets us read the ruleset (CAP_NET_ADMIN)."""
    if _nft.available() is not None:
        return False
    try:
        _nft.list_json("tables")
    except _nft.NftError:
        return False
    return True


def _ip_forward() -> bool | None:
    try:
        with open("/proc/sys/net/ipv4/ip_forward", encoding="ascii") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def probe(cgroup_prefix: str = "kernelpool") -> dict[str, Any]:
    """A summary of this host's isolation abilities.

    {"root", "setuid", "accounts", "cgroup": {"version", "controllers", "writable"},
    "netns", "nftables", "ip_forward", "no_new_privs"}. kernelpool decides from it whether it can run isolated, and
    refuses to pretend when it cannot.
    """
    root = os.geteuid() == 0
    backend = detect(cgroup_prefix)
    netns, no_new_privs = _try_in_child()
    return {
        "root": root,
        "setuid": root or _has_cap_setuid(),
        "accounts": can_manage_accounts(),
        "cgroup": {
            "version": backend.version if backend else None,
            "controllers": sorted(backend.controllers) if backend else [],
            "writable": backend.writable() if backend else False,
        },
        "netns": netns,
        "nftables": _nftables(),
        "ip_forward": _ip_forward(),
        "no_new_privs": no_new_privs,
    }
