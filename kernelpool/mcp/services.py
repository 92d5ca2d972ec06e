"""The services one server holds: built by the app (`create_app`), each with its dependencies
given to its constructor, opened in the app's lifespan, and handed whole to the tool layer.

It lives in the tool layer because it holds the tool layer's own parts too (the notices and the
session event store): no service below knows of the bag, so none imports up into this layer
(tests/test_layout.py)."""

from __future__ import annotations

from dataclasses import dataclass

from kernelpool.config import Settings
from kernelpool.executions.jobs import JobService
from kernelpool.executions.service import ExecutionService
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.mcp.events import SessionEventStore
from kernelpool.mcp.notices import Notices
from kernelpool.metrics import Metrics
from kernelpool.notebooks.files import FileService
from kernelpool.notebooks.service import NotebookService
from kernelpool.notebooks.workspace import Workspace
from kernelpool.store import Store
from kernelpool.users.accounts import UserService
from kernelpool.users.sessions import SessionContexts


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: Store
    users: UserService
    notebooks: NotebookService  # files: read, edit, save
    files: FileService  # other files: read in pages, write, delete, within the disk quota
    workspace: Workspace  # notebooks with their kernels and the session's active one
    kernels: KernelRegistry
    jobs: JobService  # runs in tasks, their results
    executions: ExecutionService  # what the execution tools ask for
    sessions: SessionContexts
    metrics: Metrics
    # issue 12: log messages and resource updates to sessions; the event store (None: resumption off)
    notices: Notices
    events: SessionEventStore | None
