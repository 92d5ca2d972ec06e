"""From a notebook file's bytes to a parsed notebook, with the memory that takes known beforehand.

A notebook file is JSON that a user's kernel may have written. Parsing it with nbformat turns
each JSON value into a Python object, and what that costs depends on the shape, not the size:
measured with nbformat 5.11 on Python 3.11 (peak RSS while parsing, per byte of file), a file of
long ASCII strings takes 2.3x, one with a character beyond U+FFFF 8.3x, many tiny cells 25x,
a list of empty lists 49x, of empty objects 173x. So the size cap (max_notebook_bytes) alone
does not bound the server's memory: `parse_cost` is an upper bound of what parsing the bytes
will hold at its peak, from counts taken in C over the bytes (every JSON value but the first
follows a ',', ':', '[' or '{'; counting those inside strings too only overestimates), and the
notebook service refuses a file whose cost is over its budget before parsing it, and weighs
cached notebooks by it. `tests/test_filework.py` checks the bound on generated worst cases.
Callers: `kernelpool.notebooks.service`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import nbformat
from nbformat import NotebookNode

from kernelpool.errors import CorruptNotebook
from kernelpool.notebooks import cells

# bytes held at the peak per JSON object ('{': a dict and the NotebookNode nbformat makes of
# it) and per other value (a list and its copy, a string, a number: after ',' ':' or '['), measured (see above)
_OBJECT, _VALUE = 700, 128
_SLACK = 16 << 20  # what the allocator and nbformat's validator hold beyond the objects
# bytes.translate deleting these leaves the bytes that start a JSON value: one C pass, a small copy
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"{[,:")
_BELOW_ASTRAL = bytes(range(0xF0))  # deleting these leaves the lead bytes of characters beyond U+FFFF
_ESCAPED_ASTRAL = re.compile(rb"\\u[dD][89abAB]")  # half of an escaped surrogate pair (or a lone one)
_WIDE_ESCAPE = re.compile(rb"\\u(?!00)")  # an escaped character from U+0100 on


def parse_cost(data: bytes | bytearray) -> int:
    """An upper bound of the memory, in bytes, that `parse` of `data` holds at its peak: the
    bytes, the decoded text and the parsed strings (1, 2 or 4 bytes per character, as CPython
    stores text), plus the objects made for the counted JSON values. A few passes in C over the
    bytes (about 5 ms per MB on a busy 2-core machine)."""
    size = len(data)
    ascii_only = data.isascii()
    if _ESCAPED_ASTRAL.search(data) or (not ascii_only and data.translate(None, _BELOW_ASTRAL)):
        kind = 4
    elif ascii_only and not _WIDE_ESCAPE.search(data):
        kind = 1
    else:
        kind = 2
    marks = data.translate(None, _NOT_STRUCTURE)
    objects = marks.count(b"{")
    return size * (1 + 2 * kind) + _SLACK + _OBJECT * objects + _VALUE * (len(marks) - objects)


def parse(data: bytes | bytearray, path: str) -> NotebookNode:
    """The notebook in `data`, upgraded to nbformat 4.5 (cell ids); CorruptNotebook if it is not one."""
    invalid: dict[str, Any] = {}
    try:
        text = data.decode("utf-8")
        nb: NotebookNode = nbformat.reads(text, as_version=4, capture_validation_error=invalid)
    except (UnicodeDecodeError, json.JSONDecodeError, nbformat.reader.NotJSONError) as exc:
        raise CorruptNotebook(path, f"not JSON: {exc}") from None
    except RecursionError:
        raise CorruptNotebook(path, "its JSON is nested too deeply") from None
    except Exception as exc:  # nbformat raises assorted errors for wrong shapes
        raise CorruptNotebook(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if "ValidationError" in invalid:
        raise CorruptNotebook(path, invalid["ValidationError"].message)
    # notebooks older than 4.5 get cell ids on upgrade, so that cells can be addressed by id
    if nb.nbformat_minor < 5:
        nb.nbformat_minor = 5
        for cell in nb.cells:
            if "id" not in cell:
                cell.id = cells.new_cell("raw", "").id
    return nb
