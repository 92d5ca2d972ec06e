"""Per-user network namespaces for real, as root: made, joined, firewalled, removed.

Every namespace, link, route and table here is made by the test, under a prefix of this run,
and removed in teardown. Traffic goes only to loopback or to addresses inside namespaces the
test made: the "outside" is a namespace of ours holding stand-in addresses (a public one, a
link-local one, private ones), which the host reaches through /32 routes the test adds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from sandbox import LaunchSpec, _libc, _nft, spawn
from sandbox.network import BLOCKED_V4, NetworkPlan, UserNetworks, docker_rules

PID = os.getpid() % 1000
PREFIX = f"n{PID}x"
RANGE = IPv4Network(f"10.{240 + PID % 8}.{PID % 256}.0/24")
OUTSIDE = f"/run/netns/{PREFIX}-outside"  # the stand-in for the world beyond the host
OUT_LINK = f"{PREFIX}o"  # host end of the link to it
OUT_HOST, OUT_PEER = f"10.239.{PID % 256}.1", f"10.239.{PID % 256}.2"  # the link's two ends
PUBLIC = "198.51.100.7"  # stands in for an address on the internet
METADATA = "169.254.169.254"
PRIVATE = ["10.99.7.7", "172.16.7.7", "192.168.7.7", "100.64.7.7"]
ALLOWED = "192.168.77.7"  # in a blocked range, but in the plan's allow list
RESOLVER = "10.99.53.53"  # private, but the plan's resolver: port 53 only
UID_A, UID_B = 61901, 61902
PORT = 8080


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, links, nftables)")
    why = _nft.available()
    if why is not None:
        pytest.skip(f"nftables unavailable: {why}")


def _plan(**extra: object) -> NetworkPlan:
    base: dict[str, object] = {
        "mode": "egress", "prefix": PREFIX, "addresses": RANGE,
        "allow": (IPv4Network(f"{ALLOWED}/32"),), "resolvers": (IPv4Address(RESOLVER),),
    }
    base.update(extra)
    return NetworkPlan(**base)  # type: ignore[arg-type]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@contextlib.contextmanager
def _in_netns(path: str) -> Iterator[None]:
    """Run the block in network namespace `path` (this thread only)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    fd = os.open(path, os.O_RDONLY)
    try:
        _libc.setns(fd, _libc.CLONE_NEWNET)
        yield
    finally:
        _libc.setns(home, _libc.CLONE_NEWNET)
        os.close(fd)
        os.close(home)


def _listen(path: str | None, address: str, port: int = PORT) -> socket.socket:
    """A TCP listener on address:port inside namespace `path` (None: the host's), accepting forever."""
    box: list[socket.socket] = []

    def make() -> None:
        with _in_netns(path) if path else contextlib.nullcontext():
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
            s.listen(16)
            box.append(s)

    t = threading.Thread(target=make)  # setns only ever in a throwaway thread
    t.start()
    t.join()
    sock = box[0]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = sock.accept()
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock


PROBE = textwrap.dedent("""
    import json, socket, sys
    from concurrent.futures import ThreadPoolExecutor
    def probe(target):
        host, port = target
        try:
            socket.create_connection((host, port), timeout=1.5).close()
            return "connected"
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return type(e).__name__
    targets = json.loads(sys.argv[1])
    with ThreadPoolExecutor(len(targets)) as pool:
        print(json.dumps(dict(zip([f"{h}:{p}" for h, p in targets], pool.map(probe, targets)))))
""")


def _probe_from(netns: str, targets: list[tuple[str, int]]) -> dict[str, str]:
    """Connect to each target from a process that `sandbox.spawn` put into `netns` (as a kernel is)."""
    r, w = os.pipe()
    try:
        proc = spawn(LaunchSpec([sys.executable, "-c", PROBE, json.dumps(targets)], {"PATH": "/usr/bin:/bin"}, "/",
                                netns=netns, stdout=w, stderr=w))
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as out:
        text = out.read().decode()
    assert proc.wait(timeout=60) == 0, text
    return json.loads(text)


