"""What the execution tools ask for: run a saved cell, a new cell or loose code; fetch or stop a run.

Each method is one sequence, in the order that keeps a refused call from changing anything:
check the arguments (the timeout is checked here, once), then touch the notebook, then start
the job (`JobService`), then, unless it runs in the background, wait for it. The job saves the
outputs into the notebook. Callers: the tool layer (`kernelpool.mcp.execution`).
"""

from __future__ import annotations

import asyncio
import contextlib

from kernelpool.config import Settings
from kernelpool.errors import InvalidArgument
from kernelpool.executions.execute import Progress
from kernelpool.executions.jobs import Job, JobService
from kernelpool.notebooks.service import NotebookService

_MAX_WAIT = 600  # seconds get_execution may wait


class ExecutionService:
    def __init__(self, settings: Settings, jobs: JobService, notebooks: NotebookService) -> None:
        self._settings = settings
        self._jobs = jobs
        self._notebooks = notebooks

    async def run_cell(self, user: str, path: str, cell_index: int | None, cell_id: str | None,
                       timeout: float | None, background: bool, progress: Progress | None = None) -> Job:
        """Run a saved code cell; its outputs replace the cell's."""
        i, cell = await self._notebooks.cell(user, path, cell_index, cell_id)
        if cell.cell_type != "code":
            raise InvalidArgument("cell", f"cell {i} is a {cell.cell_type} cell; only code cells run")
        limit = self._timeout(timeout)
        return await self._run(user, path, cell.source, limit, background, progress, cell_id=cell.id)

    async def run_new_cell(self, user: str, path: str, cell_index: int, source: str, timeout: float | None,
                           background: bool, progress: Progress | None = None) -> Job:
        """Insert a code cell at `cell_index` (-1 appends), then run it like `run_cell`."""
        limit = self._timeout(timeout)  # a bad timeout must change nothing: checked before inserting
        _, cell = await self._notebooks.insert(user, path, cell_index, "code", source)
        return await self._run(user, path, source, limit, background, progress, cell_id=cell.id)

    async def run_code(self, user: str, path: str, code: str, timeout: float | None, background: bool,
                       progress: Progress | None = None) -> Job:
        """Run code in the notebook's kernel without adding it to the notebook (nor its history)."""
        await self._notebooks.must_exist(user, path)
        limit = self._timeout(timeout)
        return await self._run(user, path, code, limit, background, progress, store_history=False)

    async def result(self, user: str, execution_id: str, wait: float = 0) -> Job:
        """A run by id, after waiting up to `wait` seconds for it to finish."""
        job = self._jobs.get(user, execution_id)
        if wait < 0 or wait > _MAX_WAIT:
            raise InvalidArgument("wait", f"use 0 to {_MAX_WAIT} seconds")
        if wait and job.task is not None and not job.done:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.task), wait)
        return job

    async def cancel(self, user: str, execution_id: str) -> tuple[Job, bool]:
        """Interrupt a run by id; (the job, whether it was still running)."""
        job = self._jobs.get(user, execution_id)
        running = not job.done
        if running:
            await self._jobs.cancel(job)
        return job, running

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self._settings.execute_timeout
        if timeout <= 0:
            raise InvalidArgument("timeout", "must be more than 0 seconds")
        if timeout > self._settings.max_execute_timeout:
            raise InvalidArgument("timeout", f"at most {self._settings.max_execute_timeout:g} seconds on this server")
        return float(timeout)

    async def _run(self, user: str, path: str, code: str, timeout: float, background: bool,
                   progress: Progress | None, cell_id: str | None = None, store_history: bool = True) -> Job:
        job = self._jobs.start(user, path, code, timeout, cell_id=cell_id, store_history=store_history,
                               background=background, progress=None if background else progress)
        if not background:
            await self._jobs.wait(job)
        return job
