"""Which isolation this server gives, decided once at start-up from the settings and the host.

Policy, not mechanism: `sandbox.probe()` says what the host can do; this says what we do with
it. Without `insecure_no_sandbox` the server refuses to start where it cannot switch uids and
use cgroups, rather than quietly run everyone's code as one user.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Any

from kernelpool.config import Settings
from kernelpool.errors import SandboxUnavailable
from kernelpool.kernels.networks import plan_from
from sandbox import CgroupBackend, detect, probe
from sandbox.network import NetworkPlan

log = logging.getLogger(__name__)

INSECURE_WARNING = (
    "kernels run WITHOUT isolation (--insecure-no-sandbox): every user's code runs as the server's own "
    "user with no cgroup limits and can read every other user's files and the server's database"
)


@dataclass
class Isolation:
    sandboxed: bool
    cgroups: CgroupBackend | None
    host: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    network: NetworkPlan | None = None  # None: kernels use the host's network namespace

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
        return Isolation(False, None, host, [INSECURE_WARNING])
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
    if settings.kernel_network == "egress" and not host.get("nftables"):
        missing.append("nftables (the nft command, Debian's 'nftables' package, and CAP_NET_ADMIN) for kernel_network = 'egress'")
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
    plan, warnings = plan_from(settings)
    for warning in warnings:
        log.warning("%s", warning)
    return Isolation(True, backend, host, warnings, plan)


def blocked_for_others(path: str) -> str | None:
    """Why a uid other than ours could not run `path` (a folder on the way it may not pass), or None."""
    real = os.path.realpath(path)
    parts = real.split("/")
    for i in range(2, len(parts) + 1):
        step = "/".join(parts[:i]) or "/"
        try:
            mode = os.stat(step).st_mode
        except OSError as exc:
            return f"{step}: {exc.strerror}"
        need = stat.S_IXOTH | (stat.S_IROTH if i == len(parts) else 0)
        if mode & need != need:
            return f"{step} is mode {stat.filemode(mode)}"
    return None
