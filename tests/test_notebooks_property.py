"""Property-based: any sequence of edits, valid or not, leaves a valid notebook file that
matches a simple model (a list of (cell type, source)); invalid edits change nothing."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import nbformat
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from nbformat import NotebookNode

from kernelpool.errors import KernelpoolError
from kernelpool.notebooks import cells as nbops
from kernelpool.notebooks.filework import FileWork
from kernelpool.notebooks.service import NotebookService
from sandbox import SafeRoot

sources = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
cell_types = st.sampled_from(["code", "markdown", "raw"])
indexes = st.integers(min_value=-6, max_value=8)

PATH = "dir/model.ipynb"
T = TypeVar("T")


class NotebookEdits(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.runner = asyncio.Runner()
        self.folder = tempfile.mkdtemp(prefix="kp-prop-")
        self.files = FileWork()
        self.service = NotebookService(lambda user: SafeRoot(self.folder), self.files, 100 << 20)
        self.run(self.service.create("u", PATH))
        self.model: list[tuple[str, str]] = []
        self.ids: list[str] = []

    def teardown(self) -> None:
        if hasattr(self, "runner"):
            self.runner.close()
            self.files.close()
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)

    def run(self, coro):
        return self.runner.run(coro)

    def edit(self, change: Callable[[NotebookNode], T]) -> T | None:
        """Apply `change` through the service; on a refusal the file must be byte-identical."""
        file = Path(self.folder, PATH)
        before = file.read_bytes()
        try:
            return self.run(self.service.edit("u", PATH, change))
        except KernelpoolError:
            assert file.read_bytes() == before
            return None

    def valid_index(self, i: int) -> int | None:
        n = len(self.model)
        j = i + n if i < 0 else i
        return j if 0 <= j < n else None

    @rule(index=indexes, kind=cell_types, source=sources)
    def insert(self, index: int, kind: str, source: str) -> None:
        got = self.edit(lambda nb: nbops.insert_cell(nb, index, kind, source))
        n = len(self.model)
        if index == -1 or 0 <= index <= n:
            pos = n if index == -1 else index
            assert got is not None and got[0] == pos
            self.model.insert(pos, (kind, source))
            self.ids.insert(pos, got[1].id)
        else:
            assert got is None

    @rule(index=indexes, source=sources)
    def overwrite(self, index: int, source: str) -> None:
        def change(nb):
            i = nbops.cell_position(nb, PATH, cell_index=index)
            nbops.set_source(nb.cells[i], source)
            return i

        got = self.edit(change)
        j = self.valid_index(index)
        assert got == j
        if j is not None:
            self.model[j] = (self.model[j][0], source)

    @rule(index=indexes, old=st.text(min_size=1, max_size=3, alphabet="ab"), new=st.text(max_size=3, alphabet="abc"),
          replace_all=st.booleans())
    def edit_source(self, index: int, old: str, new: str, *, replace_all: bool) -> None:
        def change(nb):
            i = nbops.cell_position(nb, PATH, cell_index=index)
            return nbops.edit_source(nb.cells[i], old, new, replace_all=replace_all)

        got = self.edit(change)
        j = self.valid_index(index)
        if j is None:
            assert got is None
            return
        kind, src = self.model[j]
        count = src.count(old)
        if count == 0 or (count > 1 and not replace_all):
            assert got is None
        else:
            self.model[j] = (kind, src.replace(old, new) if replace_all else src.replace(old, new, 1))

    @rule(index=indexes)
    def delete(self, index: int) -> None:
        got = self.edit(lambda nb: nb.cells.pop(nbops.cell_position(nb, PATH, cell_index=index)).id)
        j = self.valid_index(index)
        if j is None:
            assert got is None
        else:
            assert got == self.ids.pop(j)
            self.model.pop(j)

    @rule(index=indexes, to=indexes)
    def move(self, index: int, to: int) -> None:
        got = self.edit(lambda nb: nbops.move_cell(nb, nbops.cell_position(nb, PATH, cell_index=index), to))
        j, k = self.valid_index(index), self.valid_index(to)
        if j is None or k is None:
            assert got is None
            return
        assert got == k
        self.model.insert(k, self.model.pop(j))
        self.ids.insert(k, self.ids.pop(j))

    @rule(data=st.data())
    def by_id(self, data) -> None:
        if not self.ids:
            return
        cid = data.draw(st.sampled_from(self.ids + ["no-such-id"]))
        got = self.edit(lambda nb: nbops.cell_position(nb, PATH, cell_id=cid))
        assert got == (self.ids.index(cid) if cid in self.ids else None)

    @invariant()
    def file_matches_model(self) -> None:
        if not hasattr(self, "model"):
            return
        nb = nbformat.read(os.path.join(self.folder, PATH), as_version=4)
        nbformat.validate(nb)
        assert [(c.cell_type, c.source) for c in nb.cells] == self.model
        assert [c.id for c in nb.cells] == self.ids
        assert len(set(self.ids)) == len(self.ids)


TestNotebookEdits = NotebookEdits.TestCase
TestNotebookEdits.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
