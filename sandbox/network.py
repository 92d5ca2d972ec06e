"""Per-user network namespaces: each user's kernels share one namespace of their own.

`UserNetworks` is the mechanism (kernelpool decides which user and when). `ensure(uid)` makes
the namespace of a uid if it does not exist yet and returns the path of its nsfs file, which
`launcher.enter` joins with setns() before dropping privileges; `remove(uid)` takes it down.
A namespace has its own loopback, so nothing listening in it, on 127.0.0.1 or anywhere, can be
reached from another user's kernels or from the host's network namespace.

Modes (`NetworkPlan.mode`):

- ``"none"``: loopback only.
- ``"egress"``: also a veth pair: the host end `<prefix><uid>` holds the even address of a /31
  taken from `NetworkPlan.addresses`, the namespace end `eth0` the odd one and a default route
  through the host end. One nftables table per server, `inet <prefix>_kernels`, lets the
  namespaces out (masquerade) to public addresses only: the host's own addresses (input from a
  kernel interface is dropped, the server's port included), the other namespaces, link-local,
  private, shared, loopback, multicast and reserved IPv4 ranges are dropped, and so is all IPv6.
  Exceptions: the resolvers given (the host's /etc/resolv.conf) on port 53, TCP and UDP, and
  the ranges in `NetworkPlan.allow`. Nothing from outside may open a connection into a
  namespace. Where Docker runs, the iptables FORWARD policy is DROP; each host end is then
  also accepted in Docker's `DOCKER-USER` chain (through the `iptables` command: iptables has
  no library interface), with a comment naming this server's prefix so that start-up can clear
  what a crashed server left.

Names hold uids, never user names: the namespace file is `<rundir>/<prefix>-<uid>`.
Namespaces are made in a short-lived thread of the server: a network namespace is per thread,
so the thread can unshare, bind its namespace to the file, set it up and switch back, and the
server's other threads never leave the host's namespace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any, TypeVar

from sandbox import _docker, _libc, _nft
from sandbox._docker import docker_rules
from sandbox.errors import NetworkError
from sandbox.netplan import BLOCKED_V4, BLOCKED_V6, NetworkPlan, resolvers_from

__all__ = ["BLOCKED_V4", "BLOCKED_V6", "NetworkError", "NetworkPlan", "UserNetworks", "docker_rules", "resolvers_from"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class UserNetworks:
    """The namespaces of one server. `start()` once, `ensure`/`remove` per user, `close()` at the end.

    Thread-safe: kernelpool calls it from worker threads, one user at a time per uid.
    """

    def __init__(self, plan: NetworkPlan) -> None:
        self.plan = plan
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()
        self._started = False

    # ---- server lifetime --------------------------------------------------------------

    def start(self) -> list[str]:
        """Clear what a crashed server with the same prefix left, then (egress) turn on
        forwarding and install the firewall table. Returns notes worth logging."""
        notes: list[str] = []
        reaped = self.reap()
        if reaped:
            notes.append(f"removed {reaped} network namespace(s) or link(s) left by a previous server")
        if self.plan.mode == "egress":
            why = _nft.available()
            if why is not None:
                raise NetworkError(f"kernel_network 'egress' needs nftables: {why}")
            if _read("/proc/sys/net/ipv4/ip_forward") != "1":
                try:
                    _write("/proc/sys/net/ipv4/ip_forward", "1")
                except OSError as exc:
                    raise NetworkError(
                        f"kernel_network 'egress' needs net.ipv4.ip_forward=1 and it could not be set ({_describe(exc)}): "
                        "set it on the host (sysctl -w net.ipv4.ip_forward=1) or, in Docker, with "
                        "--sysctl net.ipv4.ip_forward=1") from exc
                notes.append("set net.ipv4.ip_forward=1 (kernels' traffic is routed and masqueraded)")
            try:
                _nft.run(self.plan.ruleset())
            except _nft.NftError as exc:
                raise NetworkError(f"could not install nftables table {self.plan.table}: {exc}") from exc
            if _docker.chain_exists():
                notes.append(f"Docker's {_docker.CHAIN} chain found: kernel links are accepted there")
        self._started = True
        return notes

    def reap(self) -> int:
        """Remove every namespace, host link, table and Docker rule of this prefix; returns how many
        namespaces and links. Safe to call when nothing is left."""
        count = 0
        pattern = re.compile(re.escape(self.plan.prefix) + r"-(\d+)")
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.plan.rundir):
                if pattern.fullmatch(name):
                    _remove_nsfs(os.path.join(self.plan.rundir, name))
                    count += 1
        links = re.compile(re.escape(self.plan.prefix) + r"\d+")
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if name and links.fullmatch(name) and kind == "veth":
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=link["index"])
                        count += 1
        if _nft.available() is None:
            with contextlib.suppress(_nft.NftError):
                _nft.run(f"add table inet {self.plan.table}\ndelete table inet {self.plan.table}\n")
        _docker.remove_all(self.plan.comment)
        with self._lock:
            self._slots.clear()
        return count

    def close(self) -> None:
        """Remove every namespace this server made, its table and Docker rules. Forwarding stays on."""
        for uid in list(self._slots):
            try:
                self.remove(uid)
            except NetworkError as exc:
                log.warning("%s", exc)
        self.reap()
        self._started = False

    # ---- per user ----------------------------------------------------------------------

    def exists(self, uid: int) -> bool:
        return os.path.exists(self.plan.path(uid))

    def present(self, uid: int) -> bool:
        """Whether anything of uid's namespace is on the host: its nsfs file or its host link
        (kernelpool's user removal, in the CLI, asks before it calls `remove`)."""
        if self.exists(uid):
            return True
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=self.plan.host_link(uid)))

    def ensure(self, uid: int) -> str:
        """The nsfs path of uid's namespace, made (with its link and rules) if it does not exist."""
        path = self.plan.path(uid)
        with self._lock:
            if uid in self._slots and os.path.exists(path):
                return path
            slot = self._slots.get(uid)
            if slot is None:
                taken = set(self._slots.values())
                slot = next((i for i in range(self.plan.slots) if i not in taken), None)
                if slot is None:
                    raise NetworkError(f"no free addresses left in {self.plan.addresses} for another user's namespace")
                self._slots[uid] = slot
        try:
            if os.path.exists(path):  # left by a crash between two of our own calls
                self._teardown(uid)
            _in_thread(self._create, uid, slot)
        except BaseException:
            with self._lock:
                self._slots.pop(uid, None)
            raise
        return path

    def remove(self, uid: int) -> None:
        """Take down uid's namespace, link and rules (processes still inside keep only loopback)."""
        try:
            self._teardown(uid)
        finally:
            with self._lock:
                self._slots.pop(uid, None)

    def refresh_docker_rules(self) -> int:
        """Put back the DOCKER-USER rules of live namespaces where they are missing (dockerd started,
        or restarted with a fresh chain, after the namespace was made); returns how many were added."""
        if self.plan.mode != "egress" or not _docker.chain_exists():
            return 0
        listing = _docker.iptables("-S", _docker.CHAIN).stdout
        with self._lock:
            uids = list(self._slots)
        added = 0
        for uid in uids:
            link = self.plan.host_link(uid)
            if f"-i {link} " not in listing or f"-o {link} " not in listing:
                _docker.change_rules("-D", link, self.plan.comment, missing_ok=True)  # a half pair would stay twice
                _docker.change_rules("-I", link, self.plan.comment)
                added += 1
        return added

    def address(self, uid: int) -> IPv4Address | None:
        """The namespace end's address of uid (egress mode, namespace present), else None."""
        slot = self._slots.get(uid)
        if slot is None or self.plan.mode != "egress":
            return None
        return self.plan.pair(slot)[1]

    def rules(self) -> list[dict[str, Any]]:
        """This server's nftables table as nft JSON objects ([] when there is none)."""
        try:
            return _nft.list_json(f"table inet {self.plan.table}")
        except _nft.NftError:
            return []

    # ---- the work ----------------------------------------------------------------------

    def _create(self, uid: int, slot: int) -> None:
        # runs in a thread of its own (see the module's docstring)
        from pyroute2 import IPRoute
        from pyroute2 import netns as pr_netns

        plan = self.plan
        path = plan.path(uid)
        link = plan.host_link(uid) if plan.mode == "egress" else None
        host_addr, ns_addr = plan.pair(slot)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        made_ns = made_link = False
        try:
            with IPRoute() as host:  # opened before the unshare: it stays in the host's namespace
                _libc.unshare(_libc.CLONE_NEWNET)
                try:
                    pr_netns.attach(path, "thread-self")
                    made_ns = True
                    with IPRoute() as ns:
                        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                        if link is not None:
                            host.link("add", ifname=link, kind="veth", peer={"ifname": "eth0", "net_ns_fd": path})
                            made_link = True
                            index = host.link_lookup(ifname=link)[0]
                            _no_ipv6(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6", netns_of=home)
                            host.addr("add", index=index, address=str(host_addr), prefixlen=31)
                            host.link("set", index=index, state="up")
                            # this thread is in the namespace: /proc/sys/net is the namespace's own
                            _no_ipv6("/proc/sys/net/ipv6/conf/eth0/disable_ipv6")
                            eth = ns.link_lookup(ifname="eth0")[0]
                            ns.addr("add", index=eth, address=str(ns_addr), prefixlen=31)
                            ns.link("set", index=eth, state="up")
                            ns.route("add", dst="0.0.0.0/0", gateway=str(host_addr))
                finally:
                    _libc.setns(home, _libc.CLONE_NEWNET)
            if link is not None:
                _nft.run(f'add element inet {plan.table} kernel_links {{ "{link}" }}')
                if _docker.chain_exists():
                    _docker.change_rules("-I", link, plan.comment)
        except BaseException as exc:
            if made_link or made_ns:
                with contextlib.suppress(BaseException):
                    self._teardown(uid)
            if isinstance(exc, NetworkError):
                raise
            raise NetworkError(f"could not make the network namespace {path}: {_describe(exc)}", path=path) from exc
        finally:
            os.close(home)

    def _teardown(self, uid: int) -> None:
        plan = self.plan
        path = plan.path(uid)
        problems: list[str] = []
        if plan.mode == "egress":
            link = plan.host_link(uid)
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=link)
                if found:
                    try:
                        ipr.link("del", index=found[0])
                    except Exception as exc:
                        if ipr.link_lookup(ifname=link):  # else removed meanwhile by another teardown
                            problems.append(f"link {link}: {_describe(exc)}")
            with contextlib.suppress(_nft.NftError):  # absent element or table: nothing to remove
                _nft.run(f'delete element inet {plan.table} kernel_links {{ "{link}" }}')
            _docker.change_rules("-D", link, plan.comment, missing_ok=True)
        if os.path.exists(path):
            try:
                _remove_nsfs(path)
            except FileNotFoundError:
                pass  # removed meanwhile: the server's teardown and `users remove` can race to it
            except OSError as exc:
                problems.append(f"{path}: {_describe(exc)}")
        if problems:
            raise NetworkError("could not remove the network namespace: " + "; ".join(problems), path=path)

# ---- helpers -----------------------------------------------------------------------------


def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=body, name="kernelpool-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _remove_nsfs(path: str) -> None:
    from pyroute2 import netns as pr_netns

    pr_netns.remove(path)  # detach the bind mount, then unlink the file


def _no_ipv6(path: str, netns_of: int | None = None) -> None:
    # no link-local IPv6 address on either end. Best effort: /proc/sys is read-only in a container,
    # and the firewall drops all IPv6 from kernel links anyway
    with contextlib.suppress(OSError):
        _write(path, "1", netns_of)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _write(path: str, value: str, netns_of: int | None = None) -> None:
    # /proc/sys/net follows the calling thread's network namespace; `netns_of` switches there first
    if netns_of is None:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
        return
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _libc.setns(netns_of, _libc.CLONE_NEWNET)
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(value)
        finally:
            _libc.setns(here, _libc.CLONE_NEWNET)
    finally:
        os.close(here)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename!r}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"
