"""Everything the server sends is valid Unicode: lone surrogates become U+FFFD at the edge.

A notebook can hold strings that are not valid Unicode: a lone surrogate written as a JSON escape
("\\ud800") in the .ipynb, or sent by a kernel in an output message; a file name made of bytes that
are not UTF-8 comes back from the file system with surrogate escapes. UTF-8 cannot encode a lone
surrogate, so the SDK's serialisation failed: with a session the server logged "Error in message
router" and the session stopped answering; sessionless clients got JSON they could not parse.
Every reply passes `clean_replies` (MCP server middleware, after the handler shaped its result
for the wire, and for JSON-RPC errors); notifications, which no middleware sees, are built from
`clean`ed values (`kernelpool.mcp.notices`). The notebook file keeps what it held
(`kernelpool.notebooks.encoding.file_bytes`). NULs are valid JSON (escaped) and pass as they are.
Callers: `kernelpool.mcp.server`, `kernelpool.mcp.notices`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mcp import MCPError

_SURROGATE = re.compile("[\ud800-\udfff]")
_INTERNAL_ERROR = -32603


def clean_text(text: str) -> str:
    # an ASCII string (most of them) is told in O(1) and cannot hold a surrogate
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


def clean(value: Any) -> Any:
    """`value` (JSON-shaped: dicts, lists, strings, scalars) with every lone surrogate in its
    strings and keys replaced by U+FFFD; the same objects where nothing needed replacing."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        pairs = [(clean_text(k) if isinstance(k, str) else k, clean(v)) for k, v in value.items()]
        same = all(new[0] is old[0] and new[1] is old[1] for new, old in zip(pairs, value.items(), strict=True))
        return value if same else dict(pairs)
    if isinstance(value, list | tuple):
        items = [clean(item) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
    return value


def _may_hold_surrogates(value: Any) -> bool:
    # one pass in C: with ensure_ascii every surrogate, lone or paired (a character beyond
    # U+FFFF), is written as a \udXXX escape; a false alarm only costs the walk in `clean`
    try:
        return "\\ud" in json.dumps(value)
    except (TypeError, ValueError):
        return True


async def clean_replies(ctx: Any, call_next: Any) -> Any:
    """MCP server middleware: the reply to every request, result or error, made valid Unicode."""
    try:
        result = await call_next(ctx)
        return clean(result) if _may_hold_surrogates(result) else result
    except MCPError as exc:
        message, data = clean_text(exc.message), clean(exc.data)
        if message is exc.message and data is exc.data:
            raise
        raise MCPError(code=exc.code, message=message, data=data) from exc
    except Exception as exc:
        text = str(exc)
        if clean_text(text) is text:
            raise
        # the SDK would put this text in the error reply: say the same, encodable
        raise MCPError(code=_INTERNAL_ERROR, message=clean_text(text)) from exc
