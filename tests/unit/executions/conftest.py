"""One server's execution path in-process: the real registry (over `FakeLauncher`'s scripted
kernels, tests/unit/fakes.py), notebook service, job service and execution service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import nbformat
import pytest
from nbformat import NotebookNode

from kernelpool.config import Settings
from kernelpool.executions.jobs import JobService
from kernelpool.executions.service import ExecutionService
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.metrics import Metrics
from kernelpool.notebooks.changes import Change, Changes
from kernelpool.notebooks.filework import FileWork
from kernelpool.notebooks.service import NotebookService
from kernelpool.store import Store
from kernelpool.users.accounts import UserService
from sandbox import SafeRoot
from tests.unit.fakes import FakeLauncher, registry_with_fake_launcher


@dataclass
class World:
    settings: Settings
    users: UserService
    kernels: KernelRegistry
    launcher: FakeLauncher
    notebooks: NotebookService
    jobs: JobService
    executions: ExecutionService
    metrics: Metrics
    writes: list[tuple[str, str]] = field(default_factory=list)  # every notebook write, in order

    def on_disk(self, user: str, path: str) -> NotebookNode:
        return nbformat.read(f"{self.users.folder(user)}/{path}", as_version=4)


@pytest.fixture
async def make_world(make_settings: Callable[..., Settings], store: Store,
                     users: UserService) -> AsyncIterator[Callable[..., World]]:
    made: list[tuple[World, FileWork]] = []

    def make(**values: object) -> World:
        settings = make_settings(**({"pool_size": 0, "progress_interval": 60.0} | values))
        metrics = Metrics()
        files = FileWork()
        changes = Changes()
        notebooks = NotebookService(lambda user: SafeRoot(users.folder(user)), files, settings.max_notebook_bytes,
                                    changes=changes)
        kernels, launcher = registry_with_fake_launcher(settings, store, users, metrics=metrics)
        jobs = JobService(settings, kernels, notebooks, users, metrics, changes=changes)
        world = World(settings, users, kernels, launcher, notebooks, jobs, ExecutionService(settings, jobs, notebooks),
                      metrics)

        def written(change: Change) -> None:
            if change.kind == "saved":
                world.writes.append((change.user, change.path))

        changes.subscribe(written)
        made.append((world, files))
        return world

    yield make
    for world, files in made:
        await world.jobs.close()
        await world.kernels.close()
        await files.aclose()


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()
