"""The cell rules every editing tool relies on (kernelpool/notebooks/cells.py): how an index or an id
names a cell, where an insert goes, what an edit refuses; and that a refused edit changes nothing."""

from __future__ import annotations

import pytest
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from kernelpool.errors import CellNotFound, InvalidArgument
from kernelpool.notebooks import cells


def notebook(*sources: str) -> NotebookNode:
    return new_notebook(cells=[new_code_cell(s) for s in sources])


def test_a_cell_is_named_by_index_from_either_end_or_by_id() -> None:
    nb = notebook("a", "b", "c")
    assert [cells.cell_position(nb, "n.ipynb", i, None) for i in (0, 2, -1, -3)] == [0, 2, 2, 0]
    assert cells.cell_position(nb, "n.ipynb", None, nb.cells[1].id) == 1
    assert cells.cell_position(nb, "n.ipynb", 0, nb.cells[2].id) == 2, "the id wins over the index"


@pytest.mark.parametrize("index, cell_id, error, words", [
    (3, None, CellNotFound, "at index 3"), (-4, None, CellNotFound, "at index -4"),
    (None, "nosuch", CellNotFound, "with id 'nosuch'"), (None, None, InvalidArgument, "give cell_index or cell_id"),
    (True, None, InvalidArgument, "cell_index: must be an integer"), ("1", None, InvalidArgument, "must be an integer"),
])
def test_a_cell_that_is_not_there_is_named_in_the_error(index: object, cell_id: str | None, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        cells.cell_position(notebook("a", "b", "c"), "n.ipynb", index, cell_id)  # type: ignore[arg-type]


def test_inserts_go_before_the_cell_at_the_index_and_minus_one_appends() -> None:
    nb = notebook("a", "b")
    assert cells.insert_cell(nb, 0, "markdown", "first")[0] == 0
    assert cells.insert_cell(nb, -1, "raw", "last")[0] == 3
    assert cells.insert_cell(nb, 4, "code", "end")[0] == 4, "len(cells) appends too"
    assert [(c.cell_type, c.source) for c in nb.cells] == [
        ("markdown", "first"), ("code", "a"), ("code", "b"), ("raw", "last"), ("code", "end")]
    assert len({c.id for c in nb.cells}) == 5


@pytest.mark.parametrize("index", [6, -2, False, 1.0])
def test_an_insert_out_of_range_changes_nothing(index: object) -> None:
    nb = notebook("a", "b", "c", "d", "e")
    with pytest.raises(InvalidArgument, match="cell_index"):
        cells.insert_cell(nb, index, "code", "x")  # type: ignore[arg-type]
    assert [c.source for c in nb.cells] == ["a", "b", "c", "d", "e"]


def test_an_unknown_cell_type_is_refused_with_the_choices() -> None:
    with pytest.raises(InvalidArgument, match="'python': use one of code, markdown, raw"):
        cells.insert_cell(notebook(), -1, "python", "x")


def test_edit_source_replaces_one_unique_occurrence_or_all_when_asked() -> None:
    cell = new_code_cell("x = 1\ny = x + x\n")
    assert cells.edit_source(cell, "y", "z", False) == 1 and cell.source == "x = 1\nz = x + x\n"
    for old, words in (("x", "occurs 3 times; make it unique or pass replace_all=true"),
                       ("w", "not found in the cell's source"), ("", "must not be empty")):
        with pytest.raises(InvalidArgument, match=words):
            cells.edit_source(cell, old, "q", False)
    assert cell.source == "x = 1\nz = x + x\n", "a refused edit changes nothing"
    assert cells.edit_source(cell, "x", "v", True) == 3 and cell.source == "v = 1\nz = v + v\n"


def test_move_takes_the_target_index_from_either_end() -> None:
    nb = notebook("a", "b", "c", "d")
    assert cells.move_cell(nb, 0, -1) == 3 and [c.source for c in nb.cells] == ["b", "c", "d", "a"]
    assert cells.move_cell(nb, 3, 1) == 1 and [c.source for c in nb.cells] == ["b", "a", "c", "d"]
    for bad in (4, -5, True):
        with pytest.raises(InvalidArgument, match="new_index"):
            cells.move_cell(nb, 0, bad)
    assert [c.source for c in nb.cells] == ["b", "a", "c", "d"]


def test_clearing_outputs_leaves_other_cells_alone() -> None:
    code = new_code_cell("1", outputs=[new_output("stream", name="stdout", text="1")], execution_count=3)
    text = new_markdown_cell("# m")
    cells.clear_outputs(code)
    cells.clear_outputs(text)
    assert (code.outputs, code.execution_count) == ([], None) and "outputs" not in text


def test_output_pages_walk_the_joined_text_within_bounds() -> None:
    cell = new_code_cell("", outputs=[new_output("stream", name="stdout", text="0123456789"),
                                      new_output("stream", name="stderr", text="abcdef")])
    first = cells.output_page(cell, 0, 6, 100)
    assert (first.text, first.total, first.next_offset) == ("012345", 16, 6)
    last = cells.output_page(cell, 12, 6, 100)
    assert (last.text, last.next_offset) == ("cdef", None)
    assert cells.output_page(cell, 50, 6, 100).text == ""
    for offset, size, words in ((-1, 5, "output_offset"), (0, 0, "max_chars: use 1..100"), (0, 101, "max_chars")):
        with pytest.raises(InvalidArgument, match=words):
            cells.output_page(cell, offset, size, 100)


def test_outputs_go_to_the_code_cell_with_the_id_wherever_it_moved() -> None:
    nb = notebook("a", "b")
    target = nb.cells[1].id
    cells.move_cell(nb, 1, 0)
    out = [new_output("stream", name="stdout", text="done")]
    assert cells.set_outputs(nb, target, out, 7) == 0
    assert nb.cells[0].outputs == out and nb.cells[0].execution_count == 7 and nb.cells[1].outputs == []
    assert cells.set_outputs(nb, "deleted-meanwhile", out, 8) is None
    nb.cells[0] = new_markdown_cell("now markdown", id=target)
    assert cells.set_outputs(nb, target, out, 9) is None, "no longer code: nothing to save them into"
