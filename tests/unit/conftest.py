"""The unit layer: kernelpool's services in one process, from the source tree, without root.

Each service is built through the constructor that already takes its dependencies: real settings,
a real SQLite store and real files in a temporary folder, real notebooks; an in-process fake
(`tests/unit/fakes.py`) only where a kernel process or root is not what the test is about.
`pytest tests/unit` needs no wheel and no root (tests/test_unit_layer.py runs it as an
unprivileged uid, within a time limit); the system suites next to this folder run the real
server, kernels and sandbox.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # the checkout, not an installed wheel
    sys.path.insert(0, ROOT)

from kernelpool.config import Settings  # noqa: E402
from kernelpool.store import Store  # noqa: E402
from kernelpool.users.accounts import UserService  # noqa: E402

# the whole layer runs in seconds: a test that waits longer than this is stuck (the suite's 300 s is
# for tests that start real servers)
UNIT_TIMEOUT = 20


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(here + os.sep) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT))


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read KERNELPOOL_* variables: the tests' own values only."""
    for key in [k for k in os.environ if k.startswith("KERNELPOOL_")]:
        monkeypatch.delenv(key)


class Clock:
    """A module's `time`, standing still until the test moves it: `time()` and `monotonic()` both
    advance only by `advance(seconds)`. Expiries measured against the real clock failed on a loaded
    machine (a 0.12 s sleep that came back 80 ms late expired what the test had just used)."""

    def __init__(self) -> None:
        self._wall = time.time()
        self._mono = time.monotonic()

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings with the data folder in this test's temporary folder, and `values` on top."""

    def make(**values: Any) -> Settings:
        return Settings(data_dir=tmp_path / "data", **values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(pool_size=0)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    os.makedirs(settings.data_dir, exist_ok=True)
    opened = await Store(settings.db_path).open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def users(settings: Settings, store: Store) -> UserService:
    """The users service as the server runs it without isolation (no Unix accounts: no root),
    with users alice and bob and their folders."""
    service = UserService(settings, store, isolated=False)
    for name in ("alice", "bob"):
        await service.add(name)
    await service.load()
    return service

