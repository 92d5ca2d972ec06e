"""Execution jobs: one run of code in a notebook's kernel, from request to saved outputs.

A job runs in a task of its own, so that a client that cancels or goes away does not lose
the outputs: cancellation interrupts the kernel, the job collects what the kernel still
sends, and the outputs are saved into the notebook all the same. A job can also be started
in the background and fetched later by id (`get_execution`), so that an hour-long cell needs
no open request. Callers: `ExecutionService` (start, wait, get, cancel), the app (prune, close).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from nbformat import NotebookNode

from kernelpool.config import Settings
from kernelpool.errors import InvalidArgument, KernelpoolError, LimitReached, ResultExpired, fmt_bytes
from kernelpool.executions.execute import ExecutionResult, Progress, execute
from kernelpool.executions.outputs import OutputLimits, Outputs, outputs_size
from kernelpool.kernels.kernel import Kernel, KernelState
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.metrics import Metrics
from kernelpool.notebooks import cells
from kernelpool.notebooks.changes import Change, Changes
from kernelpool.notebooks.service import NotebookService
from kernelpool.users.accounts import UserService

log = logging.getLogger(__name__)

_KEEP_FINISHED = 3600.0  # seconds a finished background job's result stays fetchable
_MAX_JOBS_PER_USER = 100
_EXPIRED_REMEMBERED = 10_000  # ids of dropped results remembered, to answer "expired" rather than "unknown"


class JobState(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"  # it has a result (errors of the code itself included)
    FAILED = "failed"  # it has none: `error` says why


@dataclass(eq=False)
class Job:
    id: str
    user: str
    path: str  # the notebook's, relative to the user's folder
    cell_id: str | None
    background: bool
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    kernel: Kernel | None = None
    result: ExecutionResult | None = None
    error: str | None = None
    saved_index: int | None = None
    state: JobState = JobState.RUNNING
    cancelled: bool = False  # a client asked to stop it (cancel_execution, or its request went away)
    progress: Progress | None = None  # the waiting request's, until that request goes away
    task: asyncio.Task[None] | None = None
    size: int = 0  # bytes its finished result holds in memory (background jobs)
    save_error: str | None = None  # why the outputs could not be saved in the notebook
    live: Outputs | None = None  # its outputs so far, while it runs (`JobService.live_outputs`)

    @property
    def done(self) -> bool:
        return self.state is not JobState.RUNNING

    async def report(self, elapsed: float, message: str) -> None:
        """Progress of the running code, to the request that waits for it (if it still does)."""
        if self.progress is not None:
            await self.progress(elapsed, message)


class JobService:
    def __init__(self, settings: Settings, kernels: KernelRegistry, notebooks: NotebookService,
                 users: UserService, metrics: Metrics, *, changes: Changes | None = None) -> None:
        self._settings = settings
        self._changes = changes or Changes()
        self._kernels = kernels
        self._notebooks = notebooks
        self._users = users
        self._metrics = metrics
        self._jobs: dict[str, Job] = {}
        # finished background jobs whose results are held, oldest first, and their bytes per user
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._held: dict[str, int] = {}
        self._expired: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (user, why)
        self.limits = OutputLimits(
            stream_chars=settings.max_saved_output_chars, image_bytes=settings.max_saved_image_bytes,
            execution_chars=settings.max_saved_execution_chars,
        )

    def start(self, user: str, path: str, code: str, *, timeout: float, cell_id: str | None = None,
              store_history: bool = True, background: bool = False, progress: Progress | None = None) -> Job:
        """Run `code` in a task of its own; `timeout` was checked by the caller, `progress` gets
        reports while the code runs (a waiting request's; none in the background)."""
        self.prune()
        if background and sum(1 for j in self._jobs.values() if j.user == user and not j.done) >= _MAX_JOBS_PER_USER:
            raise LimitReached("running background executions per user", _MAX_JOBS_PER_USER,
                               "wait for some to finish (get_execution with wait) or cancel them (cancel_execution)")
        job = Job(id=uuid.uuid4().hex[:16], user=user, path=path, cell_id=cell_id, background=background,
                  progress=progress)
        job.task = asyncio.get_running_loop().create_task(
            self._run(job, code, timeout=timeout, store_history=store_history))
        self._jobs[job.id] = job
        return job

    async def wait(self, job: Job, *, within: float | None = None) -> Job:
        """Wait for `job` on behalf of a request (at most `within` seconds: then it runs on); if the
        request is cancelled, interrupt the kernel (the job still saves what was produced) and let
        the cancellation go on."""
        if job.task is None:
            raise RuntimeError(f"job {job.id} was not started (JobService.start starts it)")
        try:
            if within is None:
                await asyncio.shield(job.task)
            else:
                await asyncio.wait([job.task], timeout=within)
        except asyncio.CancelledError:
            job.progress = None
            job.cancelled = True
            if job.kernel is not None and not job.done:
                with contextlib.suppress(Exception):
                    await self._kernels.interrupt(job.kernel)
            raise
        return job

    def get(self, user: str, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None or job.user != user:
            expired = self._expired.get(job_id)
            if expired is not None and expired[0] == user:
                raise ResultExpired(job_id, expired[1])
            raise InvalidArgument("execution_id", f"no execution {job_id!r} (results are kept {_KEEP_FINISHED:g} s)")
        return job

    def result_bytes(self, user: str | None = None) -> int:
        """Bytes that finished background results hold in memory: one user's, or everyone's."""
        return self._held.get(user, 0) if user is not None else sum(self._held.values())

    def of_user(self, user: str) -> list[Job]:
        return [j for j in self._jobs.values() if j.user == user]

    def running_cells(self, user: str, notebook: str) -> set[str]:
        """Ids of the saved cells of a notebook that run now (the web view marks them)."""
        return {j.cell_id for j in self._jobs.values()
                if j.user == user and j.notebook == notebook and not j.done and j.cell_id is not None}

    def live_outputs(self, user: str, notebook: str, cell_id: str, max_chars: int) -> list[NotebookNode] | None:
        """A bounded copy of a running cell's outputs so far (`Outputs.preview`); None when it does not run."""
        for job in self._jobs.values():
            if job.user == user and job.notebook == notebook and job.cell_id == cell_id and not job.done:
                return job.live.preview(max_chars) if job.live is not None else []
        return None

    def _on_output(self, job: Job, outputs: Outputs) -> None:
        job.live = outputs
        if job.cell_id is not None and self._changes.watched(job.user):
            self._changes.publish(Change(job.user, job.notebook, "output", job.cell_id))

    def _tell(self, job: Job, kind: Literal["running", "finished"]) -> None:
        if job.cell_id is not None:
            self._changes.publish(Change(job.user, job.notebook, kind, job.cell_id))

    async def cancel(self, job: Job) -> None:
        job.cancelled = True
        if job.kernel is not None and not job.done:
            await self._kernels.interrupt(job.kernel)

    async def close(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, job: Job, code: str, *, timeout: float, store_history: bool) -> None:
        try:
            job.kernel = await self._kernels.acquire(job.user, job.path)
            result = await self._execute(job, job.kernel, code, timeout=timeout, store_history=store_history)
            if job.cancelled and result.status in ("ok", "error"):
                result.status = "interrupted"
                result.message = "cancelled by the client: the kernel was interrupted"
            job.result = result
            self._metrics.executions.labels(result.status).inc()
            self._metrics.execution_seconds.observe(result.duration)
            if job.cell_id is not None:
                try:
                    job.saved_index = await self._notebooks.edit(job.user, job.path, functools.partial(
                        cells.set_outputs, cell_id=job.cell_id, outputs=result.outputs,
                        execution_count=result.execution_count))
                except KernelpoolError as exc:  # the result is still returned: only the saving failed
                    job.save_error = str(exc)
        except KernelpoolError as exc:
            job.error = str(exc)
        except asyncio.CancelledError:
            job.error = "the server is shutting down"
            raise
        except Exception as exc:
            log.exception("execution %s failed", job.id)
            job.error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            job.state = JobState.FAILED if job.error is not None else JobState.FINISHED
            job.finished_at = time.time()
            job.live = None
            self._tell(job, "finished")
            if job.background:
                self._hold(job)

    async def _execute(self, job: Job, kernel: Kernel, code: str, *, timeout: float,
                       store_history: bool) -> ExecutionResult:
        """One execution in `kernel`, under its lock; the registry acts on how it ended."""
        async with kernel.lock:
            if not await kernel.is_alive():
                return ExecutionResult("died", message=await self._kernels.mark_dead(kernel))
            kernel.transition(KernelState.BUSY)
            kernel.executions += 1
            ooms = kernel.cgroup.oom_kills() if kernel.cgroup is not None else 0
            self._tell(job, "running")
            try:
                result = await execute(kernel, code, timeout, functools.partial(self._kernels.interrupt, kernel),
                                       self.limits, progress=job.report,
                                       progress_interval=self._settings.progress_interval,
                                       store_history=store_history,
                                       on_output=functools.partial(self._on_output, job))
                if result.status == "died":
                    result.message = await self._kernels.mark_dead(kernel)
                elif kernel.cgroup is not None and kernel.cgroup.oom_kills() > ooms and result.message is None:
                    # a process the code started (a shell's command, a subprocess) was killed at the
                    # memory limit while the kernel lived on (bash_kernel restarts its bash): say so
                    result.message = (f"a process of this kernel was killed because it ran out of memory (limit "
                                      f"{fmt_bytes(kernel.memory_limit or 0)}); the kernel itself lives on")
                elif result.stuck:
                    result.message = (f"the execution ran past its timeout of {timeout:g} s and did not stop when "
                                      "interrupted; the kernel was shut down (its variables are lost)")
                    await self._kernels.shutdown(kernel.user, kernel.path or "")
            finally:
                if kernel.state is KernelState.BUSY:
                    kernel.transition(KernelState.IDLE)
            return result

    def _hold(self, job: Job) -> None:
        """Keep a finished background job's result within the per-user and the server-wide bytes;
        past either, the oldest results go first (of the user holding the most, for the server-wide one)."""
        job.size = outputs_size(job.result.outputs) if job.result is not None else 0
        self._finished[job.id] = job
        self._held[job.user] = self._held.get(job.user, 0) + job.size
        per_user, overall = self._settings.max_result_bytes_per_user, self._settings.max_result_bytes
        while self._held.get(job.user, 0) > per_user:
            oldest = next(j for j in self._finished.values() if j.user == job.user)
            self._drop(oldest, f"your finished results held more than max_result_bytes_per_user ({fmt_bytes(per_user)}) "
                               "in server memory, and the oldest are dropped first")
        while self._held and sum(self._held.values()) > overall:
            biggest = max(self._held, key=lambda u: self._held[u])
            oldest = next(j for j in self._finished.values() if j.user == biggest)
            self._drop(oldest, f"finished results on this server held more than max_result_bytes ({fmt_bytes(overall)}), "
                               "and the oldest of the user holding the most are dropped first")

    def _drop(self, job: Job, why: str) -> None:
        self._jobs.pop(job.id, None)
        self._finished.pop(job.id, None)
        left = self._held.get(job.user, 0) - job.size
        if left > 0:
            self._held[job.user] = left
        else:
            self._held.pop(job.user, None)
        saved = " Its outputs were saved in the notebook: read them with read_cell." if job.saved_index is not None else ""
        self._expired[job.id] = (job.user, f"its result was dropped because {why}.{saved} Fetch results sooner "
                                           "(get_execution with wait), or make the code print less")
        while len(self._expired) > _EXPIRED_REMEMBERED:
            self._expired.popitem(last=False)

    def prune(self) -> None:
        """Forget finished foreground jobs, and background results older than an hour (housekeeping too)."""
        cutoff = time.time() - _KEEP_FINISHED
        for job_id, job in list(self._jobs.items()):
            if not job.done:
                continue
            if not job.background:
                del self._jobs[job_id]
            elif (job.finished_at or 0) < cutoff:
                self._drop(job, f"finished results are kept {_KEEP_FINISHED:g} s")
