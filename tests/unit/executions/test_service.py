"""ExecutionService: a refused call changes nothing (checked before the notebook or a kernel is
touched), a quick new cell is written once with its outputs, a slow one twice."""

from __future__ import annotations

import os

import pytest

from kernelpool.errors import CellNotFound, InvalidArgument, NotebookNotFound
from tests.unit.executions.conftest import World


def file_bytes(world: World, path: str = "n.ipynb") -> bytes:
    with open(os.path.join(world.users.folder("alice"), path), "rb") as f:
        return f.read()


@pytest.mark.parametrize("timeout, words", [(0, "must be more than 0 seconds"), (-1, "must be more than 0 seconds"),
                                            (7200, "at most 3600 seconds on this server")])
async def test_a_bad_timeout_changes_nothing(world: World, timeout: float, words: str) -> None:
    await world.notebooks.create("alice", "n.ipynb")
    _, cell = await world.notebooks.insert("alice", "n.ipynb", -1, "code", "print:x")
    before, writes = file_bytes(world), len(world.writes)
    calls = [
        world.executions.run_new_cell("alice", "n.ipynb", -1, "print:y", timeout, background=False),
        world.executions.run_new_cell("alice", "n.ipynb", -1, "print:y", timeout, background=True),
        world.executions.run_cell("alice", "n.ipynb", 0, None, timeout, background=False),
        world.executions.run_code("alice", "n.ipynb", "print:z", timeout, background=False),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument, match=f"invalid timeout: {words}"):
            await call
    assert file_bytes(world) == before and len(world.writes) == writes
    assert world.jobs.of_user("alice") == [] and world.launcher.kernels == [], "no job, no kernel"


@pytest.mark.parametrize("index", [5, -2, True])
async def test_a_new_cell_at_a_bad_index_runs_nothing(world: World, index: int) -> None:
    await world.notebooks.create("alice", "n.ipynb")
    before = file_bytes(world)
    with pytest.raises(InvalidArgument, match="cell_index"):
        await world.executions.run_new_cell("alice", "n.ipynb", index, "print:never", None, background=False)
    assert file_bytes(world) == before and world.jobs.of_user("alice") == [] and world.launcher.kernels == []


async def test_code_for_a_missing_notebook_runs_nowhere(world: World) -> None:
    with pytest.raises(NotebookNotFound):
        await world.executions.run_code("alice", "missing.ipynb", "print:x", None, background=False)
    with pytest.raises(NotebookNotFound):
        await world.executions.run_new_cell("alice", "missing.ipynb", -1, "print:x", None, background=False)
    assert world.launcher.kernels == []


async def test_a_quick_new_cell_is_written_once_with_its_outputs(world: World) -> None:
    await world.notebooks.create("alice", "n.ipynb")
    writes = len(world.writes)
    job = await world.executions.run_new_cell("alice", "n.ipynb", -1, "print:fast", None, background=False)
    assert len(world.writes) == writes + 1
    saved = world.on_disk("alice", "n.ipynb").cells
    assert [(c.id, c.source, [o.text for o in c.outputs], c.execution_count) for c in saved] == \
        [(job.cell_id, "print:fast", ["fast"], 1)]
    assert job.saved_index == 0


async def test_a_slow_new_cell_is_written_first_and_its_outputs_when_it_finishes(world: World) -> None:
    await world.notebooks.create("alice", "n.ipynb")
    await world.notebooks.insert("alice", "n.ipynb", -1, "markdown", "# title")
    writes = len(world.writes)
    job = await world.executions.run_new_cell("alice", "n.ipynb", 0, "sleep:0.4", None, background=False)
    assert len(world.writes) == writes + 2
    saved = world.on_disk("alice", "n.ipynb").cells
    assert [c.source for c in saved] == ["sleep:0.4", "# title"], "at the index the call gave"
    assert saved[0].id == job.cell_id and saved[0].execution_count == 1 and job.saved_index == 0


async def test_only_code_cells_run(world: World) -> None:
    await world.notebooks.create("alice", "n.ipynb")
    await world.notebooks.insert("alice", "n.ipynb", -1, "markdown", "# not code")
    with pytest.raises(InvalidArgument, match="cell 0 is a markdown cell; only code cells run"):
        await world.executions.run_cell("alice", "n.ipynb", 0, None, None, background=False)
    with pytest.raises(CellNotFound):
        await world.executions.run_cell("alice", "n.ipynb", 1, None, None, background=False)
    assert world.launcher.kernels == []


async def test_code_runs_without_touching_the_notebook(world: World) -> None:
    await world.notebooks.create("alice", "n.ipynb")
    before, writes = file_bytes(world), len(world.writes)
    job = await world.executions.run_code("alice", "n.ipynb", "print:loose", None, background=False)
    assert job.result is not None and [o.text for o in job.result.outputs] == ["loose"]
    assert file_bytes(world) == before and len(world.writes) == writes and job.cell_id is None


async def test_a_background_run_is_fetched_waited_for_and_cancelled_by_id(world: World) -> None:
    await world.notebooks.create("alice", "n.ipynb")
    job = await world.executions.run_new_cell("alice", "n.ipynb", -1, "sleep:30", None, background=True)
    assert job.background and not job.done and job.cell_id is not None
    for wait in (-1, 601):
        with pytest.raises(InvalidArgument, match="invalid wait: use 0 to 600 seconds"):
            await world.executions.result("alice", job.id, wait)
    with pytest.raises(InvalidArgument, match="no execution"):
        await world.executions.cancel("bob", job.id)
    assert (await world.executions.result("alice", job.id, 0.05)) is job and not job.done
    cancelled, running = await world.executions.cancel("alice", job.id)
    assert cancelled is job and running
    done = await world.executions.result("alice", job.id, 5)
    assert done.result is not None and done.result.status == "interrupted"
    assert await world.executions.cancel("alice", job.id) == (job, False)
    saved = world.on_disk("alice", "n.ipynb").cells[0]
    assert saved.id == job.cell_id and saved.outputs[0].ename == "KeyboardInterrupt"
