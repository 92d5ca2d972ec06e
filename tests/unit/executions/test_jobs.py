"""JobService: a job's states (running, then finished with a result or failed with an error), what it
saves into the notebook however the run ends, and the bounds on what finished background results
hold in memory."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from nbformat import NotebookNode
from nbformat.v4 import new_output

from kernelpool.config import Settings
from kernelpool.errors import InvalidArgument, LimitReached, ResultExpired
from kernelpool.executions.execute import ExecutionResult
from kernelpool.executions.jobs import Job, JobService, JobState
from kernelpool.kernels.kernel import KernelState
from kernelpool.metrics import Metrics
from tests.unit.executions.conftest import World
from tests.unit.fakes import FakeManager


async def notebook_with_cell(world: World, source: str, path: str = "n.ipynb") -> NotebookNode:
    await world.notebooks.create("alice", path)
    _, cell = await world.notebooks.insert("alice", path, -1, "code", source)
    return cell


def counted(metrics: Metrics, status: str) -> float:
    return metrics.registry.get_sample_value("kernelpool_executions_total", {"status": status}) or 0.0


async def test_a_job_runs_saves_its_outputs_and_leaves_the_kernel_idle(world: World) -> None:
    cell = await notebook_with_cell(world, "print:hello\n")
    job = world.jobs.start("alice", "n.ipynb", "print:hello\n", 10, cell_id=cell.id)
    assert job.state is JobState.RUNNING and not job.done
    await world.jobs.wait(job)
    assert job.state is JobState.FINISHED and job.error is None and job.result is not None
    assert (job.result.status, job.result.execution_count) == ("ok", 1)
    assert [o.text for o in job.result.outputs] == ["hello\n"] and job.saved_index == 0
    saved = world.on_disk("alice", "n.ipynb").cells[0]
    assert [o.text for o in saved.outputs] == ["hello\n"] and saved.execution_count == 1
    assert job.kernel is not None and job.kernel.state is KernelState.IDLE and job.kernel.executions == 1
    assert counted(world.metrics, "ok") == 1


async def test_an_error_in_the_code_is_a_result_not_a_failure(world: World) -> None:
    cell = await notebook_with_cell(world, "error:ZeroDivisionError")
    job = await world.jobs.wait(world.jobs.start("alice", "n.ipynb", cell.source, 10, cell_id=cell.id))
    assert job.state is JobState.FINISHED and job.error is None and job.result is not None
    assert job.result.status == "error" and job.result.outputs[0].ename == "ZeroDivisionError"
    assert world.on_disk("alice", "n.ipynb").cells[0].outputs[0].ename == "ZeroDivisionError"


async def test_a_kernel_that_dies_ends_the_run_with_why_and_is_replaced(world: World) -> None:
    job = await world.jobs.wait(world.jobs.start("alice", "n.ipynb", "die", 10))
    assert job.state is JobState.FINISHED and job.result is not None and job.result.status == "died"
    assert job.result.message == "the kernel process was killed by SIGKILL"
    dead = job.kernel
    assert dead is not None and dead.state is KernelState.DEAD
    again = await world.jobs.wait(world.jobs.start("alice", "n.ipynb", "print:back", 10))
    assert again.result is not None and again.result.status == "ok" and again.kernel is not dead
    assert dead in world.launcher.stopped and world.kernels.count("alice") == 1


async def test_a_timeout_interrupts_the_kernel_and_keeps_it(world: World) -> None:
    cell = await notebook_with_cell(world, "sleep:30")
    job = await world.jobs.wait(world.jobs.start("alice", "n.ipynb", cell.source, 0.2, cell_id=cell.id))
    assert job.result is not None and job.result.status == "timeout" and not job.result.stuck
    assert job.result.message == "the execution ran past its timeout of 0.2 s and was interrupted"
    assert job.result.outputs == [], "the KeyboardInterrupt is the server's doing: said once, in the message"
    kernel = job.kernel
    assert kernel is not None and isinstance(kernel.manager, FakeManager) and kernel.manager.interrupts == 1
    assert kernel.state is KernelState.IDLE
    after = await world.jobs.wait(world.jobs.start("alice", "n.ipynb", "print:still here", 10))
    assert after.kernel is kernel and after.result is not None and after.result.status == "ok"


async def test_a_client_that_goes_away_interrupts_the_run_and_the_outputs_are_saved_all_the_same(world: World) -> None:
    cell = await notebook_with_cell(world, "sleep:30")
    job = world.jobs.start("alice", "n.ipynb", cell.source, 10, cell_id=cell.id)
    waiting = asyncio.create_task(world.jobs.wait(job))
    while job.kernel is None or job.kernel.state is not KernelState.BUSY:
        await asyncio.sleep(0.005)
    waiting.cancel()  # the request's task: the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert job.task is not None
    await job.task
    assert job.cancelled and job.result is not None and job.result.status == "interrupted"
    assert job.result.message == "cancelled by the client: the kernel was interrupted"
    assert world.on_disk("alice", "n.ipynb").cells[0].outputs[0].ename == "KeyboardInterrupt"


async def test_a_job_that_gets_no_kernel_fails_and_saves_nothing(make_world: Callable[..., World]) -> None:
    world = make_world(max_kernels_per_user=1)
    await world.kernels.acquire("alice", "other.ipynb")  # the user's one kernel
    cell = await notebook_with_cell(world, "print:x")
    before = world.writes[:]
    job = await world.jobs.wait(world.jobs.start("alice", "n.ipynb", cell.source, 10, cell_id=cell.id))
    assert job.state is JobState.FAILED and job.result is None
    assert job.error == "kernels per user limit reached (1); shut a kernel down with unuse_notebook first"
    assert world.writes == before and counted(world.metrics, "ok") == 0


async def test_outputs_of_a_cell_deleted_while_it_ran_are_not_saved_anywhere(world: World) -> None:
    cell = await notebook_with_cell(world, "wait")
    await world.notebooks.insert("alice", "n.ipynb", -1, "code", "kept")
    job = world.jobs.start("alice", "n.ipynb", "wait", 10, cell_id=cell.id)
    while job.kernel is None or job.kernel.channels is None:
        await asyncio.sleep(0.005)
    await world.notebooks.edit_cell("alice", "n.ipynb", None, cell.id, lambda nb, i: nb.cells.pop(i))
    job.kernel.channels.release()  # type: ignore[attr-defined]
    await world.jobs.wait(job)
    assert job.result is not None and job.result.status == "ok" and job.saved_index is None
    assert [(c.source, c.outputs) for c in world.on_disk("alice", "n.ipynb").cells] == [("kept", [])]


async def test_a_background_job_is_fetched_by_its_user_only(world: World) -> None:
    job = world.jobs.start("alice", "n.ipynb", "print:done", 10, background=True)
    assert world.jobs.get("alice", job.id) is job
    with pytest.raises(InvalidArgument, match="no execution"):
        world.jobs.get("bob", job.id)
    assert job.task is not None
    await job.task
    assert job.result is not None and world.jobs.result_bytes("alice") == job.size > 0
    world.jobs.prune()
    assert world.jobs.get("alice", job.id) is job, "a background result outlives the housekeeping"
    foreground = await world.jobs.wait(world.jobs.start("alice", "n.ipynb", "print:x", 10))
    world.jobs.prune()
    with pytest.raises(InvalidArgument):
        world.jobs.get("alice", foreground.id)


async def test_running_background_jobs_are_capped_per_user(world: World) -> None:
    running = [world.jobs.start("alice", "n.ipynb", "wait", 600, background=True) for _ in range(100)]
    with pytest.raises(LimitReached, match="running background executions per user limit reached"):
        world.jobs.start("alice", "n.ipynb", "wait", 600, background=True)
    world.jobs.start("bob", "n.ipynb", "print:mine", 10, background=True)  # bob's are his own
    assert all(not j.done for j in running)


def test_finished_results_are_bounded_per_user_and_overall() -> None:
    # only the bookkeeping of finished results runs here: no kernel, notebook or user is touched
    jobs = JobService(Settings(max_result_bytes_per_user=2500, max_result_bytes=4000), None, None, None, Metrics())  # type: ignore[arg-type]

    def finish(user: str, size: int) -> Job:
        job = Job(id=f"{user}-{len(jobs._jobs)}", user=user, notebook="n.ipynb", cell_id=None, background=True)
        job.result = ExecutionResult("ok", outputs=[new_output("stream", name="stdout", text="x" * size)] if size else [])
        jobs._jobs[job.id] = job
        jobs._hold(job)
        return job

    a = [finish("alice", 1000) for _ in range(3)]
    zero = finish("alice", 0)
    assert jobs.result_bytes("alice") == 2000 and "alice-0" not in jobs._jobs, "the oldest went first"
    with pytest.raises(ResultExpired, match="max_result_bytes_per_user"):
        jobs.get("alice", a[0].id)
    with pytest.raises(InvalidArgument):
        jobs.get("bob", a[0].id)  # another user's id: not even "expired"
    b = [finish("bob", 1000) for _ in range(2)]
    finish("bob", 500)  # 4500 in all, over 4000: the biggest holder (bob, 2500 against 2000) loses its oldest
    assert jobs.result_bytes() <= 4000 and b[0].id not in jobs._jobs and a[1].id in jobs._jobs
    jobs._drop(zero, "test")
    jobs._drop(a[1], "test")
    assert jobs.result_bytes("alice") == 1000
