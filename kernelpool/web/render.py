"""Notebook cells as HTML for the read-only view, treating everything in them as hostile.

Markdown goes through mistune (the parser nbconvert itself uses) and then nh3 (the ammonia
sanitiser); HTML outputs go through nh3 too: no script, no event attribute, no `style`, no
iframe or object, links only to http(s) and mail, no relative URL (an output must not point
the browser at this server's own pages). Images are shown from `data:` URLs, SVG included
(an SVG shown as an image runs no script). Streams and tracebacks are escaped text with their
ANSI colours as classes (the page's CSP allows no inline style). The page's CSP is the second
wall: no inline script, no eval, images only from the server or `data:`.

nbconvert's HTML exporter was measured and not used: 2.6-3.3 s for a notebook of 600 cells
(its Jinja templates, Pygments and its own sanitising) against the budget of well under one,
plus about 20 packages (63 MB); see docs/architecture.md. Callers: `kernelpool.web.view`,
`kernelpool.web.live`.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
from collections.abc import Iterable
from typing import Any

import mistune
import nh3
from nbformat import NotebookNode

_MARKDOWN = mistune.create_markdown(escape=False, plugins=["table", "strikethrough", "url", "task_lists"])
_SCHEMES = {"http", "https", "mailto"}
_IMAGES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_MAX_TEXT = 200_000  # characters of one text output shown; the rest is in the notebook (download it)


def sanitise(markup: str) -> str:
    """Untrusted HTML made safe to put into the page (nh3's defaults, tightened)."""
    return nh3.clean(markup, url_schemes=_SCHEMES, url_relative="deny", link_rel="noopener noreferrer nofollow",
                     strip_comments=True)


def markdown(text: str) -> str:
    return sanitise(_MARKDOWN(text))  # type: ignore[arg-type]  # mistune's renderer returns str here


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


# ---- ANSI colours -------------------------------------------------------------------------

_ESCAPES = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b[\]P^_][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?")
_NAMES = ("black", "red", "green", "yellow", "blue", "magenta", "cyan", "white")


def _sgr(codes: list[int], state: dict[str, str | None]) -> None:
    i = 0
    while i < len(codes):
        code = codes[i]
        if code == 0:
            state.update(fg=None, bg=None, bold=None)
        elif code == 1:
            state["bold"] = "ansi-bold"
        elif code == 22:
            state["bold"] = None
        elif 30 <= code <= 37 or 90 <= code <= 97:
            state["fg"] = f"ansi-{'bright-' if code >= 90 else ''}{_NAMES[code % 10]}-fg"
        elif 40 <= code <= 47 or 100 <= code <= 107:
            state["bg"] = f"ansi-{'bright-' if code >= 100 else ''}{_NAMES[code % 10]}-bg"
        elif code == 39:
            state["fg"] = None
        elif code == 49:
            state["bg"] = None
        elif code in (38, 48):  # 256 colours or RGB: skipped (a class per colour is not worth it)
            i += 2 if i + 1 < len(codes) and codes[i + 1] == 5 else 4
        i += 1


def ansi(text: str) -> str:
    """Terminal text as escaped HTML: SGR colours become spans with classes, every other escape goes."""
    out: list[str] = []
    state: dict[str, str | None] = {"fg": None, "bg": None, "bold": None}
    pos = 0

    def emit(chunk: str) -> None:
        if not chunk:
            return
        classes = " ".join(c for c in state.values() if c)
        escaped = html.escape(chunk, quote=False)
        out.append(f'<span class="{classes}">{escaped}</span>' if classes else escaped)

    for match in _ESCAPES.finditer(text):
        emit(text[pos:match.start()])
        pos = match.end()
        if match.group(2) == "m":
            codes = [int(c) for c in (match.group(1) or "0").split(";") if c.isdigit()] or [0]
            _sgr(codes, state)
    emit(text[pos:])
    return "".join(out)


# ---- outputs ------------------------------------------------------------------------------

def _pre(text: str, kind: str) -> str:
    if len(text) > _MAX_TEXT:
        text = text[:_MAX_TEXT // 2] + "\n[... cut in this view: download the notebook for all of it ...]\n" + text[-_MAX_TEXT // 2:]
    return f'<pre class="{kind}">{ansi(text)}</pre>'


def _image(mime: str, value: Any) -> str | None:
    data = _text(value).replace("\n", "").strip()
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None  # not base64: never put it into a URL
    return f'<img class="output-image" alt="image output ({html.escape(mime)})" src="data:{mime};base64,{data}">'


def _data(data: dict[str, Any]) -> str:
    """The richest MIME type the view can show safely, as Jupyter picks one."""
    if "text/html" in data:
        return f'<div class="output-html">{sanitise(_text(data["text/html"]))}</div>'
    if "image/svg+xml" in data:
        svg = base64.b64encode(_text(data["image/svg+xml"]).encode()).decode()
        return f'<img class="output-image" alt="image output (SVG)" src="data:image/svg+xml;base64,{svg}">'
    for mime in _IMAGES:
        if mime in data and (shown := _image(mime, data[mime])) is not None:
            return shown
    if "text/markdown" in data:
        return f'<div class="output-markdown">{markdown(_text(data["text/markdown"]))}</div>'
    json_type = next((m for m in data if m == "application/json" or m.endswith("+json")), None)
    if json_type is not None:
        return _pre(json.dumps(data[json_type], indent=2, ensure_ascii=False, default=str), "output-json")
    if "text/plain" in data:
        return _pre(_text(data["text/plain"]), "output-text")
    return f'<p class="output-note">an output of type {html.escape(", ".join(sorted(data)))} (not shown here)</p>'


def output(out: dict[str, Any]) -> str:
    kind = out.get("output_type")
    if kind == "stream":
        name = "stderr" if out.get("name") == "stderr" else "stdout"
        return _pre(_text(out.get("text", "")), f"output-stream output-{name}")
    if kind == "error":
        traceback = "\n".join(out.get("traceback") or [f"{out.get('ename', '')}: {out.get('evalue', '')}"])
        return _pre(traceback, "output-error")
    if kind in ("display_data", "execute_result"):
        return _data(dict(out.get("data", {})))
    return ""


def outputs(items: Iterable[dict[str, Any]]) -> str:
    return "".join(f'<div class="output">{output(o)}</div>' for o in items)


# ---- cells --------------------------------------------------------------------------------

def cell(c: NotebookNode, *, running: bool = False, live: list[NotebookNode] | None = None) -> str:
    """One cell's article; `live` replaces the saved outputs of a running cell."""
    cid = html.escape(str(c.get("id", "")))
    kind = c.get("cell_type", "code")
    source = _text(c.get("source", ""))
    if kind == "markdown":
        return f'<article class="cell cell-markdown" id="cell-{cid}" data-id="{cid}">{markdown(source)}</article>'
    if kind != "code":
        return (f'<article class="cell cell-raw" id="cell-{cid}" data-id="{cid}">'
                f'<pre class="source">{html.escape(source)}</pre></article>')
    count = c.get("execution_count")
    prompt = "*" if running else (str(count) if count is not None else " ")
    state = ' aria-busy="true"' if running else ""
    status = '<span class="running-label">running</span>' if running else ""
    shown = live if live is not None else c.get("outputs", [])
    return (f'<article class="cell cell-code{" running" if running else ""}" id="cell-{cid}" data-id="{cid}"{state}>'
            f'<div class="prompt" aria-label="execution count">[{html.escape(prompt)}]{status}</div>'
            f'<pre class="source"><code>{html.escape(source)}</code></pre>'
            f'<div class="outputs" aria-live="polite">{outputs(shown)}</div></article>')
