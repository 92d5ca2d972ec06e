"""The `.ipynb` bytes of a notebook, re-encoding only the cells that changed since the last write.

`nbformat.writes` deep-copies the whole notebook, splits every multi-line string into lines and
encodes everything, on every save: with a 12 MB notebook that is most of a cell's cost, and it
grows with every cell added. `CellCachingEncoder` gives the same bytes (a test compares them
with nbformat's on generated notebooks) but keeps each cell's encoded text while the cell is
unchanged, so a save costs the changed cells plus joining the rest.

"Unchanged" is decided by `fingerprint` and `unchanged` (also what the notebook service uses to
validate only changed cells): edits assign new objects to a cell's parts and never change them
in place, so identity tells a changed cell.
"""

from __future__ import annotations

import copy
import json
import secrets
from typing import Any

from nbformat import NotebookNode
from nbformat.v4.nbjson import BytesEncoder
from nbformat.v4.rwbase import split_lines

# nbformat's own settings for files (nbformat.v4.nbjson.JSONWriter.writes)
_DUMP: dict[str, Any] = {"cls": BytesEncoder, "indent": 1, "sort_keys": True, "separators": (",", ": "),
                         "ensure_ascii": False}
_CELL_INDENT = "\n  "  # a cell sits two levels deep: {"cells": [ <cell>, ... ]}
_CELL_PARTS = ("source", "outputs", "metadata", "attachments")


def fingerprint(cell: NotebookNode) -> tuple[Any, ...]:
    """What a change to a cell replaces: edits assign new objects to these keys (never change
    them in place), so holding the objects and comparing with `is` tells a changed cell."""
    return (cell, len(cell), cell.get("cell_type"), cell.get("id"), cell.get("execution_count"),
            *(cell.get(k) for k in _CELL_PARTS))


def unchanged(cell: NotebookNode, known: tuple[Any, ...] | None) -> bool:
    if known is None:
        return False
    now = fingerprint(cell)
    return all(a is b or (type(a) in (int, str, type(None)) and a == b) for a, b in zip(now, known, strict=True))


def encode_cell(cell: NotebookNode) -> str:
    """One cell as it stands in the file, indented for its place in the cells list."""
    ready = split_lines(NotebookNode(cells=[copy.deepcopy(cell)])).cells[0]
    ready.get("metadata", {}).pop("trusted", None)  # nbformat's strip_transient
    # JSON strings hold no raw newline: every newline in the text is indentation
    return json.dumps(ready, **_DUMP).replace("\n", _CELL_INDENT)


def encode_outer(nb: NotebookNode, cells: list[str]) -> str:
    """The notebook around its already encoded cells."""
    outer = {k: v for k, v in nb.items() if k != "cells"}
    metadata = dict(outer.get("metadata", {}))
    for transient in ("orig_nbformat", "orig_nbformat_minor", "signature"):
        metadata.pop(transient, None)
    outer["metadata"] = metadata
    if not cells:
        outer["cells"] = []
        return json.dumps(outer, **_DUMP)
    # "cells" sorts first, so the marker's first occurrence is the cells list's only item
    marker = f"kp-cells-{secrets.token_hex(8)}"
    outer["cells"] = [marker]
    text = json.dumps(outer, **_DUMP)
    return text.replace(json.dumps(marker), ",\n  ".join(cells), 1)


class CellCachingEncoder:
    """Encodes notebooks, reusing each unchanged cell's text from the previous encoding."""

    def __init__(self) -> None:
        # id(notebook) -> {id(cell): (fingerprint, text)}; a fingerprint holds its cell, so an
        # id cannot be reused by another cell while its entry exists
        self._cells: dict[int, dict[int, tuple[tuple[Any, ...], str]]] = {}

    def encode(self, nb: NotebookNode) -> str:
        known = self._cells.get(id(nb), {})
        fresh: dict[int, tuple[tuple[Any, ...], str]] = {}
        texts = []
        for cell in nb.cells:
            held = known.get(id(cell))
            if held is None or not unchanged(cell, held[0]):
                held = (fingerprint(cell), encode_cell(cell))
            fresh[id(cell)] = held
            texts.append(held[1])
        self._cells[id(nb)] = fresh
        return encode_outer(nb, texts)

    def forget(self, nb: NotebookNode) -> None:
        self._cells.pop(id(nb), None)

