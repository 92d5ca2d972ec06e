"""Users' network namespaces: which namespace a user's kernels join, and when it exists.

Policy over `sandbox.network` (the mechanism). A user's namespace is made with the first kernel
the server starts for them (pool kernels included) and removed when their last kernel has
stopped; `start()` (the app's lifespan, after leftover kernels are reaped) clears what a crashed
server left and installs the firewall table; `close()` (after every kernel has stopped) removes
them all. `kernel_network = "host"`, and the insecure no-sandbox mode, make no namespace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Network
from typing import Any, Literal, TypeVar

from kernelpool.config import Settings
from sandbox.identity import Identity
from sandbox.network import NetworkPlan, UserNetworks, docker_rules, resolvers_from

log = logging.getLogger(__name__)
_T = TypeVar("_T")

HOST_WARNING = (
    "kernel_network = 'host': every user's kernels share the host's network namespace; one user's code "
    "can connect to another user's kernels and listeners on 127.0.0.1"
)


def plan_from(settings: Settings, mode: Literal["egress", "none", "host"] | None = None) -> tuple[NetworkPlan | None, list[str]]:
    """The network plan for these settings (None for 'host'), and warnings about it. `mode`, when
    given, is the mode in force instead of kernel_network (`isolation.decide`'s fallback)."""
    mode = mode or settings.kernel_network
    if mode == "host":
        return None, [HOST_WARNING]
    warnings: list[str] = []
    resolvers, skipped = resolvers_from()
    if mode == "egress":
        for entry in skipped:
            warnings.append(f"/etc/resolv.conf name server {entry}; not reachable from kernels")
        local = [str(a) for a in resolvers if a.is_loopback]
        if local:
            warnings.append(
                f"/etc/resolv.conf names a resolver on the host's loopback ({', '.join(local)}): kernels have their own "
                "loopback and cannot reach it, so names do not resolve in kernels. Point /etc/resolv.conf at the "
                "upstream servers (with systemd-resolved: /run/systemd/resolve/resolv.conf)")
        if not resolvers:
            warnings.append("no IPv4 name server in /etc/resolv.conf: names do not resolve in kernels")
    plan = NetworkPlan(
        mode=mode,
        prefix=settings.network_prefix,
        addresses=IPv4Network(settings.kernel_network_range),
        allow=tuple(IPv4Network(n) for n in settings.kernel_network_allow),
        resolvers=tuple(a for a in resolvers if not a.is_loopback) if mode == "egress" else (),
    )
    return plan, warnings


class UserNetworkPolicy:
    """Counts each user's kernels and keeps their namespace exactly while there are any."""

    def __init__(self, plan: NetworkPlan | None) -> None:
        self.plan = plan
        self._nets = UserNetworks(plan) if plan is not None else None
        self._counts: dict[int, int] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        # threads of their own: netlink and iptables calls (which may wait for the xtables lock while
        # Docker holds it) must not hold up notebook reads and writes in the default executor
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kernelpool-net")

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def mode(self) -> str:
        return self.plan.mode if self.plan is not None else "host"

    async def start(self) -> None:
        if self._nets is None:
            return
        for note in await self._run(self._nets.start):
            log.warning("network: %s", note)

    async def join(self, identity: Identity | None) -> str | None:
        """Count one more kernel of `identity`; returns the namespace path it must join (None: host)."""
        if self._nets is None or identity is None:
            return None
        uid = identity.uid
        async with self._locks.setdefault(uid, asyncio.Lock()):
            path = self._nets.plan.path(uid)
            # made afresh also when kernels still count but the namespace is gone: a `users remove`
            # that failed after it had taken the namespace away leaves the user, and its next kernels
            if self._counts.get(uid, 0) == 0 or not self._nets.exists(uid):
                path = await self._run(self._nets.ensure, uid)
                log.info("network namespace %s made for %s", path, identity.name)
            self._counts[uid] = self._counts.get(uid, 0) + 1
            return path

    async def leave(self, identity: Identity | None) -> None:
        """One kernel of `identity` has stopped; the last one takes the namespace with it."""
        if self._nets is None or identity is None:
            return
        uid = identity.uid
        async with self._locks.setdefault(uid, asyncio.Lock()):
            left = self._counts.get(uid, 0) - 1
            if left > 0:
                self._counts[uid] = left
                return
            self._counts.pop(uid, None)
            try:
                await self._run(self._nets.remove, uid)
            except Exception as exc:
                log.warning("network namespace of %s: %s", identity.name, exc)

    async def refresh(self) -> None:
        """Housekeeping: heal what another program changed under us (Docker's DOCKER-USER chain)."""
        if self._nets is None:
            return
        added = await self._run(self._nets.refresh_docker_rules)
        if added:
            log.warning("network: put back the DOCKER-USER rules of %d user namespace(s) (dockerd started or "
                        "restarted after they were made)", added)

    def users_with_namespace(self) -> int:
        return len(self._counts)

    async def close(self) -> None:
        if self._nets is None:
            return
        self._counts.clear()
        try:
            await self._run(self._nets.close)
        finally:
            self._executor.shutdown(wait=False)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "per_user_namespace": self.plan is not None}
        if self.plan is not None:
            out["namespaces"] = self.users_with_namespace()
            if self.plan.mode == "egress":
                out.update({
                    "range": str(self.plan.addresses), "allowed": [str(n) for n in self.plan.allow],
                    "resolvers": [str(a) for a in self.plan.resolvers], "nftables_table": f"inet {self.plan.table}",
                })
        return out

    def rules(self) -> list[dict[str, Any]]:
        return self._nets.rules() if self._nets is not None else []

    def docker_rules(self) -> list[str]:
        return docker_rules(self.plan.comment) if self.plan is not None else []


