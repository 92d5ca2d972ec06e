"""The services one server holds, opened in the app's lifespan and handed to the tool layer."""

from __future__ import annotations

from dataclasses import dataclass

from kernelpool.config import Settings
from kernelpool.events import SessionEventStore
from kernelpool.jobs import JobService
from kernelpool.kernels import KernelRegistry
from kernelpool.metrics import Metrics
from kernelpool.notebooks import NotebookService
from kernelpool.notices import Notices
from kernelpool.sessions import SessionContexts
from kernelpool.store import Store
from kernelpool.users import UserService


@dataclass
class Services:
    settings: Settings
    store: Store
    users: UserService
    notebooks: NotebookService
    kernels: KernelRegistry
    jobs: JobService
    sessions: SessionContexts
    metrics: Metrics
    # issue 12: log messages and resource updates to sessions; the event store (None: resumption off)
    notices: Notices
    events: SessionEventStore | None
