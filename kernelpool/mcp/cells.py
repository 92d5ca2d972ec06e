"""Tools on one cell: read_cell, insert_cell, overwrite_cell_source, edit_cell_source, delete_cell,
move_cell, clear_cell_output. A cell is named by `cell_index` (negative counts from the end) or `cell_id`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

from mcp.types import CallToolResult
from nbformat import NotebookNode

from kernelpool.mcp.call import DESTRUCTIVE, EDIT, READ, Call, Tools, result
from kernelpool.mcp.content import simplify, to_content
from kernelpool.mcp.resources import output_links
from kernelpool.notebooks import cells

TOOLS = Tools()
T = TypeVar("T")


def cell_summary(i: int, cell: NotebookNode) -> dict[str, Any]:
    item: dict[str, Any] = {"index": i, "id": cell.get("id"), "cell_type": cell.cell_type}
    if cell.cell_type == "code":
        item["execution_count"] = cell.get("execution_count")
    return item


@TOOLS.add("read_cell", "Read one cell (by cell_index or cell_id): its source and, optionally, its outputs. "
           "For output too long for one reply, pass output_offset (0, then each reply's next_offset) to page "
           "through the outputs' text, max_chars at a time.", READ)
async def read_cell(
    call: Call, *, cell_index: int | None = None, cell_id: str | None = None, notebook: str | None = None,
    include_outputs: bool = True, output_offset: int | None = None, max_chars: int | None = None,
) -> CallToolResult:
    path = call.notebook(notebook)
    st = call.services.settings
    if output_offset is not None:
        size = st.max_output_chars if max_chars is None else max_chars
        i, cell, page = await call.services.notebooks.output_page(
            call.user, path, cell_index=cell_index, cell_id=cell_id, offset=output_offset, size=size,
            max_size=st.max_output_chars)
        data = cell_summary(i, cell) | {"notebook": path, "source": cell.source}
        data |= {"output_text": page.text, "output_offset": page.offset, "total_chars": page.total,
                 "next_offset": page.next_offset}
        return result(page.text, data)
    i, cell = await call.services.notebooks.cell(call.user, path, cell_index=cell_index, cell_id=cell_id)
    data = cell_summary(i, cell) | {"notebook": path, "source": cell.source}
    extra: list[Any] = []
    if include_outputs and cell.cell_type == "code":
        data["outputs"] = [simplify(o, st.max_output_chars) for o in cell.outputs]
        extra = [*to_content(cell.outputs, st.max_output_chars, st.max_image_bytes)]
        extra += output_links(path, cell.id, cell.outputs, st.max_output_chars, st.max_image_bytes)
    return result(f"[{i}] {cell.cell_type} id={cell.id}\n{cell.source}", data, extra)


@TOOLS.add("insert_cell", "Insert a cell at cell_index (-1 appends). cell_type: code, markdown or raw.", EDIT)
async def insert_cell(
    call: Call, *, cell_index: int, cell_type: Literal["code", "markdown", "raw"], cell_source: str,
    notebook: str | None = None,
) -> CallToolResult:
    path = call.notebook(notebook)
    pos, cell = await call.services.notebooks.insert(call.user, path, cell_index, cell_type, cell_source)
    return result(f"inserted {cell_type} cell at index {pos} (id {cell.id})",
                  {"notebook": path, "cell_index": pos, "cell_id": cell.id})


async def _edit(call: Call, notebook: str | None, cell_index: int | None, cell_id: str | None,
                apply: Callable[[NotebookNode, int], T]) -> tuple[str, int, str, T]:
    """Change the cell named by index or id: (path, index, id, what `apply(nb, index)` returned)."""
    path = call.notebook(notebook)
    i, cid, out = await call.services.notebooks.edit_cell(call.user, path, apply, cell_index=cell_index,
                                                          cell_id=cell_id)
    return path, i, cid, out


@TOOLS.add("overwrite_cell_source", "Replace a cell's whole source.", EDIT)
async def overwrite_cell_source(
    call: Call, *, cell_source: str, cell_index: int | None = None, cell_id: str | None = None,
    notebook: str | None = None,
) -> CallToolResult:
    path, i, cid, _ = await _edit(call, notebook, cell_index, cell_id,
                                  lambda nb, i: cells.set_source(nb.cells[i], cell_source))
    return result(f"overwrote cell {i} (id {cid})", {"notebook": path, "cell_index": i, "cell_id": cid})


@TOOLS.add("edit_cell_source", "Replace old_string by new_string in a cell's source (old_string must be unique unless replace_all).", EDIT)
async def edit_cell_source(
    call: Call, *, old_string: str, new_string: str, replace_all: bool = False, cell_index: int | None = None,
    cell_id: str | None = None, notebook: str | None = None,
) -> CallToolResult:
    path, i, cid, n = await _edit(call, notebook, cell_index, cell_id,
                                  lambda nb, i: cells.edit_source(nb.cells[i], old_string, new_string,
                                                                    replace_all=replace_all))
    return result(f"replaced {n} occurrence(s) in cell {i} (id {cid})",
                  {"notebook": path, "cell_index": i, "cell_id": cid, "replacements": n})


@TOOLS.add("delete_cell", "Delete a cell.", DESTRUCTIVE)
async def delete_cell(
    call: Call, *, cell_index: int | None = None, cell_id: str | None = None, notebook: str | None = None,
) -> CallToolResult:
    path, i, cid, cell = await _edit(call, notebook, cell_index, cell_id, lambda nb, i: nb.cells.pop(i))
    return result(f"deleted {cell.cell_type} cell {i} (id {cid})",
                  {"notebook": path, "cell_index": i, "cell_id": cid, "source": cell.source})


@TOOLS.add("move_cell", "Move a cell to new_index.", EDIT)
async def move_cell(
    call: Call, *, new_index: int, cell_index: int | None = None, cell_id: str | None = None,
    notebook: str | None = None,
) -> CallToolResult:
    path, i, cid, j = await _edit(call, notebook, cell_index, cell_id, lambda nb, i: cells.move_cell(nb, i, new_index))
    return result(f"moved cell {cid} from {i} to {j}", {"notebook": path, "from": i, "to": j, "cell_id": cid})


@TOOLS.add("clear_cell_output", "Clear a code cell's outputs and execution count.", EDIT)
async def clear_cell_output(
    call: Call, *, cell_index: int | None = None, cell_id: str | None = None, notebook: str | None = None,
) -> CallToolResult:
    path, i, cid, _ = await _edit(call, notebook, cell_index, cell_id, lambda nb, i: cells.clear_outputs(nb.cells[i]))
    return result(f"cleared outputs of cell {i} (id {cid})", {"notebook": path, "cell_index": i, "cell_id": cid})
