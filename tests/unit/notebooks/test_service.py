"""NotebookService on real files in a temporary folder: what it refuses to write, how a cancelled
save keeps the order of writes, and that a refused edit leaves the file as it was."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import nbformat
import pytest
from nbformat import NotebookNode

from kernelpool.errors import CellNotFound, InvalidArgument, NotebookExists, NotebookNotFound
from kernelpool.notebooks.cells import insert_cell
from kernelpool.notebooks.filework import FileWork
from kernelpool.notebooks.service import NotebookService
from sandbox import SafeRoot


@pytest.fixture
async def files() -> AsyncIterator[FileWork]:
    work = FileWork()
    yield work
    await work.aclose()


async def test_incremental_validation_still_refuses_an_invalid_change(tmp_path: Path, files: FileWork) -> None:
    svc = NotebookService(lambda user: SafeRoot(str(tmp_path)), files, 100 << 20)
    await svc.create("u", "n.ipynb")
    for i in range(5):
        await svc.edit("u", "n.ipynb", functools.partial(insert_cell, cell_index=-1, cell_type="code", source=f"x = {i}"))
    before = (tmp_path / "n.ipynb").read_bytes()

    def break_outputs(nb: NotebookNode) -> None:
        nb.cells[2].outputs = [{"output_type": "stream"}]  # no name, no text

    def duplicate_id(nb: NotebookNode) -> None:
        nb.cells[3]["id"] = nb.cells[1]["id"]

    def break_metadata(nb: NotebookNode) -> None:
        nb["metadata"] = {"kernelspec": 5}

    for change in (break_outputs, duplicate_id, break_metadata):
        with pytest.raises(ValueError):
            await svc.edit("u", "n.ipynb", change)
        assert (tmp_path / "n.ipynb").read_bytes() == before
    nb = await svc.load("u", "n.ipynb")
    nbformat.validate(nb)
    assert [c.source for c in nb.cells] == [f"x = {i}" for i in range(5)]


async def test_a_cancelled_save_holds_the_lock_until_its_write_is_done(tmp_path: Path, files: FileWork) -> None:
    """An edit cancelled while its write thread runs must not let a later edit's rename land
    first (the late write would then wipe it): the later edit waits for the file to be final."""
    release = threading.Event()
    entered = threading.Event()

    class SlowFirstWrite(SafeRoot):
        """A SafeRoot whose first write waits for the test: a slow disk, under the test's control."""

        slow = True

        def write_bytes_atomic(self, path: str, data: bytes) -> None:  # type: ignore[override]
            if SlowFirstWrite.slow:
                SlowFirstWrite.slow = False
                entered.set()
                release.wait(10)
            super().write_bytes_atomic(path, data)

    slow = [False]
    svc = NotebookService(lambda user: SlowFirstWrite(str(tmp_path)) if slow[0] else SafeRoot(str(tmp_path)), files, 100 << 20)
    await svc.create("u", "n.ipynb")
    slow[0] = True  # the writes of this test go slow once
    first = asyncio.ensure_future(svc.edit("u", "n.ipynb", lambda nb: insert_cell(nb, -1, "code", "first")))
    await asyncio.to_thread(entered.wait, 10)
    first.cancel()
    second = asyncio.ensure_future(svc.edit("u", "n.ipynb", lambda nb: insert_cell(nb, -1, "code", "second")))
    await asyncio.sleep(0.2)
    assert not second.done()  # held: the first write has not finished
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    sources = [c.source for c in nbformat.read(str(tmp_path / "n.ipynb"), as_version=4).cells]
    assert sources[-1] == "second"


async def test_a_change_that_raises_saves_nothing_and_is_not_kept_in_memory(tmp_path: Path, files: FileWork) -> None:
    svc = NotebookService(lambda user: SafeRoot(str(tmp_path)), files, 100 << 20)
    await svc.create("u", "n.ipynb")
    await svc.insert("u", "n.ipynb", -1, "code", "a")
    before = (tmp_path / "n.ipynb").read_bytes()

    def half_then_fail(nb: NotebookNode) -> None:
        insert_cell(nb, -1, "code", "half")  # changed in memory...
        raise InvalidArgument("cell", "refused after all")  # ...then refused

    with pytest.raises(InvalidArgument):
        await svc.edit("u", "n.ipynb", half_then_fail)
    assert (tmp_path / "n.ipynb").read_bytes() == before
    assert [c.source for c in (await svc.load("u", "n.ipynb")).cells] == ["a"], "the file is the truth"


async def test_a_file_changed_on_disk_is_read_again(tmp_path: Path, files: FileWork) -> None:
    svc = NotebookService(lambda user: SafeRoot(str(tmp_path)), files, 100 << 20)
    await svc.create("u", "n.ipynb")
    assert (await svc.load("u", "n.ipynb")).cells == []
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("written by the user's kernel")])
    nbformat.write(nb, str(tmp_path / "n.ipynb"))
    os.utime(tmp_path / "n.ipynb", ns=(1, 1))  # another size and mtime than the cached one, whatever the clock
    assert [c.source for c in (await svc.load("u", "n.ipynb")).cells] == ["written by the user's kernel"]


async def test_missing_existing_and_out_of_range(tmp_path: Path, files: FileWork) -> None:
    svc = NotebookService(lambda user: SafeRoot(str(tmp_path)), files, 100 << 20)
    with pytest.raises(NotebookNotFound):
        await svc.load("u", "n.ipynb")
    with pytest.raises(NotebookNotFound):
        await svc.must_exist("u", "n.ipynb")
    await svc.create("u", "n.ipynb")
    with pytest.raises(NotebookExists):
        await svc.create("u", "n.ipynb")
    with pytest.raises(CellNotFound, match="at index 0"):
        await svc.cell("u", "n.ipynb", cell_index=0)
    for start, limit, words in ((-1, 5, "start_index"), (0, 0, "limit")):
        with pytest.raises(InvalidArgument, match=words):
            await svc.cell_window("u", "n.ipynb", start, limit)
    for i in range(3):
        await svc.insert("u", "n.ipynb", -1, "code", str(i))
    total, window = await svc.cell_window("u", "n.ipynb", 1, 5)
    assert total == 3 and [c.source for c in window] == ["1", "2"]
