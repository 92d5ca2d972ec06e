"""The cell-caching encoder writes exactly nbformat's bytes, also after edits between writes."""

from __future__ import annotations

from typing import Any

import nbformat
from hypothesis import given, settings
from hypothesis import strategies as st
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output, new_raw_cell

from kernelpool.notebooks import cells as nbops
from kernelpool.notebooks.encoding import CellCachingEncoder

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
lines = st.lists(st.one_of(texts, st.just("\n"), st.just("\r\n"), st.just("\u2028")), max_size=4).map("".join)
keys = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=6)


@st.composite
def outputs(draw: st.DrawFn) -> NotebookNode:
    kind = draw(st.sampled_from(["stream", "display_data", "execute_result", "error"]))
    if kind == "stream":
        return new_output("stream", name=draw(st.sampled_from(["stdout", "stderr"])), text=draw(lines))
    if kind == "error":
        return new_output("error", ename=draw(texts), evalue=draw(lines), traceback=draw(st.lists(lines, max_size=3)))
    data: dict[str, Any] = {"text/plain": draw(lines)}
    if draw(st.booleans()):
        data["image/png"] = "iVBORw0KGgo=\n" + draw(st.text(alphabet="ABCxyz019+/", max_size=20))
    if draw(st.booleans()):
        data["application/json"] = draw(json_values)
    extra = {"execution_count": draw(st.integers(1, 99))} if kind == "execute_result" else {}
    return new_output(kind, data=data, metadata=draw(st.dictionaries(keys, json_values, max_size=2)), **extra)


@st.composite
def cells(draw: st.DrawFn) -> NotebookNode:
    kind = draw(st.sampled_from(["code", "markdown", "raw"]))
    source = draw(lines)
    if kind == "code":
        cell = new_code_cell(source, outputs=draw(st.lists(outputs(), max_size=3)),
                             execution_count=draw(st.none() | st.integers(1, 99)))
    else:
        cell = new_markdown_cell(source) if kind == "markdown" else new_raw_cell(source)
    cell.metadata = draw(st.dictionaries(keys, json_values, max_size=2))
    if draw(st.booleans()):
        cell.metadata["trusted"] = True  # transient: nbformat drops it from files
    return cell


@st.composite
def notebooks(draw: st.DrawFn) -> NotebookNode:
    nb = new_notebook(cells=draw(st.lists(cells(), max_size=5)))
    nb.metadata = draw(st.dictionaries(keys, json_values, max_size=2))
    if draw(st.booleans()):
        nb.metadata["orig_nbformat"] = 3  # transient too
    return nb


@settings(max_examples=150, deadline=None)
@given(nb=notebooks())
def test_same_bytes_as_nbformat(nb: NotebookNode) -> None:
    encoder = CellCachingEncoder()
    expected = nbformat.writes(nb)
    assert encoder.encode(nb) == expected
    assert encoder.encode(nb) == expected  # from the cache
    assert nbformat.reads(expected, as_version=4) is not None


@settings(max_examples=100, deadline=None)
@given(nb=notebooks(), new=cells(), source=lines, out=outputs(), data=st.data())
def test_edits_between_writes_are_seen(nb: NotebookNode, new: NotebookNode, source: str, out: NotebookNode,
                                       data: st.DataObject) -> None:
    encoder = CellCachingEncoder()
    encoder.encode(nb)
    # the ways the service changes a notebook: new parts assigned, cells inserted, moved, removed
    n = len(nb.cells)
    edit = data.draw(st.sampled_from(["insert", "source", "outputs", "clear", "move", "delete", "count"]))
    if edit == "insert" or n == 0:
        nbops.insert_cell(nb, data.draw(st.integers(0, n)), new.cell_type, new.source)
    else:
        i = data.draw(st.integers(0, n - 1))
        cell = nb.cells[i]
        if edit == "source":
            nbops.set_source(cell, source)
        elif edit == "outputs" and cell.cell_type == "code":
            cell.outputs = [*cell.outputs, out]
        elif edit == "clear":
            nbops.clear_outputs(cell)
        elif edit == "move":
            nbops.move_cell(nb, i, data.draw(st.integers(0, n - 1)))
        elif edit == "delete":
            del nb.cells[i]
        elif edit == "count" and cell.cell_type == "code":
            cell.execution_count = data.draw(st.integers(1, 99))
    assert encoder.encode(nb) == nbformat.writes(nb)
