"""Network isolation end to end: each user's kernels share a network namespace of their own.

Regression for the attack of 2026-11-27: alice's kernel found bob's kernels' TCP listeners
(ipykernel's IOPub pipe on 127.0.0.1, and a socket bob's own code listened on) in
/proc/net/tcp, connected, and sent a ZMTP frame declaring 700 MiB, killing bob's kernels. Here
she must not see, reach or flood them, and bob's kernel must carry on with its state. Traffic
goes only to loopback, to addresses inside the namespaces the server made, and (one test) to
the package registry.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx2
import pytest

from testkit.client import run_json
from testkit.server import KernelpoolServer, make_data_dir, server_env
from tests.conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"network isolation needs the sandbox: {SANDBOX_SKIP}")


def _host_reason() -> str | None:
    from sandbox import probe

    host = probe()
    if not host.get("netns"):
        return "this host cannot create network namespaces"
    if not host.get("nftables"):
        return "nftables (the nft command) is not usable here"
    return None


HOST_SKIP = _host_reason()


@pytest.fixture(scope="module")
def net() -> Iterator[KernelpoolServer]:
    if HOST_SKIP:
        pytest.skip(HOST_SKIP)
    server = KernelpoolServer(make_data_dir(), server_env(KERNELPOOL_POOL_SIZE="0", KERNELPOOL_EXECUTE_TIMEOUT="60"))
    try:
        server.add_user("alice")
        server.add_user("bob")
        server.start()  # kernel_network: the default, "egress"
        yield server
    finally:
        server.cleanup()


async def run_as(server: KernelpoolServer, user: str, code: str, notebook: str = "net.ipynb") -> dict:
    """Run `code` in `user`'s kernel for `notebook`; it prints one JSON line, returned parsed."""
    return await run_json(server, user, code, notebook)




def namespace_of(server: KernelpoolServer, user: str) -> str:
    uid = pwd.getpwnam(server.env["KERNELPOOL_ACCOUNT_PREFIX"] + user).pw_uid
    return f"/run/netns/{server.env['KERNELPOOL_NETWORK_PREFIX']}-{uid}"


# lists this namespace's TCP listeners: (port, uid) from /proc/net/tcp
LISTENERS = '''
import json, os, socket
def listeners():
    out = []
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            parts = line.split()
            if parts[3] == "0A":
                out.append((int(parts[1].split(":")[1], 16), int(parts[7])))
    return out
def addresses():
    import fcntl, struct
    got = {}
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
                got[name] = socket.inet_ntoa(raw[20:24])
            except OSError:
                got[name] = None
    return got
'''

BOB_SETUP = LISTENERS + '''
import threading
SECRET = "bob-secret"
_listener = socket.socket()
_listener.bind(("127.0.0.1", 0))
_listener.listen(8)
def _serve():
    while True:
        conn, _ = _listener.accept()
        conn.sendall(b"bob-here")
        conn.close()
threading.Thread(target=_serve, daemon=True).start()
print(json.dumps({"uid": os.getuid(), "pid": os.getpid(), "plain": _listener.getsockname()[1],
                  "listeners": listeners(), "addresses": addresses()}))
'''

ATTACK = LISTENERS + '''
import socket, struct
def attempt(f):
    try:
        return f()
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return type(e).__name__
def connect(host, port):
    socket.create_connection((host, port), timeout=2).close()
    return "connected"
def flood(host, port):
    # the 2026-11-27 attack: a ZMTP 3.0 greeting, then one frame that declares 700 MiB
    s = socket.create_connection((host, port), timeout=2)
    try:
        s.sendall(b"\\xff" + b"\\0" * 8 + b"\\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\\0") + b"\\0" * 32)
        s.sendall(b"\\x06" + struct.pack(">Q", 700 * 1024 * 1024))
        chunk = b"\\0" * (1 << 20)
        for _ in range(32):
            s.sendall(chunk)
    finally:
        s.close()
    return "sent"
bob_ports, bob_uid, bob_addr = BOB_PORTS, BOB_UID, BOB_ADDR
mine = listeners()
my_ports = {p for p, u in mine if u == os.getuid()}
print(json.dumps({
    "uid": os.getuid(),
    "seen_bob_listeners": [p for p, u in mine if u == bob_uid],
    "my_listeners": sorted(my_ports),
    "addresses": addresses(),
    "connect_loopback": {p: attempt(lambda p=p: connect("127.0.0.1", p)) for p in bob_ports if p not in my_ports},
    "flood_loopback": {p: attempt(lambda p=p: flood("127.0.0.1", p)) for p in bob_ports if p not in my_ports},
    "connect_bob_address": {p: attempt(lambda p=p: connect(bob_addr, p)) for p in bob_ports},
    "own_loopback": {p: attempt(lambda p=p: connect("127.0.0.1", p)) for p in sorted(my_ports)},
}))
'''


