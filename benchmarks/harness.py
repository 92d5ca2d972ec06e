"""A benchmark's world: data folders, users made with the real CLI, real servers, and cleanup.

Built on `testkit` (`KernelpoolServer`, `mcp_client`). Accounts get a uid range and a
name prefix of their own (63000-63999, `kpb<pid>-`; the tests use 62000-62999) and cgroups
the prefix `kernelpool-bench-<pid>`, so that cleanup can never touch anything else. Cleanup
removes the users (their Unix accounts too), the data folders, and checks that no kernel
process or cgroup is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import psutil

from benchmarks.procs import RssSampler, cgroup_tree_dirs, kernel_processes, memory_cgroup_of
from testkit.server import NEUTRAL_CWD, KernelpoolServer, kernelpool_command, sandbox_reason, server_env

UID_MIN, UID_MAX = 63000, 63999
_CLI_WORKERS = 4  # users are added by several CLI processes at once, each in a uid slice of its own


def sandbox_args() -> tuple[list[str], str]:
    """`serve` options for this host, and the isolation in words (as the tests decide it)."""
    if sandbox_reason() is None:
        return [], "sandbox (own uid per user, cgroups)"
    return ["--insecure-no-sandbox"], "none (--insecure-no-sandbox: not root or no writable cgroups)"


@dataclass
class DataDir:
    """One data folder and the users added to it; a server runs on one data folder at a time."""

    path: str
    env: dict[str, str]
    tokens: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*kernelpool_command(), *args, "--data-dir", self.path],
            env=env or self.env, capture_output=True, text=True, timeout=timeout, cwd=NEUTRAL_CWD,
        )

    def _add(self, name: str, uid_lo: int, uid_hi: int) -> None:
        env = dict(self.env, KERNELPOOL_UID_MIN=str(uid_lo), KERNELPOOL_UID_MAX=str(uid_hi))
        out = self.cli("users", "add", name, env=env)
        token = out.stdout.strip()
        if out.returncode != 0 or not token.startswith("kp_"):
            raise RuntimeError(f"users add {name} failed ({out.returncode}): {out.stderr.strip()}")
        self.tokens[name] = token

    async def add_users(self, names: list[str], uid_lo: int, uid_hi: int) -> None:
        """Add users with the real CLI, several at a time, each worker in its own uid slice."""
        workers = max(1, min(_CLI_WORKERS, len(names)))
        width = (uid_hi - uid_lo + 1) // workers
        queues = [names[i::workers] for i in range(workers)]

        async def work(i: int) -> None:
            lo = uid_lo + i * width
            for name in queues[i]:
                await asyncio.to_thread(self._add, name, lo, lo + width - 1)

        await asyncio.gather(*(work(i) for i in range(workers)))

    async def remove_users(self) -> list[str]:
        """Remove every user added here (accounts included); returns the failures."""
        failures: list[str] = []
        names = list(self.tokens)

        def remove(name: str) -> None:
            out = self.cli("users", "remove", name, "--delete-files")
            if out.returncode != 0:
                failures.append(f"users remove {name}: {out.stderr.strip()}")
            else:
                self.tokens.pop(name, None)

        queues = [names[i::_CLI_WORKERS] for i in range(_CLI_WORKERS)]

        async def work(q: list[str]) -> None:
            for name in q:
                await asyncio.to_thread(remove, name)

        await asyncio.gather(*(work(q) for q in queues))
        return failures


class Bench:
    """Everything one benchmark run creates, and its cleanup (`async with Bench() as bench`)."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000}"
        self.account_prefix = f"kpb{self.tag}-"
        self.cgroup_prefix = f"kernelpool-bench-{self.tag}"
        self.serve_args, self.isolation = sandbox_args()
        self.dirs: list[DataDir] = []
        self._uid_next = UID_MIN
        self._servers = 0
        self._ranges = 0  # network ranges handed out (env)

    def env(self, **extra: str) -> dict[str, str]:
        # a /20 per data folder (1024 users' namespaces; the tests' /24 holds 128, too few for the
        # 300-session level's 150 users), in 10.240.0.0/12, apart from the tests' 10.224.0.0/12
        self._ranges += 1
        k = (os.getpid() * 16 + self._ranges) % 256
        return server_env(
            KERNELPOOL_UID_MIN=str(UID_MIN), KERNELPOOL_UID_MAX=str(UID_MAX),
            KERNELPOOL_ACCOUNT_PREFIX=self.account_prefix, KERNELPOOL_CGROUP_PREFIX=self.cgroup_prefix,
            KERNELPOOL_LOG_LEVEL="warning", KERNELPOOL_KERNEL_NETWORK_RANGE=f"10.{240 + k // 16}.{(k % 16) * 16}.0/20",
            **extra,
        )

    async def data_dir(self, users: list[str]) -> DataDir:
        """A new data folder with these users (names unique across the run: they are Unix accounts)."""
        path = tempfile.mkdtemp(prefix="kpb-", dir="/tmp")
        os.chmod(path, 0o711)  # noqa: S103 (kernels run as other uids and must reach their folders)
        d = DataDir(path, self.env())
        self.dirs.append(d)
        # each folder takes a slice of the uid range wide enough for its users and the CLI workers
        width = max(len(users), 1) * 2 + 2 * _CLI_WORKERS
        lo, self._uid_next = self._uid_next, self._uid_next + width
        if self._uid_next - 1 > UID_MAX:
            raise RuntimeError("uid range of the benchmark exhausted")
        await d.add_users(users, lo, lo + width - 1)
        return d

    @contextlib.asynccontextmanager
    async def server(self, d: DataDir, **settings: str) -> AsyncIterator[RunningServer]:
        """A real kernelpool server on `d` with `KERNELPOOL_<NAME>=value` settings; stopped and checked after."""
        # a cgroup folder per server: a starting server removes kernel cgroups its store does not know
        self._servers += 1
        prefix = f"{self.cgroup_prefix}-{self._servers}"
        env = self.env(**{f"KERNELPOOL_{k.upper()}": v for k, v in settings.items()})
        env["KERNELPOOL_CGROUP_PREFIX"] = prefix
        kp = KernelpoolServer(d.path, env)
        kp.tokens = d.tokens
        await asyncio.to_thread(kp.start, *self.serve_args)
        assert kp.proc is not None
        own = memory_cgroup_of(kp.pid)
        running = RunningServer(kp, os.path.join(own, prefix) if own else None, settings)
        running.rss.start()
        try:
            yield running
        finally:
            running.rss_result = await running.rss.stop()
            code = await asyncio.to_thread(kp.stop)
            running.exit_code = code
            running.log_tail = kp.log()[-6000:]
            running.leftovers = await self.wait_no_leftovers(running.cgroup_root, self._uids(list(d.tokens)))
            left = await asyncio.to_thread(kp.reap_network)
            if left:
                running.leftovers.append(f"{left} network namespace(s) or link(s) the server did not remove")

    def _uids(self, users: list[str] | None = None) -> set[int]:
        """The uids of these users' accounts (of all this run's accounts when None)."""
        if users is None:
            return {p.pw_uid for p in pwd.getpwall() if p.pw_name.startswith(self.account_prefix)}
        uids = set()
        for name in users:
            with contextlib.suppress(KeyError):
                uids.add(pwd.getpwnam(self.account_prefix + name).pw_uid)
        return uids

    def leftovers(self, cgroup_root: str | None, uids: set[int] | None = None) -> list[str]:
        """Processes of these uids (default: all this run's accounts) or cgroups under `cgroup_root`."""
        found: list[str] = []
        uids = self._uids() if uids is None else uids
        for p in psutil.process_iter(["pid", "uids", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if p.info["uids"] and p.info["uids"].real in uids:
                    found.append(f"process {p.pid} (uid {p.info['uids'].real}, {p.status()}): "
                                 f"{' '.join(p.info['cmdline'] or [])[:80]}")
        if cgroup_root:
            found += [f"cgroup {d}" for d in cgroup_tree_dirs(cgroup_root)]
        return found

    async def wait_no_leftovers(self, cgroup_root: str | None, uids: set[int] | None = None,
                                timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.leftovers(cgroup_root, uids)
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.25)

    async def cleanup(self) -> list[str]:
        problems: list[str] = []
        for d in self.dirs:
            problems += await d.remove_users()
            shutil.rmtree(d.path, ignore_errors=True)
        self.dirs.clear()
        problems += await self.wait_no_leftovers(None, timeout=5)
        own = memory_cgroup_of(os.getpid())
        if own and os.path.isdir(own):
            problems += [f"cgroup {os.path.join(own, n)}" for n in os.listdir(own) if n.startswith(self.cgroup_prefix)]
        problems += [f"account {p.pw_name}" for p in pwd.getpwall() if p.pw_name.startswith(self.account_prefix)]
        return problems

    async def __aenter__(self) -> Bench:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cleanup_problems = await self.cleanup()


@dataclass
class RunningServer:
    kp: KernelpoolServer
    cgroup_root: str | None
    settings: dict[str, str]
    rss: RssSampler = field(init=False)
    rss_result: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    leftovers: list[str] = field(default_factory=list)
    log_tail: str = ""

    def __post_init__(self) -> None:
        assert self.kp.proc is not None
        self.rss = RssSampler(self.kp.pid)

    @property
    def url(self) -> str:
        return self.kp.url

    @property
    def pid(self) -> int:
        assert self.kp.proc is not None
        return self.kp.pid

    def kernels(self) -> list[psutil.Process]:
        return kernel_processes(self.pid, self.cgroup_root)

    def helpers(self) -> list[psutil.Process]:
        """The server's descendants that are not kernels (a fork server, for one)."""
        kernels = {p.pid for p in self.kernels()}
        with contextlib.suppress(psutil.Error):
            return [c for c in psutil.Process(self.pid).children(recursive=True) if c.pid not in kernels]
        return []

    async def health(self) -> dict[str, Any]:
        async with httpx2.AsyncClient(timeout=5) as http:
            r = await http.get(f"{self.kp.base}/healthz")
            return dict(r.json())

    async def wait_warm(self, at_least: int, timeout: float) -> float | None:
        """Wait until /healthz counts `at_least` warm kernels; seconds waited, None on timeout."""
        t0 = time.perf_counter()
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if (await self.health()).get("warm_kernels", 0) >= at_least:
                return time.perf_counter() - t0
            await asyncio.sleep(0.05)
        return None
