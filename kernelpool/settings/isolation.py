"""The settings of users' isolation (uids, accounts, cgroups, network) and limits: a part of
`kernelpool.config.Settings` (which every caller uses), with the one parser of memory limits.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat, PositiveInt
from pydantic_settings import NoDecode

from sandbox.limits import parse_memory


def memory_limit(value: str | int | None) -> int | None:
    """A memory limit as people write it ("2G", "512M", "none", "max") in bytes; None = no limit.

    The one parser of memory limits: `Settings` (kernel_memory, user_memory) and
    `UserService.set_limits` / the per-user overrides that `users set-limits` stores.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("", "none", "max"):
        return None
    return parse_memory(str(value))  # ValueError names the problem


# parsed when the settings are built: everything after sees bytes or None
MemoryLimit = Annotated[int | None, BeforeValidator(memory_limit)]



class IsolationSettings(BaseModel):
    """Users' uids and accounts, cgroups, network namespaces, per-kernel and per-user limits."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    first_user: str = "default"
    """name of the user created on first start, when there is none"""
    insecure_no_sandbox: bool = False
    """run kernels as the server's own user, without cgroups (single-user development only)"""
    uid_min: int = Field(20000, ge=1000)
    """first uid/gid handed to kernelpool users"""
    uid_max: int = Field(29999, ge=1000)
    """last uid/gid handed to kernelpool users"""
    account_prefix: str = "kp-"
    """prefix of the Unix account names created for users"""
    cgroup_prefix: str = "kernelpool"
    """folder name under the server's own cgroup"""
    kernel_network: Literal["egress", "none", "host"] = "egress"
    """each user's kernels share a network namespace of their own: 'egress' = loopback plus NAT to public addresses only, 'none' = loopback only; 'host' = the host's network, shared by all users (unsafe). Left at its default on a host without nftables: 'none', said at start, on /healthz and by doctor; an 'egress' that is set is refused there"""
    kernel_network_range: str = "10.201.0.0/16"
    """private IPv4 range from which each user's namespace gets a /31 ('egress')"""
    kernel_network_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """blocked IPv4 ranges (private, link-local, ...) that kernels may reach after all ('egress'), comma-separated"""
    network_prefix: str = "kp"
    """names this server's namespaces (PREFIX-UID), links (PREFIXUID) and nftables table; unique per host"""
    kernel_memory: MemoryLimit = 2 << 30
    """memory limit per kernel"""
    kernel_cpus: PositiveFloat | None = 1.0
    """CPU limit per kernel, in cores"""
    kernel_pids: PositiveInt | None = 256
    """process/thread limit per kernel"""
    kernel_tmpfs_size: str = "512M"
    """size cap of each kernel's private /tmp, of its /dev/shm and of its System V shared memory (what is stored there counts against the kernel's memory limit)"""
    user_memory: MemoryLimit = 4 << 30
    """memory limit for all of one user's kernels together"""
    user_cpus: PositiveFloat | None = None
    """CPU limit for all of one user's kernels together"""
    user_pids: PositiveInt | None = 1024
    """process/thread limit for all of one user's kernels together"""
