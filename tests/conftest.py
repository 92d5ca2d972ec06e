from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from testkit.postgres import PostgresServer, running_postgres, unavailable
from testkit.server import KernelpoolServer, make_data_dir, sandbox_reason, server_env

SANDBOX_SKIP = sandbox_reason()
_STARTED = time.time()
METRICS_TOKEN = "test-metrics-token"


@pytest.fixture(scope="session")
def server_args() -> list[str]:
    """Extra `serve` options: the sandbox where this host allows it, else the explicit insecure mode."""
    return [] if SANDBOX_SKIP is None else ["--insecure-no-sandbox"]


@pytest.fixture(scope="module")
def kp(server_args: list[str]) -> Iterator[KernelpoolServer]:
    """One real server for a test module, with users alice and bob."""
    server = KernelpoolServer(make_data_dir(), server_env(KERNELPOOL_POOL_SIZE="1", KERNELPOOL_PROGRESS_INTERVAL="1",
                                                          KERNELPOOL_METRICS_TOKEN=METRICS_TOKEN))
    try:
        server.add_user("alice")
        server.add_user("bob")
        server.start(*server_args)
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def fresh_server(server_args: list[str]) -> Iterator[KernelpoolServer]:
    server = KernelpoolServer(make_data_dir(), server_env())
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def docker_engine() -> Iterator[None]:
    """A Docker engine for a module of container tests (marker `docker`): started when none runs,
    and then stopped after the module, so that the tests after it run on a host without dockerd
    as before (see testkit/docker.py)."""
    from testkit.docker import running_engine

    with running_engine():
        yield


def pytest_report_header(config: pytest.Config) -> str:
    return f"kernelpool sandbox: {'on' if SANDBOX_SKIP is None else 'OFF (' + SANDBOX_SKIP + ')'}; euid={os.geteuid()}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the test session (testkit/postgres.py); skipped, with the reason,
    where none can run."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Each store test runs on both backends: None (SQLite in the test's folder) and a new
    PostgreSQL database of the session's server."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


def pytest_terminal_summary(terminalreporter: object) -> None:
    """Name the screenshots the browser tests wrote (tests/test_web_view.py), for CI to keep as artifacts."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts", "screenshots")
    written = sorted(f for f in os.listdir(folder) if os.path.getmtime(os.path.join(folder, f)) >= _STARTED) \
        if os.path.isdir(folder) else []
    if written:
        terminalreporter.write_line(f"screenshots: {folder}: {', '.join(written)}")  # type: ignore[attr-defined]