@pytest.fixture
def nets() -> Iterator[UserNetworks]:
    _require()
    networks = UserNetworks(_plan())
    try:
        networks.start()
        yield networks
    finally:
        networks.close()


@pytest.fixture
def outside(nets: UserNetworks) -> Iterator[str]:
    """A namespace of the test's holding the stand-in addresses, routed from the host by /32s."""
    stand_ins = [PUBLIC, METADATA, *PRIVATE, ALLOWED, RESOLVER]
    _ip("netns", "add", os.path.basename(OUTSIDE))
    try:
        _ip("link", "add", OUT_LINK, "type", "veth", "peer", "name", "eth0", "netns", os.path.basename(OUTSIDE))
        _ip("addr", "add", f"{OUT_HOST}/32", "peer", f"{OUT_PEER}/32", "dev", OUT_LINK)
        _ip("link", "set", OUT_LINK, "up")
        subprocess.run(["ip", "netns", "exec", os.path.basename(OUTSIDE), "sh", "-c", " && ".join([
            "ip link set lo up", "ip link set eth0 up",
            f"ip addr add {OUT_PEER}/32 peer {OUT_HOST}/32 dev eth0",
            *[f"ip addr add {a}/32 dev lo" for a in stand_ins],
            f"ip route add default via {OUT_HOST}",
        ])], check=True, timeout=30)
        for address in stand_ins:
            _ip("route", "add", f"{address}/32", "via", OUT_PEER, "dev", OUT_LINK)
        listeners = [_listen(OUTSIDE, a) for a in stand_ins] + [_listen(OUTSIDE, RESOLVER, 53)]
        try:
            yield OUTSIDE
        finally:
            for s in listeners:
                s.close()
    finally:
        for address in stand_ins:
            _ip("route", "del", f"{address}/32", check=False)
        _ip("link", "del", OUT_LINK, check=False)
        _ip("netns", "del", os.path.basename(OUTSIDE), check=False)


def _links_in(path: str) -> dict[str, list[str]]:
    out = _ip("-j", "-n", os.path.basename(path), "addr", "show")
    return {i["ifname"]: [f"{a['local']}/{a['prefixlen']}" for a in i.get("addr_info", []) if a["family"] == "inet"]
            for i in json.loads(out.stdout)}


def test_plan_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="mode"):
        NetworkPlan(mode="bridge")  # type: ignore[arg-type]
    for bad in ("Kp-1", "kp1", "", "kpabcde", "1kp"):
        with pytest.raises(ValueError, match="prefix"):
            NetworkPlan(mode="none", prefix=bad)
    with pytest.raises(ValueError, match="too small"):
        NetworkPlan(mode="egress", addresses=IPv4Network("10.0.0.1/32"))
    with pytest.raises(ValueError, match="private"):
        NetworkPlan(mode="egress", addresses=IPv4Network("11.0.0.0/24"))
    plan = NetworkPlan(mode="egress", addresses=IPv4Network("10.201.0.0/16"))
    assert plan.pair(0) == (IPv4Address("10.201.0.0"), IPv4Address("10.201.0.1"))
    assert plan.pair(3) == (IPv4Address("10.201.0.6"), IPv4Address("10.201.0.7"))
    assert plan.slots == 32768
    assert plan.path(20001) == "/run/netns/kp-20001"


