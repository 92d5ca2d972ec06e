"""A real PostgreSQL server in a temporary folder, for the store's tests, the replica tests and the
benchmark: `initdb` as the `postgres` system user, then `postgres` on a free loopback port with
its socket in that folder (see /work/shared/SCALE-NOTES.md). Each test takes a database of its
own (`new_database`). Debian's PostgreSQL 15 binaries; `.ci/run` installs `postgresql-15` where
they are missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

from testkit.server import free_port


def postgres_bin() -> str | None:
    """The folder of PostgreSQL's server binaries (the newest installed), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def unavailable() -> str | None:
    """Why no PostgreSQL server can run here, or None."""
    if os.geteuid() != 0:
        return "a PostgreSQL server for the tests is started as the postgres system user: needs root"
    if postgres_bin() is None:
        return "no PostgreSQL server binaries (apt-get install postgresql-15; .ci/run does)"
    if not shutil.which("runuser"):
        return "runuser is missing"
    return None


class PostgresServer:
    """`start()`, `new_database()` for each test, `stop()` at the end (also when a test failed)."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="kp-pg-", dir="/var/tmp")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._made = 0

    @property
    def data(self) -> str:
        return os.path.join(self.folder, "data")

    def _as_postgres(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, timeout=120)

    def start(self) -> PostgresServer:
        binaries = postgres_bin()
        assert binaries is not None, unavailable()
        shutil.chown(self.folder, "postgres", "postgres")
        out = self._as_postgres(f"{binaries}/initdb", "-D", self.data, "-A", "trust", "-U", "kp", "--no-sync")
        assert out.returncode == 0, out.stdout + out.stderr
        self.port = free_port()
        with open(os.path.join(self.folder, "server.log"), "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                ["runuser", "-u", "postgres", "--", f"{binaries}/postgres", "-D", self.data, "-p", str(self.port),
                 "-k", self.folder, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=300",
                 "-c", "synchronous_commit=off"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while self._as_postgres(f"{binaries}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port)).returncode != 0:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.2)
        return self

    def log(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.folder, "server.log")) as f:
            return f.read()[-5000:]
        return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://kp@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        self._made += 1
        name = f"kp{os.getpid()}_{self._made}"
        binaries = postgres_bin()
        out = self._as_postgres(f"{binaries}/createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "kp", name)
        assert out.returncode == 0, out.stderr
        return self.url(name)

    def psql(self, url: str, sql: str) -> str:
        """Run `sql` with psql (as a person would); its output, unaligned."""
        binaries = postgres_bin()
        out = subprocess.run([f"{binaries}/psql", url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # 'fast' shutdown: SIGTERM's 'smart' one waits for every client
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()
