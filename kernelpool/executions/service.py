"""What the execution tools ask for: run a saved cell, a new cell or loose code; fetch or stop a run.

Each method is one sequence, in the order that keeps a refused call from changing anything:
check the arguments (the timeout is checked here, once), then touch the notebook, then start
the job (`JobService`), then, unless it runs in the background, wait for it. The job saves the
outputs into the notebook. Callers: the tool layer (`kernelpool.mcp.execution`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

from nbformat import NotebookNode

from kernelpool.config import Settings
from kernelpool.errors import InvalidArgument, KernelpoolError
from kernelpool.executions.execute import Progress
from kernelpool.executions.jobs import Job, JobService
from kernelpool.notebooks import cells
from kernelpool.notebooks.service import NotebookService

_MAX_WAIT = 600  # seconds get_execution may wait
# a new cell whose code finishes within this is written once, with its outputs (not twice)
_ONE_WRITE_WINDOW = 0.25


class ExecutionService:
    def __init__(self, settings: Settings, jobs: JobService, notebooks: NotebookService) -> None:
        self._settings = settings
        self._jobs = jobs
        self._notebooks = notebooks

    async def run_cell(self, user: str, path: str, *, cell_index: int | None = None, cell_id: str | None = None,
                       timeout: float | None = None, background: bool = False,
                       progress: Progress | None = None) -> Job:
        """Run a saved code cell (by index or by id); its outputs replace the cell's."""
        i, cell = await self._notebooks.cell(user, path, cell_index=cell_index, cell_id=cell_id)
        if cell.cell_type != "code":
            raise InvalidArgument("cell", f"cell {i} is a {cell.cell_type} cell; only code cells run")
        limit = self._timeout(timeout)
        return await self._run(user, path, cell.source, timeout=limit, background=background, progress=progress,
                               cell_id=cell.id)

    async def run_new_cell(self, user: str, path: str, cell_index: int, source: str, *, timeout: float | None = None,
                           background: bool = False, progress: Progress | None = None) -> Job:
        """Insert a code cell at `cell_index` (-1 appends), then run it like `run_cell`.

        In the foreground the cell is written once with its outputs when the code finishes within
        `_ONE_WRITE_WINDOW` (most cells do); otherwise the cell is written at that point and its
        outputs when it finishes. The notebook's lock is held meanwhile, so `cell_index` means
        what it meant when the call came. Either way the call answers after both are on disk.
        """
        limit = self._timeout(timeout)  # a bad timeout must change nothing: checked before inserting
        if background:
            _, cell = await self._notebooks.insert(user, path, cell_index, "code", source)
            return await self._run(user, path, source, timeout=limit, background=True, progress=progress,
                                   cell_id=cell.id)
        async with self._notebooks.lock(user, path):
            cells.insert_position(await self._notebooks.load(user, path), cell_index)  # a bad index runs nothing
            job = self._jobs.start(user, path, source, timeout=limit, progress=progress)
            try:
                await self._jobs.wait(job, within=_ONE_WRITE_WINDOW)
            finally:  # cancelled or not, the cell goes into the notebook, as when it was written first
                await asyncio.shield(self._place(user, path, cell_index, source, job))
        await self._jobs.wait(job)
        return job

    async def _place(self, user: str, path: str, cell_index: int, source: str, job: Job) -> None:
        """Insert the job's cell (with its outputs if it has finished); if it runs on, the job saves
        its outputs when it finishes. The caller holds the notebook's lock."""
        with_outputs = job.done

        def insert(nb: NotebookNode) -> tuple[int, NotebookNode]:
            pos, cell = cells.insert_cell(nb, cell_index, "code", source)
            if with_outputs and job.result is not None:
                cells.set_outputs(nb, cell.id, job.result.outputs, job.result.execution_count)
            return pos, cell

        try:
            pos, cell = await self._notebooks.edit_locked(user, path, insert)
            saved_at: int | None = pos
            job.cell_id = cell.id
            if not job.done:  # no await since the check: the job has not reached its saving yet, and will save
                return
            if not with_outputs and job.result is not None:  # it finished while the cell was being written
                saved_at = await self._notebooks.edit_locked(user, path, functools.partial(
                    cells.set_outputs, cell_id=cell.id, outputs=job.result.outputs,
                    execution_count=job.result.execution_count))
        except KernelpoolError as exc:  # the result is still returned: only the saving failed
            job.save_error = str(exc)
            return
        if job.result is not None:
            job.saved_index = saved_at

    async def run_code(self, user: str, path: str, code: str, *, timeout: float | None = None,
                       background: bool = False, progress: Progress | None = None) -> Job:
        """Run code in the notebook's kernel without adding it to the notebook (nor its history)."""
        await self._notebooks.must_exist(user, path)
        limit = self._timeout(timeout)
        return await self._run(user, path, code, timeout=limit, background=background, progress=progress,
                               store_history=False)

    async def result(self, user: str, execution_id: str, *, wait: float = 0) -> Job:
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

    async def _run(self, user: str, path: str, code: str, *, timeout: float, background: bool,
                   progress: Progress | None, cell_id: str | None = None, store_history: bool = True) -> Job:
        job = self._jobs.start(user, path, code, timeout=timeout, cell_id=cell_id, store_history=store_history,
                               background=background, progress=None if background else progress)
        if not background:
            await self._jobs.wait(job)
        return job