def test_namespace_made_once_per_user_and_removed(nets: UserNetworks) -> None:
    path = nets.ensure(UID_A)
    assert path == f"/run/netns/{PREFIX}-{UID_A}" and os.path.exists(path)
    inode = os.stat(path).st_ino
    assert nets.ensure(UID_A) == path and os.stat(path).st_ino == inode, "a second kernel joins the same namespace"
    links = _links_in(path)
    assert set(links) == {"lo", "eth0"}
    assert links["lo"] == ["127.0.0.1/8"]
    host_end, ns_end = _plan().pair(0)
    assert links["eth0"] == [f"{ns_end}/31"]
    host = json.loads(_ip("-j", "addr", "show", f"{PREFIX}{UID_A}").stdout)[0]
    assert [f"{a['local']}/{a['prefixlen']}" for a in host["addr_info"]] == [f"{host_end}/31"], "no IPv6 on the link"
    route = json.loads(_ip("-j", "-n", os.path.basename(path), "route", "show", "default").stdout)
    assert route[0]["gateway"] == str(host_end)
    elements = [o["set"] for o in nets.rules() if "set" in o and o["set"]["name"] == "kernel_links"][0]
    assert elements.get("elem") == [f"{PREFIX}{UID_A}"]
    nets.remove(UID_A)
    assert not os.path.exists(path)
    assert _ip("link", "show", f"{PREFIX}{UID_A}", check=False).returncode != 0
    assert docker_rules(_plan().comment) == []


def test_none_mode_has_only_loopback() -> None:
    _require()
    nets = UserNetworks(_plan(mode="none"))
    try:
        nets.start()
        path = nets.ensure(UID_A)
        assert _links_in(path) == {"lo": ["127.0.0.1/8"]}
        assert nets.rules() == [], "no firewall table without egress"
    finally:
        nets.close()
    assert not os.path.exists(path)


def test_rules_read_back(nets: UserNetworks) -> None:
    nets.ensure(UID_A)
    objs = nets.rules()
    sets = {o["set"]["name"]: o["set"] for o in objs if "set" in o}

    def prefixes(elem: list) -> set[str]:
        out = set()
        for e in elem:
            if isinstance(e, dict) and "prefix" in e:
                out.add(f"{e['prefix']['addr']}/{e['prefix']['len']}")
            elif isinstance(e, dict) and "range" in e:
                out.add("-".join(e["range"]))
            else:
                out.add(f"{e}/32" if ":" not in str(e) else str(e))
        return out

    assert prefixes(sets["blocked"]["elem"]) == {str(n) for n in BLOCKED_V4}
    for needed in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8"):
        assert needed in prefixes(sets["blocked"]["elem"])
    assert prefixes(sets["blocked6"]["elem"]) == {"fc00::/7", "fe80::/10"}
    assert sets["resolvers"]["elem"] == [RESOLVER]
    assert prefixes(sets["allowed"]["elem"]) == {f"{ALLOWED}/32"}
    chains = {o["chain"]["name"]: o["chain"] for o in objs if "chain" in o}
    assert chains["input"]["hook"] == "input" and chains["forward"]["hook"] == "forward"
    assert chains["postrouting"]["type"] == "nat"
    rules: dict[str, list[str]] = {}
    for o in objs:
        if "rule" in o:
            rules.setdefault(o["rule"]["chain"], []).append(json.dumps(o["rule"]["expr"]))
    # input: from a kernel link, only the resolvers' port 53; then everything is dropped
    assert '"drop"' in rules["input"][-1] and "kernel_links" in rules["input"][-1] and "daddr" not in rules["input"][-1]
    assert "@resolvers" in rules["input"][0] and "53" in rules["input"][0] and '"accept"' in rules["input"][0]
    fwd = rules["forward"]
    assert "oifname" in fwd[0] and "iifname" in fwd[0] and '"drop"' in fwd[0], "namespace to namespace: dropped"
    assert any(str(RANGE.network_address) in r and '"drop"' in r for r in fwd), "the kernels' own range: dropped"
    assert any("@blocked" in r and '"drop"' in r for r in fwd)
    assert any('"ipv6"' in r and '"drop"' in r for r in fwd), "no IPv6 at all"
    # the allow list comes before the blocks, and the resolvers before both
    index = {name: next(i for i, r in enumerate(fwd) if name in r) for name in ("@resolvers", "@allowed", '"@blocked"')}
    assert index["@resolvers"] < index["@allowed"] < index['"@blocked"']
    assert any("masquerade" in r for r in rules["postrouting"])
    # Docker's FORWARD policy would drop what our table lets through: accepted in DOCKER-USER
    has_docker = subprocess.run(["iptables", "-w", "10", "-n", "-L", "DOCKER-USER"], capture_output=True).returncode == 0
    ours = docker_rules(_plan().comment)
    if has_docker:
        assert any(f"-i {PREFIX}{UID_A}" in r and "ACCEPT" in r for r in ours), ours
        assert any(f"-o {PREFIX}{UID_A}" in r and "RELATED,ESTABLISHED" in r for r in ours), ours
    else:
        assert ours == []