def report(settings: Settings, plan: NetworkPlan | None, *, sandboxed: bool) -> dict[str, Any]:
    """What `kernelpool doctor` says about network isolation: the mode in force and what is live now."""
    import os

    if not sandboxed:
        return {"mode": "host", "isolated": False, "why": "no sandbox: kernels use the host's network"}
    if plan is None:
        return {"mode": "host", "isolated": False, "why": HOST_WARNING}
    policy = UserNetworkPolicy(plan)
    out = policy.describe()
    del out["namespaces"]
    out["isolated"] = True
    try:
        live = sorted(n for n in os.listdir(plan.rundir) if n.startswith(f"{plan.prefix}-"))
    except OSError:
        live = []
    out["live_namespaces"] = len(live)
    if plan.mode == "egress":
        out["table_installed"] = bool(policy.rules())
        out["docker_user_rules"] = len(policy.docker_rules())
    return out


def describe_report(net: dict[str, Any]) -> str:
    """`report` (with the fallback `isolation.decide` gave, if any) in one line, for `kernelpool doctor`."""
    if not net.get("isolated"):
        return f"{net['mode']}: NOT isolated between users ({net.get('why')})"
    if net["mode"] == "none":
        text = "none: a network namespace per user, loopback only"
        if net.get("fallback"):
            fallback = net["fallback"]
            text += (f" (NOT the default {fallback['wanted']!r}, which needs nftables: {fallback['reason']}; "
                     f"to give kernels internet access: {fallback['fix']})")
    else:
        text = (f"egress: a network namespace per user, NAT to public addresses only (range {net['range']}, "
                f"resolvers {', '.join(net['resolvers']) or 'none'}, allowed {', '.join(net['allowed']) or 'none'}); "
                f"table {net['nftables_table']} {'installed' if net['table_installed'] else 'not installed (no server running)'}")
        if net.get("docker_user_rules"):
            text += f", {net['docker_user_rules']} DOCKER-USER rule(s)"
    return text + f"; {net['live_namespaces']} user namespace(s) live"
