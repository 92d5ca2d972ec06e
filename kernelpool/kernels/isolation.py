"""Which isolation this server gives, decided once at start-up from the settings and the host.

Policy, not mechanism: `sandbox.probe()` says what the host can do; this says what we do with
it. Without `insecure_no_sandbox` the server refuses to start where it cannot switch uids and
use cgroups, rather than quietly run everyone's code as one user. The one thing it gives up
rather than refuse: `kernel_network` left at its default 'egress' on a host without nftables
runs 'none' (loopback only, still a namespace per user), and says so; never 'host'.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from kernelpool.config import SYSTEM_DATA_DIR, Settings
from kernelpool.errors import DataDirUnreachable, SandboxUnavailable
from kernelpool.kernels.networks import plan_from
from sandbox import CgroupBackend, detect, probe
from sandbox.network import NetworkPlan

log = logging.getLogger(__name__)

INSECURE_WARNING = (
    "kernels run WITHOUT isolation (--insecure-no-sandbox): every user's code runs as the server's own "
    "user with no cgroup limits and can read every other user's files and the server's database"
)


# the command that brings the nft command, for the fallback's message (Debian and Ubuntu)
NFTABLES_FIX = "apt-get install nftables"


@dataclass(frozen=True)
class NetworkFallback:
    """kernel_network was left at its default 'egress', which this host cannot give: 'none' is in force."""

    wanted: Literal["egress"]
    mode: Literal["none"]
    reason: str
    fix: str

    def message(self) -> str:
        return (f"kernel_network: {self.mode!r} (a network namespace per user, loopback only: kernels cannot reach "
                f"the internet), not the default {self.wanted!r}, which needs nftables: {self.reason}. "
                f"To give kernels internet access: {self.fix}")

    def describe(self) -> dict[str, str]:
        return {"wanted": self.wanted, "mode": self.mode, "reason": self.reason, "fix": self.fix}


@dataclass
class Isolation:
    sandboxed: bool
    cgroups: CgroupBackend | None
    host: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    network: NetworkPlan | None = None  # None: kernels use the host's network namespace
    network_fallback: NetworkFallback | None = None

    def fallback(self) -> dict[str, str] | None:
        """The network mode given instead of the default, why and how to get it (/healthz, doctor)."""
        return self.network_fallback.describe() if self.network_fallback else None

    def describe(self) -> dict[str, Any]:
        return {
            "sandboxed": self.sandboxed,
            "uid_switching": self.sandboxed,
            "cgroup_version": self.cgroups.version if self.cgroups else None,
            # per kernel, whenever kernels run as their user's uid (see sandbox.views, sandbox.seccomp)
            "private_mounts": self.sandboxed,  # own mount namespace: private /tmp and /dev/shm
            "ipc_namespace": self.sandboxed,  # own SysV IPC and POSIX message queues, per kernel
            "private_sysfs": self.sandboxed,  # /sys of its network namespace
            "own_account_files": self.sandboxed,  # /etc/passwd and /etc/group with its own user only
            "pid_isolation": "proc hidepid=invisible" if self.sandboxed else None,
            "cgroup_namespace": self.sandboxed,
            "seccomp": self.sandboxed,
            "network": self.network.mode if self.network is not None else "host",
            "warnings": self.warnings,
        }


def decide(settings: Settings) -> Isolation:
    host = probe()
    if settings.insecure_no_sandbox:
        log.warning(INSECURE_WARNING)
        return Isolation(sandboxed=False, cgroups=None, host=host, warnings=[INSECURE_WARNING])
    missing = []
    if not host.get("setuid"):
        missing.append("switching uids (run as root, or with CAP_SETUID/CAP_SETGID)")
    backend = detect(prefix=settings.cgroup_prefix)
    if backend is None:
        missing.append("writable cgroups with the memory, cpu and pids controllers")
    blocked = blocked_for_others(settings.kernel_python or sys.executable)
    if blocked:
        missing.append(f"a kernel interpreter that other uids can run ({blocked}); install kernelpool into a "
                       "virtual environment outside /root, or set kernel_python")
    if settings.kernel_network != "host" and not host.get("netns"):
        missing.append(f"network namespaces (CAP_SYS_ADMIN and CAP_NET_ADMIN; for kernel_network = "
                       f"{settings.kernel_network!r}, or set it to 'host', shared by all users)")
    fallback = _network_fallback(settings, host)
    if settings.kernel_network == "egress" and not host.get("nftables") and fallback is None:
        missing.append(f"nftables for kernel_network = 'egress', which was set explicitly ({host.get('nftables_error')}: "
                       f"install it with `{NFTABLES_FIX}` and give the server CAP_NET_ADMIN, or set kernel_network "
                       "to 'none', loopback only)")
    for key, what in (
        ("mount_namespace", "mount namespaces with a private tmpfs (CAP_SYS_ADMIN; AppArmor must allow mount)"),
        ("proc_hidepid", "a private /proc with hidepid=invisible (Linux 5.8 or later)"),
        ("cgroup_namespace", "cgroup namespaces (Linux 4.6 or later)"),
        ("ipc_namespace", "IPC namespaces (CAP_SYS_ADMIN; a kernel built with CONFIG_IPC_NS)"),
        ("private_sysfs", "mounting a fresh sysfs (CAP_SYS_ADMIN; AppArmor must allow mount)"),
        ("etc_overlay", "an overlay file system on /etc, for each kernel's own /etc/passwd (CONFIG_OVERLAY_FS)"),
        ("seccomp", f"a seccomp filter ({host.get('seccomp_error') or 'libseccomp2 and a seccomp-enabled kernel'})"),
    ):
        if not host.get(key):
            missing.append(what)
    if missing:
        raise SandboxUnavailable(
            "this host cannot isolate kernels: it lacks " + "; ".join(missing)
            + ". Run `kernelpool doctor` for details. To run anyway, single-user, start with "
            "--insecure-no-sandbox (every kernel then runs as this server's own user, without limits)."
        )
    plan, warnings = plan_from(settings, fallback.mode if fallback else None)
    if fallback is not None:
        warnings.insert(0, fallback.message())
    for warning in warnings:
        log.warning("%s", warning)
    return Isolation(sandboxed=True, cgroups=backend, host=host, warnings=warnings, network=plan,
                     network_fallback=fallback)


def _network_fallback(settings: Settings, host: dict[str, Any]) -> NetworkFallback | None:
    """'none' instead of 'egress' where nftables is lacking and kernel_network was left at its
    default; an 'egress' that was asked for (option, environment, file) is refused instead."""
    if settings.kernel_network != "egress" or host.get("nftables") or settings.given("kernel_network"):
        return None
    reason = host.get("nftables_error") or "nftables is not usable"
    fix = (f"{NFTABLES_FIX}, then restart kernelpool" if "not installed" in reason
           else "give the server CAP_NET_ADMIN, then restart kernelpool")
    return NetworkFallback("egress", "none", reason, fix)


def blocked_for_others(path: str, *, read_last: bool = True) -> str | None:
    """Why a uid other than ours could not reach `path` (a folder on the way it may not pass) or,
    with `read_last`, read it; None if it can."""
    found = _first_blocked(path, read_last=read_last)
    return f"{found[0]} {found[1]}" if found else None


def _first_blocked(path: str, *, read_last: bool) -> tuple[str, str] | None:
    """(the first folder or file on the way to `path` that others may not pass or read, why)."""
    real = os.path.realpath(path)
    parts = real.split("/") if real != "/" else [""]
    for i in range(1, len(parts) + 1):
        step = "/".join(parts[:i]) or "/"
        try:
            mode = os.stat(step).st_mode
        except OSError as exc:
            return step, f"cannot be reached ({exc.strerror})"
        need = stat.S_IXOTH | (stat.S_IROTH if read_last and i == len(parts) else 0)
        if mode & need != need:
            return step, f"is mode {stat.filemode(mode)}"
    return None


def data_dir_unreachable(settings: Settings) -> DataDirUnreachable | None:
    """Why users' uids could not reach their folders below the data folder, as the error that
    says what to do; None if they can. The server raises it at start when it runs kernels as the
    users' uids (`app._Server`); `kernelpool doctor` reports it.

    It looks at every folder above the data folder that exists already: the server makes the
    missing ones 0755, and the data folder itself, its `users` and `run` 0711, at each start.
    """
    data = os.path.abspath(settings.data_dir)
    above = os.path.dirname(data)
    while not os.path.isdir(above):
        above = os.path.dirname(above)
    found = _first_blocked(above, read_last=False)
    if found is None:
        return None
    folder, why = found
    fix = f"let other uids pass {folder} (chmod o+x {folder}), if they may"
    if data != str(SYSTEM_DATA_DIR):
        keep = (f"; to keep this folder's users and notebooks, move it there first: mv {data} {SYSTEM_DATA_DIR}"
                if os.path.isfile(settings.db_path) and not os.path.lexists(SYSTEM_DATA_DIR) else "")
        fix = (f"use a data folder that other uids can reach, such as {SYSTEM_DATA_DIR} (--data-dir, KERNELPOOL_DATA_DIR "
               f"or data_dir in the configuration file{keep}), or {fix}")
    return DataDirUnreachable(data, f"{folder} {why}", fix[0].upper() + fix[1:] + ".")
