"""The kernels' name servers, read from the host's resolv.conf: IPv4 ones only, each once, and what
was skipped said with why."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

from sandbox.netplan import resolvers_from


def test_resolvers_are_the_ipv4_name_servers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# generated\nsearch example.org\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n"
                    "nameserver 10.0.0.2\nnameserver 192.0.2.53 # trailing\nnameserver not-an-ip\nnameserver\n"
                    "options edns0\n")
    found, skipped = resolvers_from(str(conf))
    assert found == [IPv4Address("10.0.0.2"), IPv4Address("192.0.2.53")]
    assert skipped == ["fe80::1: kernels have no IPv6 route", "not-an-ip: not an address"]


def test_a_missing_resolv_conf_gives_no_resolver_and_says_why(tmp_path: Path) -> None:
    found, skipped = resolvers_from(str(tmp_path / "none"))
    assert found == [] and skipped == [f"{tmp_path / 'none'}: No such file or directory"]
