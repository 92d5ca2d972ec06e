"""A real kernelpool server process on a free port, its data folder, users and cleanup.

Used by the end-to-end tests, the benchmarks and scripts/conformance. The server is what users install: the
`kernelpool` console script of the virtual environment that runs the tests (scripts/test
installs a wheel built from this checkout into it), started from a neutral working folder with
no PYTHONPATH, so it imports the installed package, never this source tree. For quick local
runs, KERNELPOOL_TEST_FROM_SOURCE=1 starts `python -m kernelpool` from the checkout instead.
Users are created with the real CLI; cleanup removes the Unix accounts and cgroups it made,
also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROM_SOURCE = os.environ.get("KERNELPOOL_TEST_FROM_SOURCE") == "1"
# where the server and the CLI run: nothing importable there
NEUTRAL_CWD = ROOT if FROM_SOURCE else "/"


def kernelpool_command() -> list[str]:
    """The command that runs the `kernelpool` CLI under test."""
    if FROM_SOURCE:
        return [sys.executable, "-m", "kernelpool"]
    script = os.path.join(os.path.dirname(sys.executable), "kernelpool")
    if not os.access(script, os.X_OK):
        raise RuntimeError(f"{script} is missing: install kernelpool into this venv (scripts/test does)")
    return [script]


def sandbox_reason() -> str | None:
    """Why kernels cannot be sandboxed on this host (then servers run with --insecure-no-sandbox), or None."""
    from sandbox import probe

    host = probe()
    if not host.get("root"):
        return "not root: kernels cannot run as other uids here"
    if not (host.get("cgroup") or {}).get("writable"):
        return "no writable cgroup hierarchy with memory, cpu and pids on this host"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def answers(base: str, timeout: float = 1) -> bool:
    """True if the server at `base` (http://host:port) answers its /healthz."""
    try:
        return httpx2.get(f"{base}/healthz", timeout=timeout).status_code == 200
    except httpx2.HTTPError:
        return False


def make_data_dir() -> str:
    # traversable: kernels run as other uids and must reach their folders. Not under /tmp: a
    # kernel's /tmp is a private tmpfs, where the server keeps only the kernel's own folders
    # visible; a data folder elsewhere, as in production, keeps every path of it what it is
    path = tempfile.mkdtemp(prefix="kp-test-", dir="/var/tmp")
    os.chmod(path, 0o711)  # noqa: S103 (users' uids pass it to reach their folders; they list nothing)
    return path


@dataclass
class KernelpoolServer:
    data_dir: str
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    command: list[str] = field(default_factory=kernelpool_command)
    cwd: str = NEUTRAL_CWD  # where the CLI and the server run
    log_name: str = "server.log"  # in the data folder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server process's id; it must have been started."""
        if self.proc is None:
            raise RuntimeError("the server was not started")
        return self.proc.pid

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The CLI on this server's data folder; with `check`, a failure raises with what it said."""
        done = subprocess.run(
            [*self.command, *args, "--data-dir", self.data_dir],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.cwd,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kernelpool {' '.join(args)} exited with {done.returncode}: {done.stderr[-4000:]}")
        return done

    def add_user(self, name: str) -> str:
        out = self.cli("users", "add", name)
        token = out.stdout.strip()
        assert token.startswith("kp_") and "\n" not in token, out
        self.tokens[name] = token
        return token

    def uid(self, name: str) -> int:
        """The uid the store gives `name` (also without isolation: it names the user's run folder)."""
        for line in self.cli("users", "list").stdout.splitlines():
            fields = line.split("\t")
            if fields[0] == name:
                return int(fields[1].removeprefix("uid="))
        raise KeyError(name)

    def kernel_folders(self, name: str) -> list[str]:
        """The user's kernel folders, DATA/run/<uid>/<kernel id> (see sandbox.rundir)."""
        run = os.path.join(self.data_dir, "run", str(self.uid(name)))
        return sorted(n for n in os.listdir(run) if n != "tmp")

    def start(self, *extra: str, wait: float = 60, port: int | None = None) -> None:
        """Start `kernelpool serve` on `port` (default: a free one; a test passes one it chose
        earlier when something must know the URL first, such as an OpenID provider)."""
        self.port = port or free_port()
        self.log_path = os.path.join(self.data_dir, self.log_name)
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [*self.command, "serve", "--data-dir", self.data_dir, "--port", str(self.port), *extra],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=self.cwd,
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.command} exited with {self.proc.returncode}:\n{self.log()}")
            if answers(self.base):
                return
            time.sleep(0.1)
        raise RuntimeError(f"server {self.command} did not answer /healthz in {wait} s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-20000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def cleanup(self) -> None:
        """Stop the server and remove every user it has (their Unix accounts too), then the data folder."""
        self.stop()
        names = set(self.tokens)
        if os.path.exists(os.path.join(self.data_dir, "kernelpool.db")):
            listed = self.cli("users", "list", check=False).stdout
            names |= {line.split("\t")[0] for line in listed.splitlines() if line}
        for name in sorted(names):
            self.cli("users", "remove", name, check=False)
        self.reap_network()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def reap_network(self) -> int:
        """Remove what a server that died (killed, crashed) left of its users' network namespaces:
        its prefix is this test's own, so no later server would reap them. Returns how many."""
        prefix = self.env.get("KERNELPOOL_NETWORK_PREFIX")
        if not prefix or os.geteuid() != 0:
            return 0
        from sandbox.network import NetworkPlan, UserNetworks

        reaped: list[int] = []

        def reap() -> None:
            with contextlib.suppress(Exception):  # cleanup: what is left is reported by the test that made it
                reaped.append(UserNetworks(NetworkPlan(mode="egress", prefix=prefix)).reap())

        # in a thread of its own: pyroute2 runs an event loop, which fails in a thread that has one
        # (cleanup called from an async test) and then reaped nothing
        thread = threading.Thread(target=reap)
        thread.start()
        thread.join()
        return reaped[0] if reaped else 0


_servers_made = 0


def network_names(n: int | None = None) -> tuple[str, str]:
    """(network_prefix, kernel_network_range) of their own for one test server: servers of one test
    run may overlap in time, and their namespaces, links and nftables tables must not meet."""
    global _servers_made
    if n is None:
        _servers_made += 1
        n = _servers_made
    k = (os.getpid() * 64 + n) % 4096
    return f"t{k}n", f"10.{224 + k // 256}.{k % 256}.0/24"


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNELPOOL_")}
    env.pop("PYTHONPATH", None)
    if FROM_SOURCE:
        env["PYTHONPATH"] = ROOT
    # test accounts: a range and prefix of their own, so cleanup can never touch anything else
    env.setdefault("KERNELPOOL_UID_MIN", "62000")
    env.setdefault("KERNELPOOL_UID_MAX", "62999")
    env.setdefault("KERNELPOOL_ACCOUNT_PREFIX", f"kpt{os.getpid() % 100000}-")
    env.setdefault("KERNELPOOL_CGROUP_PREFIX", f"kernelpool-test-{os.getpid()}")
    prefix, addresses = network_names()
    env.setdefault("KERNELPOOL_NETWORK_PREFIX", prefix)
    env.setdefault("KERNELPOOL_KERNEL_NETWORK_RANGE", addresses)
    env.update(extra)
    return env
