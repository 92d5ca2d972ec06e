"""sandbox: the OS mechanism that runs a command as a user's uid, in cgroup limits.

Knows nothing of Jupyter or MCP; kernelpool is its only caller. Modules: `identity` (who),
`limits` (how much), `accounts` (passwd entries), `cgroups` (v1/v2), `cgroupkill` (freezing and
killing cgroup trees), `tasks` (a uid's tasks, and ending them), `ipc` (a uid's System V IPC
objects), `launcher` (fork, drop,
exec), `network` (per-user network namespaces), `netplan` (their addresses and firewall table),
`views` (a kernel's private /tmp, /dev/shm, /proc and cgroup views), `seccomp` (its syscall
filter), `fs` (the root server's link-proof file access inside a user's folder), `paths` (the
rules for the paths clients give), `folders` (the server's own folders, made and deleted),
`rundir` (each kernel's root-owned folder for its connection file and sockets), `probe` (what
this host can isolate), `errors`.
"""

from __future__ import annotations

from sandbox import accounts, cgroupkill, ipc, tasks
from sandbox.accounts import account_exists, can_manage_accounts, ensure_account, remove_account
from sandbox.cgroups import Cgroup, CgroupBackend, CgroupV1Backend, CgroupV2Backend, detect
from sandbox.errors import (
    AccountError,
    CgroupError,
    FileTooLarge,
    InvalidPath,
    LaunchError,
    NetworkError,
    PathError,
    PathOutsideRoot,
    SandboxError,
)
from sandbox.folders import prepare_dir
from sandbox.fs import Entry, SafeRoot
from sandbox.identity import Identity
from sandbox.launcher import LaunchSpec, enter, spawn
from sandbox.limits import Limits, parse_memory
from sandbox.netplan import NetworkPlan
from sandbox.network import UserNetworks
from sandbox.probe import probe

__all__ = [
    "AccountError",
    "Cgroup",
    "CgroupBackend",
    "CgroupError",
    "CgroupV1Backend",
    "CgroupV2Backend",
    "Entry",
    "FileTooLarge",
    "Identity",
    "InvalidPath",
    "LaunchError",
    "LaunchSpec",
    "Limits",
    "NetworkError",
    "NetworkPlan",
    "PathError",
    "PathOutsideRoot",
    "SafeRoot",
    "SandboxError",
    "UserNetworks",
    "account_exists",
    "accounts",
    "cgroupkill",
    "can_manage_accounts",
    "detect",
    "enter",
    "ensure_account",
    "ipc",
    "parse_memory",
    "prepare_dir",
    "probe",
    "remove_account",
    "spawn",
    "tasks",
]
