"""An execution's outputs as the notebook keeps them: iopub messages accumulated the way
JupyterLab does (streams merged, clear_output, display updates), within `OutputLimits`.

Callers: `execute` (one `Outputs` per execution), `JobService` (sizes of held results).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from nbformat import NotebookNode, from_dict
from nbformat.v4 import new_output


@dataclass(frozen=True)
class OutputLimits:
    """What one execution may keep: the notebook gets a bounded, valid copy of the outputs."""

    stream_chars: int = 2_000_000  # per output and per MIME type: text keeps head and tail, other payloads a note
    outputs: int = 500  # outputs per cell beyond which further ones are counted, not kept
    image_bytes: int = 10_000_000  # larger images are replaced by a note
    execution_chars: int = 20_000_000  # all outputs of one execution together


_TEXT_MIME = ("text/", "image/svg+xml")


def _value_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sum(len(v) for v in value)
    return len(json.dumps(value))


def output_size(out: dict[str, Any]) -> int:
    """About how many characters (bytes, for ASCII) one notebook output holds."""
    size = _value_size(out.get("text", "")) + sum(len(line) for line in out.get("traceback", []))
    return size + sum(_value_size(v) for v in out.get("data", {}).values())


def outputs_size(outputs: list[NotebookNode]) -> int:
    """Characters a list of outputs holds: what a finished result keeps in memory."""
    return sum(output_size(o) for o in outputs)


def _output(kind: str, content: dict[str, Any]) -> NotebookNode:
    """A notebook output from an iopub message's content, as nbformat's output_from_msg makes it
    but without its per-output schema validation (the notebook is validated when it is saved)."""
    if kind == "stream":
        out = {"output_type": kind, "name": content.get("name", "stdout"), "text": content.get("text", "")}
    elif kind == "error":
        out = {"output_type": kind, "ename": content.get("ename", ""), "evalue": content.get("evalue", ""),
               "traceback": list(content.get("traceback", []))}
    else:
        out = {"output_type": kind, "data": dict(content.get("data", {})), "metadata": dict(content.get("metadata", {}))}
        if kind == "execute_result":
            out["execution_count"] = content.get("execution_count")
    node: NotebookNode = from_dict(out)
    return node


def _cut(text: str, limit: int, what: str) -> str:
    """Head and tail of `text` within `limit` characters, with a marker in between."""
    if len(text) <= limit:
        return text
    half = max(1, limit // 2)
    return (f"{text[:half]}\n[... {len(text) - 2 * half} characters of {what} dropped: over the limit kept "
            f"per output ...]\n{text[-half:]}")


class StreamText:
    """The text of one stream output, bounded: the first and the last half of its limit, and no
    more than the room its execution has left (`room` of `add`)."""

    def __init__(self, limit: int) -> None:
        self._half = max(1, limit // 2)
        self._head: list[str] = []
        self._head_len = 0
        self._tail: deque[str] = deque()
        self._tail_len = 0
        self._dropped = 0

    @property
    def size(self) -> int:
        return self._head_len + self._tail_len

    def add(self, text: str, room: int) -> int:
        """Add `text`, growing by at most `room` characters; returns how much it grew."""
        before = self.size
        if self._head_len < self._half:
            take = min(len(text), self._half - self._head_len, max(room, 0))
            if take:
                self._head.append(text[:take])
                self._head_len += take
                room -= take
            text = text[take:]
        if not text:
            return self.size - before
        cap = max(0, min(self._half, self._tail_len + room))  # the tail grows only into the room left
        self._tail.append(text)
        self._tail_len += len(text)
        excess = self._tail_len - cap
        while excess > 0 and self._tail and len(self._tail[0]) <= excess:
            first = self._tail.popleft()
            self._tail_len -= len(first)
            self._dropped += len(first)
            excess -= len(first)
        if excess > 0:
            self._tail[0] = self._tail[0][excess:]
            self._tail_len -= excess
            self._dropped += excess
        return self.size - before

    def last(self, limit: int) -> tuple[str, bool]:
        """The last `limit` characters (without joining the rest), and whether anything came before them."""
        parts: list[str] = []
        size = 0
        for chunk in [*reversed(self._tail), *reversed(self._head)]:
            if size + len(chunk) >= limit:
                parts.append(chunk[len(chunk) - (limit - size):])
                return "".join(reversed(parts)), True
            parts.append(chunk)
            size += len(chunk)
        return "".join(reversed(parts)), bool(self._dropped)

    def text(self) -> str:
        head, tail = "".join(self._head), "".join(self._tail)
        if not self._dropped:
            return head + tail
        return (f"{head}\n[... {self._dropped} characters of output dropped: over the limit kept per output "
                f"or per execution ...]\n{tail}")


class Outputs:
    """Accumulates iopub messages into notebook outputs the way JupyterLab does, within limits."""

    def __init__(self, limits: OutputLimits) -> None:
        self._limits = limits
        self._items: list[NotebookNode] = []
        self._streams: dict[int, StreamText] = {}
        self._sizes: dict[int, int] = {}  # index -> characters held by a non-stream output
        self._used = 0  # characters held by all outputs together
        self._clear_pending = False
        self._display_ids: dict[str, list[int]] = {}
        self._dropped_outputs = 0

    @property
    def items(self) -> list[NotebookNode]:
        for i, stream in self._streams.items():
            self._items[i].text = stream.text()
        items = list(self._items)
        if self._dropped_outputs:
            items.append(new_output("stream", name="stderr", text=(
                f"[... {self._dropped_outputs} more outputs dropped: over the limit of "
                f"{self._limits.outputs} outputs or {self._limits.execution_chars} characters kept per execution ...]\n")))
        return items

    def preview(self, max_chars: int) -> list[NotebookNode]:
        """A bounded copy of the outputs so far, for a live view (the web view, while the cell runs):
        each stream's last `max_chars` characters; other outputs past `max_chars` in all become a note."""
        shown: list[NotebookNode] = []
        budget = max_chars
        for i, item in enumerate(self._items):
            stream = self._streams.get(i)
            if stream is not None:
                text, cut = stream.last(max_chars)
                note = "[... earlier output not shown while the cell runs: reload the page to see more ...]\n"
                shown.append(new_output("stream", name=item.name, text=note + text if cut else text))
                continue
            size = self._sizes.get(i, 0)
            if size > budget:
                shown.append(new_output("stream", name="stderr", text=(
                    f"[an output of about {size} characters is not shown while the cell runs: reload the page to see it]\n")))
                continue
            budget -= size
            shown.append(item)
        return shown

    @property
    def room(self) -> int:
        return self._limits.execution_chars - self._used

    def remove_errors(self, ename: str) -> None:
        keep = [i for i, o in enumerate(self._items) if not (o.output_type == "error" and o.ename == ename)]
        self._streams = {keep.index(i): s for i, s in self._streams.items() if i in keep}
        self._sizes = {keep.index(i): n for i, n in self._sizes.items() if i in keep}
        self._items = [self._items[i] for i in keep]

    def add(self, msg: dict[str, Any]) -> None:
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "clear_output":
            if content.get("wait"):
                self._clear_pending = True
            else:
                self._clear()
            return
        if kind == "update_display_data":
            display_id = content.get("transient", {}).get("display_id")
            for i in self._display_ids.get(display_id, []):
                out = self._items[i]
                self._used -= self._sizes.get(i, 0)
                out["data"] = self._bounded_data(content.get("data", {}))
                out["metadata"] = content.get("metadata", {})
                self._sizes[i] = output_size(out)
                self._used += self._sizes[i]
            return
        if kind not in ("stream", "display_data", "execute_result", "error"):
            return
        if self._clear_pending:
            self._clear()
        if kind == "stream":
            last = len(self._items) - 1
            if last >= 0 and last in self._streams and self._items[last].name == content.get("name"):
                self._used += self._streams[last].add(content.get("text", ""), self.room)
                return
        if len(self._items) >= self._limits.outputs or self.room <= 0:
            self._dropped_outputs += 1
            return
        out = _output(kind, content)
        if kind == "stream":
            stream = StreamText(self._limits.stream_chars)
            self._used += stream.add(out.text, self.room)
            self._streams[len(self._items)] = stream
        else:
            if "data" in out:
                out["data"] = self._bounded_data(out["data"])
            if kind == "error":
                out["traceback"] = [_cut(line, self._limits.stream_chars, "traceback") for line in out["traceback"]]
            size = output_size(out)
            if size > self.room:
                size = self._replace_by_note(out, size)  # the last one kept: the room is used up
            self._sizes[len(self._items)] = size
            self._used += size
        display_id = content.get("transient", {}).get("display_id")
        if display_id:
            self._display_ids.setdefault(display_id, []).append(len(self._items))
        self._items.append(out)

    def _replace_by_note(self, out: NotebookNode, size: int) -> int:
        note = (f"[output of about {size} characters dropped: over the limit of "
                f"{self._limits.execution_chars} kept per execution]")
        if out.output_type == "error":
            out["traceback"] = [note]
        else:
            out["data"] = {"text/plain": note}
            out["metadata"] = {}
        self._used = self._limits.execution_chars
        return 0

    def _bounded_data(self, data: dict[str, Any]) -> dict[str, Any]:
        """Every MIME type bounded: text keeps head and tail, images and other payloads over their
        limit are replaced by a note in text/plain."""
        limit = self._limits.stream_chars
        kept: dict[str, Any] = {}
        notes: list[str] = []
        for mime, value in data.items():
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = "".join(value)
            if mime.startswith("image/") and mime != "image/svg+xml" and isinstance(value, str):
                if len(value) * 3 // 4 > self._limits.image_bytes:
                    notes.append(f"[{mime} image of about {len(value) * 3 // 4} bytes dropped: over the "
                                 f"{self._limits.image_bytes}-byte limit kept in notebooks]")
                    continue
            elif isinstance(value, str) and mime.startswith(_TEXT_MIME):
                value = _cut(value, limit, mime)
            elif _value_size(value) > limit:
                notes.append(f"[{mime} output of about {_value_size(value)} characters dropped: over the "
                             f"limit of {limit} kept per output]")
                continue
            kept[mime] = value
        if notes:
            note = "\n".join(notes)
            kept["text/plain"] = f"{kept['text/plain']}\n{note}" if "text/plain" in kept else note
        return kept

    def _clear(self) -> None:
        self._items = []
        self._streams = {}
        self._sizes = {}
        self._used = 0
        self._display_ids = {}
        self._clear_pending = False
        self._dropped_outputs = 0