def test_egress_reaches_only_what_it_may(nets: UserNetworks, outside: str) -> None:
    a = nets.ensure(UID_A)
    b = nets.ensure(UID_B)
    b_addr = str(nets.address(UID_B))
    host_end_a = str(_plan().pair(0)[0])
    # listeners: one in bob's namespace on his address and loopback; one on the host on its
    # address towards the stand-in outside, and on the gateway address alice's namespace uses
    bob_listeners = [_listen(b, b_addr), _listen(b, "127.0.0.1")]
    host_listeners = [_listen(None, OUT_HOST, PORT + 1), _listen(None, host_end_a, PORT + 1)]
    try:
        got = _probe_from(a, [
            (PUBLIC, PORT), (ALLOWED, PORT), (RESOLVER, 53),
            (METADATA, PORT), *[(p, PORT) for p in PRIVATE], (RESOLVER, PORT),
            (b_addr, PORT), ("127.0.0.1", PORT),
            (OUT_HOST, PORT + 1), (host_end_a, PORT + 1),
        ])
    finally:
        for s in bob_listeners + host_listeners:
            s.close()
    assert got[f"{PUBLIC}:{PORT}"] == "connected", got  # egress works: the blocks below are the rules'
    assert got[f"{ALLOWED}:{PORT}"] == "connected", got  # an allowed private range
    assert got[f"{RESOLVER}:53"] == "connected", got  # the resolver, on port 53
    for target in [METADATA, *PRIVATE]:
        assert got[f"{target}:{PORT}"] == "timeout", (target, got)
    assert got[f"{RESOLVER}:{PORT}"] == "timeout", got  # the resolver on any other port
    assert got[f"{b_addr}:{PORT}"] == "timeout", got  # another user's namespace
    assert got[f"127.0.0.1:{PORT}"] == "ConnectionRefusedError", got  # own loopback: bob's listener is not there
    assert got[f"{OUT_HOST}:{PORT + 1}"] == "timeout", got  # the host's own addresses
    assert got[f"{host_end_a}:{PORT + 1}"] == "timeout", got


def test_nothing_connects_into_a_namespace(nets: UserNetworks, outside: str) -> None:
    a = nets.ensure(UID_A)
    a_addr = str(nets.address(UID_A))
    listener = _listen(a, a_addr)
    try:
        got = _probe_from(outside, [(a_addr, PORT)])  # from the stand-in outside (forwarded)
        with pytest.raises(OSError):  # from the host itself (output chain)
            socket.create_connection((a_addr, PORT), timeout=1.5).close()
        mine = _probe_from(a, [(a_addr, PORT)])  # its own kernels reach it
    finally:
        listener.close()
    assert got == {f"{a_addr}:{PORT}": "timeout"}
    assert mine == {f"{a_addr}:{PORT}": "connected"}


