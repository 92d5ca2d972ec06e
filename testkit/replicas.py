"""Several real kernelpool replicas on loopback, one PostgreSQL database, one real HAProxy in front
(no Docker): what tests/test_replicas.py and `python -m benchmarks.sessions --replicas` run.

Each replica is a `kernelpool serve` process with a data folder, cgroup prefix and network names
of its own (as separate machines would have); they share the uid range and account names (one
host's passwd, as on one machine). The CLI runs with a replica's environment, as `docker exec
REPLICA kernelpool ...` would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from testkit.haproxy import HAProxy
from testkit.postgres import PostgresServer
from testkit.server import KernelpoolServer, free_port, make_data_dir, network_names, server_env


class Cluster:
    def __init__(self, postgres: PostgresServer, names: tuple[str, ...] = ("r1", "r2"), **env: str) -> None:
        self.postgres = postgres
        self.database = postgres.new_database()
        ports = {name: free_port() for name in names}
        self.haproxy = HAProxy(ports)
        # the URL clients use is the proxy's, as in a deployment: OAuth's issuer and resource name it
        env.setdefault("KERNELPOOL_PUBLIC_URL", self.haproxy.base)
        common = server_env(KERNELPOOL_DATABASE_URL=self.database, KERNELPOOL_HAPROXY_ADMIN=self.haproxy.admin,
                            KERNELPOOL_HAPROXY_MAPS=self.haproxy.maps, **env)
        self.replicas: dict[str, KernelpoolServer] = {}
        for name in names:
            prefix, addresses = network_names()
            replica_env = dict(common, KERNELPOOL_REPLICA=name, KERNELPOOL_NETWORK_PREFIX=prefix,
                               KERNELPOOL_KERNEL_NETWORK_RANGE=addresses,
                               KERNELPOOL_CGROUP_PREFIX=f"{common['KERNELPOOL_CGROUP_PREFIX']}-{name}")
            self.replicas[name] = KernelpoolServer(make_data_dir(), replica_env, port=ports[name])
        self.tokens: dict[str, str] = {}
        self.homes: dict[str, str] = {}

    @property
    def url(self) -> str:
        """The MCP URL through HAProxy."""
        return f"{self.haproxy.base}/mcp"

    def start(self, *extra: str) -> Cluster:
        self.haproxy.start()
        for server in self.replicas.values():
            server.start(*extra, port=server.port)
        return self

    def cli(self, *args: str, on: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.replicas[on or next(iter(self.replicas))].cli(*args, check=check)

    def add_user(self, name: str, replica: str | None = None) -> str:
        out = self.cli("users", "add", name, *(["--replica", replica] if replica else []))
        token = out.stdout.strip()
        assert token.startswith("kp_"), out
        self.tokens[name] = token
        self.homes[name] = self.home(name)
        return token

    def home(self, name: str) -> str:
        for line in self.cli("users", "list").stdout.splitlines():
            fields = line.split("\t")
            if fields[0] == name:
                return next(f.removeprefix("home=") for f in fields if f.startswith("home="))
        raise KeyError(name)

    def folder(self, user: str, replica: str) -> str:
        return os.path.join(self.replicas[replica].data_dir, "users", user)

    def cleanup(self) -> None:
        for server in self.replicas.values():
            server.stop()
        with contextlib.suppress(Exception):
            listed = self.cli("users", "list", check=False).stdout.splitlines()
            for line in listed:
                fields = line.split("\t")
                home = next((f.removeprefix("home=") for f in fields if f.startswith("home=")), None)
                self.cli("users", "remove", fields[0], on=home if home in self.replicas else None, check=False)
        for server in self.replicas.values():
            server.reap_network()
            shutil.rmtree(server.data_dir, ignore_errors=True)
        self.haproxy.stop()
