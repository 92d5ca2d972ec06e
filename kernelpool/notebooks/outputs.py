"""The readable text of a notebook output (stream, error, rich data), ANSI codes removed.

Pure functions on nbformat outputs. Callers: the notebook service (paging a cell's output
text), the tool layer's content formatting and resources (`kernelpool.mcp`).
"""

from __future__ import annotations

import re
from typing import Any

from nbformat import NotebookNode

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*(\x07|\x1b\\)")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def joined(value: Any) -> str:
    """A multiline nbformat value (a string, or a list of strings) as one string."""
    return "".join(value) if isinstance(value, list) else str(value)


def raw_text(out: NotebookNode) -> str | None:
    """The text of one output as stored, ANSI codes and all; None when it has none (an image alone)."""
    kind = out.get("output_type")
    if kind == "stream":
        return joined(out.get("text", ""))
    if kind == "error":
        return "\n".join(out.get("traceback", [])) or f"{out.get('ename')}: {out.get('evalue')}"
    if kind in ("execute_result", "display_data"):
        data = out.get("data", {})
        for mime in ("text/markdown", "text/plain", "application/json", "text/html"):
            if mime in data:
                value = data[mime]
                return value if isinstance(value, str) else joined(value) if isinstance(value, list) else str(value)
    return None


def output_text(out: NotebookNode) -> str | None:
    """The readable text of one output, or None when it has none (an image alone)."""
    raw = raw_text(out)
    return strip_ansi(raw) if raw is not None else None