def test_start_reaps_what_a_crashed_server_left() -> None:
    _require()
    first = UserNetworks(_plan())
    second = UserNetworks(_plan())
    try:
        first.start()
        path = first.ensure(UID_A)
        # "crash": `first` is dropped without close(); a new server with the same prefix starts
        notes = second.start()
        assert any("left by a previous server" in n for n in notes), notes
        assert not os.path.exists(path)
        assert _ip("link", "show", f"{PREFIX}{UID_A}", check=False).returncode != 0
        assert docker_rules(_plan().comment) == []
        assert [o for o in second.rules() if "set" in o and o["set"]["name"] == "kernel_links"][0]["set"].get("elem") is None
        assert second.ensure(UID_A) == path and os.path.exists(path)
    finally:
        second.close()
        first.close()
    assert second.rules() == []
    assert not any(n.startswith(f"{PREFIX}-") for n in os.listdir("/run/netns"))


def test_address_range_runs_out_with_a_clear_error() -> None:
    _require()
    nets = UserNetworks(_plan(addresses=ipaddress.IPv4Network(f"{RANGE.network_address}/31")))
    try:
        nets.start()
        nets.ensure(UID_A)
        with pytest.raises(Exception, match="no free addresses"):
            nets.ensure(UID_B)
        assert not os.path.exists(_plan().path(UID_B))
    finally:
        nets.close()


def test_docker_rules_put_back_when_docker_lost_them(nets: UserNetworks) -> None:
    if subprocess.run(["iptables", "-w", "10", "-n", "-L", "DOCKER-USER"], capture_output=True).returncode != 0:
        pytest.skip("Docker's DOCKER-USER chain is not on this host (dockerd not running)")
    nets.ensure(UID_A)
    comment = _plan().comment
    assert len(docker_rules(comment)) == 2
    assert nets.refresh_docker_rules() == 0, "nothing missing, nothing added"
    # what a dockerd started (or restarted with a new chain) after the namespace was made looks like
    out = subprocess.run(["iptables", "-w", "10", "-S", "DOCKER-USER"], capture_output=True, text=True).stdout
    import shlex

    for line in out.splitlines():
        if comment in line and f"-i {PREFIX}{UID_A}" in line:
            subprocess.run(["iptables", "-w", "10", "-D", *shlex.split(line)[1:]], check=True)
    assert len(docker_rules(comment)) == 1
    assert nets.refresh_docker_rules() == 1
    rules = docker_rules(comment)
    assert len(rules) == 2 and any(f"-i {PREFIX}{UID_A}" in r for r in rules), rules


def test_joining_a_namespace_that_is_not_one_fails_before_exec(tmp_path) -> None:
    _require()
    from sandbox import LaunchError

    marker = tmp_path / "ran"
    argv = ["/bin/sh", "-c", f"touch {marker}"]
    for bad in (str(tmp_path / "missing"), "/proc/self/ns/uts", "/etc/hostname"):
        with pytest.raises(LaunchError) as info:
            spawn(LaunchSpec(argv, {"PATH": "/usr/bin:/bin"}, "/", netns=bad))
        assert info.value.step == "network namespace", (bad, info.value)
    with pytest.raises(LaunchError, match="absolute"):
        spawn(LaunchSpec(argv, {}, "/", netns="relative/ns"))
    assert not marker.exists(), "the command never ran"


def test_firewall_changes_work_in_a_process_with_thousands_of_descriptors() -> None:
    """A server with a few hundred kernels holds more than 1024 descriptors; libnftables in-process
    (before 2026-12) then aborted the whole server at the next user's namespace (glibc's
    FD_SETSIZE check on its select()). Run in a child, so that a regression fails this test only."""
    _require()
    table = f"kptestfd{os.getpid()}"
    code = textwrap.dedent(f"""
        import os, resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1500)]
        assert max(held) > 1100
        from sandbox import _nft
        _nft.run("add table inet {table}\\n")
        assert any(t.get("table", {{}}).get("name") == "{table}" for t in _nft.list_json("tables"))
        _nft.run("delete table inet {table}\\n")
        print("ok")
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
