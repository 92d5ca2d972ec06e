"""A real HAProxy (Debian's 2.6) in front of replicas on loopback, with kernelpool's routing rules
(deploy/haproxy/routing.cfg, the same lines as the Compose and Kubernetes configurations) and an
admin socket for its runtime API. Used by tests/test_replicas.py and the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time

from testkit.server import ROOT, free_port

ROUTING = os.path.join(ROOT, "deploy", "haproxy", "routing.cfg")


def routing_rules(maps: str) -> list[str]:
    """The frontend's routing lines, with the maps' folder filled in."""
    with open(ROUTING) as f:
        return [line.rstrip().replace("MAPS", maps) for line in f if line.strip() and not line.startswith("#")]


def unavailable() -> str | None:
    return None if shutil.which("haproxy") else "haproxy is not installed (apt-get install haproxy; .ci/run does)"


class HAProxy:
    def __init__(self, replicas: dict[str, int]) -> None:
        self.folder = tempfile.mkdtemp(prefix="kp-haproxy-")
        self.maps = os.path.join(self.folder, "maps")
        self.admin = os.path.join(self.folder, "admin.sock")
        self.replicas = dict(replicas)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = ["global", f"    stats socket {self.admin} mode 600 level admin", "    maxconn 4000",
                 "defaults", "    mode http", "    timeout connect 5s", "    timeout client 1h", "    timeout server 1h",
                 "    timeout tunnel 1h", "    option http-keep-alive",
                 "frontend mcp", f"    bind 127.0.0.1:{self.port}", *routing_rules(self.maps)]
        for name, port in self.replicas.items():
            lines += [f"backend {name}", "    option httpchk GET /healthz", f"    server {name} 127.0.0.1:{port} check inter 1s"]
        lines += ["backend any", "    balance roundrobin", "    option httpchk GET /healthz",
                  "    cookie kp_replica insert indirect nocache httponly preserve"]
        lines += [f"    server {n} 127.0.0.1:{p} check inter 1s cookie {n}" for n, p in self.replicas.items()]
        return "\n".join(lines) + "\n"

    def start(self) -> HAProxy:
        os.makedirs(self.maps)
        for name in ("users.map", "tokens.map"):
            open(os.path.join(self.maps, name), "w").close()
        path = os.path.join(self.folder, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(self.config())
        check = subprocess.run(["haproxy", "-c", "-f", path], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(os.path.join(self.folder, "haproxy.log"), "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", path], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.admin) and _listens(self.port)):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)
        return self

    def runtime(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.admin)
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def show_map(self, name: str) -> dict[str, str]:
        out = self.runtime(f"show map {os.path.join(self.maps, name)}")
        return {p[1]: p[2] for p in (line.split() for line in out.splitlines()) if len(p) == 3}

    def log(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.folder, "haproxy.log")) as f:
            return f.read()[-4000:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.folder, ignore_errors=True)


def _listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
