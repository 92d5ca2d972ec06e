"""How a server lays out its kernels' networks: names, a /31 per user, and the firewall table.

`NetworkPlan` is built by kernelpool from its settings and handed to `sandbox.network.UserNetworks`,
which makes the namespaces; the plan itself touches nothing on the host. See `sandbox.network`
for what the modes mean and what the table lets through.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from sandbox.errors import NetworkError

# what a kernel may never reach in "egress" mode, unless `allow` names a range inside one
BLOCKED_V4: tuple[IPv4Network, ...] = tuple(IPv4Network(n) for n in (
    "0.0.0.0/8",        # "this network"
    "10.0.0.0/8",       # private
    "100.64.0.0/10",    # shared address space (carrier-grade NAT; also cloud-internal)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local: cloud metadata services live here
    "172.16.0.0/12",    # private
    "192.0.0.0/24",     # IETF protocol assignments
    "192.168.0.0/16",   # private
    "198.18.0.0/15",    # benchmarking, used inside some data centres
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, and 255.255.255.255
))
# IPv6 is not routed for kernels at all; these are named so that a read-back can show them
BLOCKED_V6 = ("fc00::/7", "fe80::/10")
# ends in a letter: "<prefix><uid>" link names of two prefixes can then never coincide
_PREFIX = re.compile(r"[a-z]([a-z0-9]{0,4}[a-z])?")
_IFNAMSIZ = 15


@dataclass(frozen=True)
class NetworkPlan:
    """How this server lays out its kernels' networks; built by kernelpool from settings."""

    mode: Literal["none", "egress"]
    prefix: str = "kp"  # names: namespace "<prefix>-<uid>", host link "<prefix><uid>", table "<prefix>_kernels"
    addresses: IPv4Network = IPv4Network("10.201.0.0/16")  # a /31 per user with a namespace
    allow: tuple[IPv4Network, ...] = ()  # blocked ranges kernels may reach after all
    resolvers: tuple[IPv4Address, ...] = ()  # reachable on port 53 whatever their address
    rundir: str = "/run/netns"

    def __post_init__(self) -> None:
        if self.mode not in ("none", "egress"):
            raise ValueError(f"unknown network mode {self.mode!r} (expected 'none' or 'egress')")
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"network prefix {self.prefix!r}: 1-6 characters a-z, 0-9, starting and ending with a letter")
        if self.addresses.prefixlen > 31:
            raise ValueError(f"kernel address range {self.addresses} is too small: a /31 or larger is needed")
        if not self.addresses.is_private:
            raise ValueError(f"kernel address range {self.addresses} must be a private range")
        if not os.path.isabs(self.rundir):
            raise ValueError(f"namespace folder {self.rundir!r} must be an absolute path")

    @property
    def table(self) -> str:
        return f"{self.prefix}_kernels"

    @property
    def comment(self) -> str:
        return f"kernelpool {self.prefix}"

    @property
    def slots(self) -> int:
        return self.addresses.num_addresses // 2

    def path(self, uid: int) -> str:
        return os.path.join(self.rundir, f"{self.prefix}-{uid}")

    def host_link(self, uid: int) -> str:
        name = f"{self.prefix}{uid}"
        if len(name) > _IFNAMSIZ:
            raise NetworkError(f"interface name {name!r} is longer than {_IFNAMSIZ} characters: use a shorter prefix")
        return name

    def pair(self, slot: int) -> tuple[IPv4Address, IPv4Address]:
        """(host end, namespace end) of the /31 number `slot`."""
        base = self.addresses.network_address + 2 * slot
        return base, base + 1

    def ruleset(self) -> str:
        """The nftables table of this server, replacing any it had (an nft script)."""
        t = self.table
        rng = str(self.addresses)
        blocked = ", ".join(str(n) for n in BLOCKED_V4)
        allow = ", ".join(str(n) for n in self.allow)
        dns = ", ".join(str(a) for a in self.resolvers)
        lines = [
            f"add table inet {t}",
            f"delete table inet {t}",  # start from nothing: the add above makes the delete safe
            f"table inet {t} {{",
            "  set kernel_links { type ifname; }",
            "  set resolvers { type ipv4_addr; " + (f"elements = {{ {dns} }}; " if dns else "") + "}",
            "  set allowed { type ipv4_addr; flags interval; " + (f"elements = {{ {allow} }}; " if allow else "") + "}",
            f"  set blocked {{ type ipv4_addr; flags interval; elements = {{ {blocked} }}; }}",
            f"  set blocked6 {{ type ipv6_addr; flags interval; elements = {{ {', '.join(BLOCKED_V6)} }}; }}",
            # the host itself, on any of its addresses (the server's port too): only its resolvers
            "  chain input { type filter hook input priority filter; policy accept;",
            "    iifname @kernel_links meta l4proto { tcp, udp } ip daddr @resolvers th dport 53 accept",
            "    iifname @kernel_links drop",
            "  }",
            "  chain forward { type filter hook forward priority filter; policy accept;",
            "    iifname @kernel_links oifname @kernel_links drop",
            "    oifname @kernel_links ct state established,related accept",
            "    oifname @kernel_links drop",
            "    iifname @kernel_links ip6 daddr @blocked6 drop",
            "    iifname @kernel_links meta nfproto ipv6 drop",
            f"    iifname @kernel_links ip daddr {rng} drop",
            "    iifname @kernel_links meta l4proto { tcp, udp } ip daddr @resolvers th dport 53 accept",
            "    iifname @kernel_links ip daddr @allowed accept",
            "    iifname @kernel_links ip daddr @blocked drop",
            "  }",
            # nothing on the host opens a connection into a namespace either
            "  chain output { type filter hook output priority filter; policy accept;",
            "    oifname @kernel_links ct state established,related accept",
            "    oifname @kernel_links drop",
            "  }",
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;",
            f"    ip saddr {rng} ip daddr != {rng} masquerade",
            "  }",
            "}",
        ]
        return "\n".join(lines) + "\n"


def resolvers_from(path: str = "/etc/resolv.conf") -> tuple[list[IPv4Address], list[str]]:
    """The IPv4 name servers in a resolv.conf, and the entries that were skipped (with why)."""
    found: list[IPv4Address] = []
    skipped: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return [], [f"{path}: {exc.strerror}"]
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or parts[0] != "nameserver":
            continue
        try:
            addr = ipaddress.ip_address(parts[1].split("%")[0])
        except ValueError:
            skipped.append(f"{parts[1]}: not an address")
            continue
        if isinstance(addr, IPv4Address):
            if addr not in found:
                found.append(addr)
        else:
            skipped.append(f"{addr}: kernels have no IPv6 route")
    return found, skipped
