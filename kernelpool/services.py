"""The services one server holds, opened in the app's lifespan and handed to the tool layer."""

from __future__ import annotations

from dataclasses import dataclass

from kernelpool.config import Settings
from kernelpool.executions.jobs import JobService
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.mcp.events import SessionEventStore
from kernelpool.mcp.notices import Notices
from kernelpool.metrics import Metrics
from kernelpool.notebooks.service import NotebookService
from kernelpool.store import Store
from kernelpool.users.accounts import UserService
from kernelpool.users.sessions import SessionContexts


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