async def test_another_users_listeners_cannot_be_seen_reached_or_flooded(net: KernelpoolServer) -> None:
    bob = await run_as(net, "bob", BOB_SETUP, "secret.ipynb")
    bob_ports = sorted({p for p, _ in bob["listeners"]})
    assert bob["plain"] in bob_ports and len(bob_ports) >= 2, bob  # his own socket and ipykernel's IOPub pipe
    assert set(bob["addresses"]) == {"lo", "eth0"}, bob
    assert os.path.exists(namespace_of(net, "bob"))

    attack = ATTACK.replace("BOB_PORTS", repr(bob_ports)).replace("BOB_UID", repr(bob["uid"])) \
                   .replace("BOB_ADDR", repr(bob["addresses"]["eth0"]))
    alice = await run_as(net, "alice", attack, "attack.ipynb")
    assert alice["uid"] != bob["uid"]
    assert alice["addresses"]["eth0"] != bob["addresses"]["eth0"], "each user has a namespace of their own"
    assert alice["seen_bob_listeners"] == [], "bob's sockets do not even show in alice's /proc/net/tcp"
    assert alice["connect_loopback"] and set(alice["connect_loopback"].values()) == {"ConnectionRefusedError"}, alice
    assert set(alice["flood_loopback"].values()) == {"ConnectionRefusedError"}, alice
    assert set(alice["connect_bob_address"].values()) == {"timeout"}, alice  # dropped between namespaces
    # control: the same connect works on her own loopback, so the refusals above are the namespaces'
    assert alice["own_loopback"] and set(alice["own_loopback"].values()) == {"connected"}, alice

    # bob's kernel carries on, with its state, and its listener still serves bob
    check = f'''
import json, os, socket
s = socket.create_connection(("127.0.0.1", {bob["plain"]}), timeout=5); got = s.recv(16).decode(); s.close()
print(json.dumps({{"secret": SECRET, "pid": os.getpid(), "got": got}}))
'''
    after = await run_as(net, "bob", check, "secret.ipynb")
    assert after == {"secret": "bob-secret", "pid": bob["pid"], "got": "bob-here"}


async def test_a_users_kernels_share_one_namespace(net: KernelpoolServer) -> None:
    first = await run_as(net, "alice", LISTENERS + '''
import threading
_l = socket.socket(); _l.bind(("127.0.0.1", 0)); _l.listen(4)
threading.Thread(target=lambda: [_l.accept()[0].sendall(b"first") for _ in iter(int, 1)], daemon=True).start()
print(json.dumps({"port": _l.getsockname()[1], "pid": os.getpid(), "addresses": addresses()}))
''', "one.ipynb")
    second = await run_as(net, "alice", f'''
import json, os, socket
s = socket.create_connection(("127.0.0.1", {first["port"]}), timeout=5)
print(json.dumps({{"got": s.recv(16).decode(), "pid": os.getpid()}}))
''', "two.ipynb")
    assert second["pid"] != first["pid"], "two kernels"
    assert second["got"] == "first", "alice's kernels share her loopback"
    health = httpx2.get(f"{net.base}/healthz").json()
    assert health["isolation"]["network"]["mode"] == "egress"
    assert health["isolation"]["network"]["namespaces"] >= 1


