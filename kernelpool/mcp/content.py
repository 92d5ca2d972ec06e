"""Notebook outputs as MCP content (text and images) and as plain structured data.

Pure functions; the tool layer calls them to format execution results and `read_cell`.
"""

from __future__ import annotations

from typing import Any

from mcp.types import ImageContent, TextContent
from nbformat import NotebookNode

from kernelpool.notebooks.outputs import joined, output_text, raw_text, strip_ansi

__all__ = ["b64_size", "bounded_text", "output_text", "simplify", "strip_ansi", "to_content", "truncate"]


def bounded_text(out: NotebookNode, max_chars: int) -> tuple[str, int] | None:
    """`truncate(output_text(out), max_chars)`, without reading (stripping) more than the part shown:
    a 20 MB output costs what a 20 kB one does. The count cut is exact but for ANSI codes in the middle."""
    raw = raw_text(out)
    if raw is None:
        return None
    if len(raw) <= 4 * max_chars:
        return truncate(strip_ansi(raw), max_chars)
    head_n = max_chars * 2 // 3
    tail_n = max_chars - head_n
    head = strip_ansi(raw[:2 * head_n])[:head_n]
    tail = strip_ansi(raw[-2 * tail_n:])[-tail_n:] if tail_n else ""
    cut = len(raw) - 2 * head_n - 2 * tail_n + (2 * head_n - len(head)) + (2 * tail_n - len(tail))
    return f"{head}\n[... {cut} characters cut ...]\n{tail}", cut


def simplify(out: NotebookNode, max_chars: int) -> dict[str, Any]:
    """A small JSON shape of one output for structured content."""
    kind = out.get("output_type")
    item: dict[str, Any] = {"type": kind}
    if kind == "stream":
        item["name"] = out.get("name")
    if kind == "error":
        item["ename"] = out.get("ename")
        item["evalue"] = out.get("evalue")
    shown = bounded_text(out, max_chars)
    if shown is not None:
        item["text"], cut = shown
        if cut:
            item["truncated"] = cut
    if kind in ("execute_result", "display_data"):
        item["mime_types"] = sorted(out.get("data", {}).keys())
    return item


def truncate(text: str, max_chars: int) -> tuple[str, int]:
    """At most max_chars of text, keeping head and tail; returns the text and how many chars were cut."""
    if len(text) <= max_chars:
        return text, 0
    head = max_chars * 2 // 3
    tail = max_chars - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[-tail:]}", cut


def to_content(
    outputs: list[NotebookNode], max_chars: int, max_image_bytes: int
) -> list[TextContent | ImageContent]:
    """MCP content blocks for a cell's outputs: text (bounded overall) and PNG/JPEG images."""
    blocks: list[TextContent | ImageContent] = []
    budget = max_chars
    for out in outputs:
        text = raw_text(out)
        data = out.get("data", {}) if out.get("output_type") in ("execute_result", "display_data") else {}
        image_mime = next((m for m in ("image/png", "image/jpeg") if m in data), None)
        if image_mime is not None:
            encoded = joined(data[image_mime]).replace("\n", "")
            size = b64_size(encoded)
            if size <= max_image_bytes:
                blocks.append(ImageContent(type="image", data=encoded, mime_type=image_mime))
            else:
                blocks.append(TextContent(type="text", text=f"[{image_mime} image of {size} bytes, over the "
                                          f"{max_image_bytes}-byte limit for inline images: not inlined]"))
            if text is None or text.startswith("<Figure"):
                continue
        if text is None:
            continue
        if budget <= 0:
            blocks.append(TextContent(type="text", text="[... more output cut: read the cell with read_cell ...]"))
            break
        bounded = bounded_text(out, budget)
        if bounded is None:  # not so: it has text
            continue
        shown, cut = bounded
        budget -= len(shown)
        blocks.append(TextContent(type="text", text=shown))
    return blocks


def b64_size(encoded: str) -> int:
    # from the length alone: decoding a 50 MB image only to measure it would cost 50 MB
    return len(encoded) * 3 // 4 - encoded[-2:].count("=")
