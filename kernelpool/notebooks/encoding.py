"""The `.ipynb` bytes of a notebook, re-encoding only the cells that changed since the last write.

`nbformat.writes` deep-copies the whole notebook, splits every multi-line string into lines and
encodes everything, on every save: with a 12 MB notebook that is most of a cell's cost, and it
grows with every cell added. `CellCachingEncoder` gives the same bytes (a test compares them
with nbformat's on generated notebooks) but keeps each cell's encoded text while the cell is
unchanged, so a save costs the changed cells plus joining the rest.

"Unchanged" is decided by `fingerprint` and `same` (also what the notebook service uses to
validate only changed cells): edits assign new objects to a cell's parts and never change them
in place, so identity tells a changed cell.
"""

from __future__ import annotations

import copy
import json
import operator
import re
import secrets
from typing import Any

from nbformat import NotebookNode
from nbformat.v4.nbjson import BytesEncoder
from nbformat.v4.rwbase import split_lines

# nbformat's own settings for files (nbformat.v4.nbjson.JSONWriter.writes)
_DUMP: dict[str, Any] = {"cls": BytesEncoder, "indent": 1, "sort_keys": True, "separators": (",", ": "),
                         "ensure_ascii": False}
_CELL_INDENT = "\n  "  # a cell sits two levels deep: {"cells": [ <cell>, ... ]}
_SURROGATE = re.compile("[\ud800-\udfff]")
# (the objects a change to a cell replaces, compared by identity; its scalar fields, by value)
Mark = tuple[tuple[Any, ...], tuple[Any, ...]]


def fingerprint(cell: NotebookNode) -> Mark:
    """What a change to a cell replaces: edits assign new objects to its parts (never change
    them in place), so holding the objects and comparing them with `is` tells a changed cell."""
    get = cell.get
    return ((cell, get("source"), get("outputs"), get("metadata"), get("attachments")),
            (len(cell), get("cell_type"), get("id"), get("execution_count")))


def same(now: Mark, known: Mark | None) -> bool:
    """Whether a cell's mark now is the one it had (`known`: None when it had none)."""
    return known is not None and now[1] == known[1] and all(map(operator.is_, now[0], known[0]))


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


def file_bytes(text: str) -> bytes:
    """The UTF-8 bytes of an encoded notebook. A notebook can hold lone surrogates (a file with a
    "\\ud800" escape, a kernel's output), which UTF-8 cannot encode: each is written back as its
    JSON escape, as such a file has it. They can only stand inside JSON strings, where the escape
    means the same character, so the file stays valid UTF-8 and valid JSON, and reads back the same."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode("utf-8")


class CellCachingEncoder:
    """Encodes notebooks, reusing each unchanged cell's text from the previous encoding."""

    def __init__(self) -> None:
        # id(notebook) -> {id(cell): (mark, text)}; a mark holds its cell, so an id cannot be
        # reused by another cell while its entry exists
        self._cells: dict[int, dict[int, tuple[Mark, str]]] = {}

    def encode(self, nb: NotebookNode, marks: list[Mark] | None = None) -> str:
        """The file's text; `marks` are the cells' fingerprints if the caller has them already."""
        known = self._cells.get(id(nb), {})
        fresh: dict[int, tuple[Mark, str]] = {}
        texts = []
        for cell, mark in zip(nb.cells, marks if marks is not None else map(fingerprint, nb.cells), strict=True):
            held = known.get(id(cell))
            if held is None or not same(mark, held[0]):
                held = (mark, encode_cell(cell))
            fresh[id(cell)] = held
            texts.append(held[1])
        self._cells[id(nb)] = fresh
        return encode_outer(nb, texts)

    def forget(self, nb: NotebookNode) -> None:
        self._cells.pop(id(nb), None)