def test_the_server_port_and_host_are_out_of_reach(net: KernelpoolServer) -> None:
    got = asyncio.run(run_as(net, "alice", f'''
import json, socket
def attempt(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return type(e).__name__
gw = [l.split()[2] for l in open("/proc/net/route").read().splitlines()[1:] if l.split()[1] == "00000000"][0]
gw = socket.inet_ntoa(bytes.fromhex(gw)[::-1])
print(json.dumps({{"loopback": attempt("127.0.0.1", {net.port}), "gateway": gw, "via_gateway": attempt(gw, {net.port})}}))
''', "host.ipynb"))
    assert got["loopback"] == "ConnectionRefusedError", got  # her own loopback: no server there
    assert got["via_gateway"] == "timeout", got  # the host's address on her link: dropped


def test_namespace_goes_with_the_users_last_kernel(fresh_server: KernelpoolServer) -> None:
    if HOST_SKIP:
        pytest.skip(HOST_SKIP)
    kp = fresh_server
    kp.env.update(KERNELPOOL_POOL_SIZE="0", KERNELPOOL_KERNEL_IDLE_TIMEOUT="2", KERNELPOOL_HOUSEKEEPING_INTERVAL="1")
    kp.add_user("carol")
    kp.start()
    path = namespace_of(kp, "carol")
    table = f"{kp.env['KERNELPOOL_NETWORK_PREFIX']}_kernels"
    assert not os.path.exists(path), "no namespace before the first kernel"
    got = asyncio.run(run_as(kp, "carol", "import json; print(json.dumps({'ok': 1}))"))
    assert got == {"ok": 1}
    assert os.path.exists(path)
    deadline = time.monotonic() + 30
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not os.path.exists(path), "culling carol's only kernel removed her namespace"
    # and the next kernel makes it again
    assert asyncio.run(run_as(kp, "carol", "import json; print(json.dumps({'ok': 2}))")) == {"ok": 2}
    assert os.path.exists(path)
    assert subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode == 0
    kp.stop()
    assert not os.path.exists(path), "server shutdown removes the namespaces"
    assert subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode != 0, \
        "and its nftables table"


def _registry_reachable() -> str | None:
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, "six"],
                             capture_output=True, text=True, timeout=120)
    return None if out.returncode == 0 else f"the package registry is not reachable from this host: {out.stderr[-300:]}"


async def test_egress_reaches_the_package_registry(net: KernelpoolServer) -> None:
    why = _registry_reachable()
    if why:
        pytest.skip(why)
    got = await run_as(net, "alice", '''
import json, subprocess, sys, tempfile
d = tempfile.mkdtemp()
r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d, "six"],
                   capture_output=True, text=True, timeout=120)
import os
print(json.dumps({"rc": r.returncode, "files": os.listdir(d), "err": r.stderr[-500:]}))
''', "pip.ipynb")
    assert got["rc"] == 0, got
    assert any(name.startswith("six-") for name in got["files"]), got


async def test_doctor_reports_network_isolation(net: KernelpoolServer) -> None:
    await run_as(net, "bob", "import json; print(json.dumps({'ok': 1}))", "doctor.ipynb")  # a live namespace
    report = json.loads(net.cli("doctor", "--json").stdout)
    got = report["network"]
    assert got["mode"] == "egress" and got["isolated"] is True
    assert got["range"] == net.env["KERNELPOOL_KERNEL_NETWORK_RANGE"]
    assert got["table_installed"] is True, "the running server's table is read back"
    assert got["live_namespaces"] >= 1
    assert report["host"]["nftables"] is True and report["host"]["ip_forward"] is True
    assert report["in_force"]["network"] == "egress"
    text = net.cli("doctor").stdout
    assert "network in force:    egress: a network namespace per user" in text
    # and says plainly when kernels share the host's network
    out = subprocess.run([sys.executable, "-m", "kernelpool", "doctor", "--json", "--data-dir", net.data_dir],
                         env=net.env | {"KERNELPOOL_KERNEL_NETWORK": "host"}, capture_output=True, text=True, timeout=60)
    host = json.loads(out.stdout)
    assert host["network"]["mode"] == "host" and host["network"]["isolated"] is False
    assert "share the host's network namespace" in host["network"]["why"]
