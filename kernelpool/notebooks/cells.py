"""Pure operations on an in-memory notebook's cells: find, insert, edit, move, clear, page.

They change only the notebook they are given and raise `InvalidArgument`/`CellNotFound` with
the client's words; `NotebookService.edit` runs them under the notebook's lock and saves.
Callers: the notebook service, the execution service, the tool layer (inside `edit`).
"""

from __future__ import annotations

from dataclasses import dataclass

from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_raw_cell

from kernelpool.errors import CellNotFound, InvalidArgument
from kernelpool.notebooks.outputs import output_text

CELL_TYPES = ("code", "markdown", "raw")


def new_cell(cell_type: str, source: str) -> NotebookNode:
    cell: NotebookNode
    if cell_type == "code":
        cell = new_code_cell(source)
    elif cell_type == "markdown":
        cell = new_markdown_cell(source)
    elif cell_type == "raw":
        cell = new_raw_cell(source)
    else:
        raise InvalidArgument("cell_type", f"{cell_type!r}: use one of {', '.join(CELL_TYPES)}")
    return cell


def cell_position(nb: NotebookNode, path: str, *, cell_index: int | None = None, cell_id: str | None = None) -> int:
    """The index of the cell named by index (negative counts from the end) or by id."""
    count = len(nb.cells)
    if cell_id is not None:
        for i, cell in enumerate(nb.cells):
            if cell.get("id") == cell_id:
                return i
        raise CellNotFound(path, f"with id {cell_id!r}", count)
    if cell_index is None:
        raise InvalidArgument("cell", "give cell_index or cell_id")
    if isinstance(cell_index, bool) or not isinstance(cell_index, int):
        raise InvalidArgument("cell_index", "must be an integer")
    index = cell_index + count if cell_index < 0 else cell_index
    if not 0 <= index < count:
        raise CellNotFound(path, f"at index {cell_index}", count)
    return index


def insert_position(nb: NotebookNode, cell_index: int) -> int:
    """Where `insert_cell(cell_index)` puts a cell: -1 appends; 0..len inserts before that cell."""
    count = len(nb.cells)
    if isinstance(cell_index, bool) or not isinstance(cell_index, int):
        raise InvalidArgument("cell_index", "must be an integer")
    if cell_index == -1:
        return count
    if not 0 <= cell_index <= count:
        raise InvalidArgument("cell_index", f"{cell_index} is out of range: use 0..{count}, or -1 to append")
    return cell_index


def insert_cell(nb: NotebookNode, cell_index: int, cell_type: str, source: str) -> tuple[int, NotebookNode]:
    pos = insert_position(nb, cell_index)
    cell = new_cell(cell_type, source)
    nb.cells.insert(pos, cell)
    return pos, cell


def clear_outputs(cell: NotebookNode) -> None:
    if cell.cell_type == "code":
        cell.outputs = []
        cell.execution_count = None


def set_source(cell: NotebookNode, source: str) -> None:
    # outputs stay until the cell runs again, as in JupyterLab
    cell.source = source


def edit_source(cell: NotebookNode, old: str, new: str, *, replace_all: bool = False) -> int:
    """Replace `old` by `new`; unless replace_all, `old` must occur exactly once. Returns the count."""
    if old == "":
        raise InvalidArgument("old_string", "must not be empty")
    source = cell.source
    count = source.count(old)
    if count == 0:
        raise InvalidArgument("old_string", "not found in the cell's source")
    if count > 1 and not replace_all:
        raise InvalidArgument("old_string", f"occurs {count} times; make it unique or pass replace_all=true")
    cell.source = source.replace(old, new) if replace_all else source.replace(old, new, 1)
    return count if replace_all else 1


def move_cell(nb: NotebookNode, src: int, dst: int) -> int:
    count = len(nb.cells)
    if isinstance(dst, bool) or not isinstance(dst, int):
        raise InvalidArgument("new_index", "must be an integer")
    target = dst + count if dst < 0 else dst
    if not 0 <= target < count:
        raise InvalidArgument("new_index", f"{dst} is out of range: use 0..{count - 1}")
    cell = nb.cells.pop(src)
    nb.cells.insert(target, cell)
    return target


@dataclass(frozen=True)
class OutputPage:
    """A window of a cell's output text (all its outputs' text, joined)."""

    text: str
    offset: int
    total: int

    @property
    def next_offset(self) -> int | None:
        end = self.offset + len(self.text)
        return end if end < self.total else None


def output_page(cell: NotebookNode, offset: int, size: int, max_size: int) -> OutputPage:
    """`size` characters of the cell's output text from `offset` (`size` at most `max_size`)."""
    if offset < 0:
        raise InvalidArgument("output_offset", "must be 0 or more")
    if not 1 <= size <= max_size:
        raise InvalidArgument("max_chars", f"use 1..{max_size}")
    whole = "".join(output_text(o) or "" for o in cell.get("outputs", []))
    return OutputPage(whole[offset:offset + size], offset, len(whole))


def set_outputs(nb: NotebookNode, cell_id: str, outputs: list[NotebookNode], execution_count: int | None) -> int | None:
    """Put an execution's outputs into the code cell `cell_id`; its index, or None when the cell
    was deleted (or is no longer code) while it ran: nothing to save them into."""
    for i, cell in enumerate(nb.cells):
        if cell.get("id") == cell_id and cell.cell_type == "code":
            cell.outputs = outputs
            cell.execution_count = execution_count
            return i
    return None
