"""Outputs within their bounds: a stream keeps its head and tail, every MIME type and the whole
execution have a limit, and what did not fit is said in a note."""

from __future__ import annotations

from typing import Any

from kernelpool.executions.outputs import OutputLimits, Outputs, StreamText, outputs_size


def test_stream_keeps_head_and_tail_within_its_limit() -> None:
    s = StreamText(1000)
    for i in range(100_000):
        s.add(f"{i}\n", 10**9)
    text = s.text()
    assert text.startswith("0\n1\n2\n") and text.endswith("99998\n99999\n")
    assert len(text) < 1200 and "characters of output dropped" in text
    small = StreamText(1000)
    small.add("abc", 10**9)
    small.add("def", 10**9)
    assert small.text() == "abcdef"
    tight = StreamText(1000)
    assert tight.add("x" * 300, 100) == 100 and tight.add("y" * 5000, 0) == 0 and tight.size == 100


def test_every_mime_type_and_the_execution_are_bounded() -> None:
    limits = OutputLimits(stream_chars=1000, outputs=50, image_bytes=600, execution_chars=5000)
    outs = Outputs(limits)

    def display(data: dict[str, Any]) -> None:
        outs.add({"msg_type": "display_data", "content": {"data": data, "metadata": {}}})

    display({"text/plain": "p" * 40_000, "text/html": "<b>" + "h" * 40_000 + "</b>"})
    display({"application/json": {"k": "v" * 5000}, "application/pdf": "A" * 5000, "image/png": "B" * 4000})
    items = outs.items
    first, second = items[0].data, items[1].data
    assert len(first["text/plain"]) < 1200 and first["text/plain"].startswith("ppp") and "dropped" in first["text/plain"]
    assert len(first["text/html"]) < 1200 and first["text/html"].endswith("</b>")
    assert set(second) == {"text/plain"} and second["text/plain"].count("dropped") == 3
    for _ in range(20):
        display({"text/plain": "q" * 900})
    outs.add({"msg_type": "stream", "content": {"name": "stdout", "text": "s" * 10_000}})
    items = outs.items
    assert outputs_size(items) <= 5000 + 300, "all outputs together stay within the execution's limit (and a note)"
    assert "kept per execution" in items[-2].data["text/plain"], "the output that did not fit is replaced by a note"
    assert items[-1].name == "stderr" and "more outputs dropped" in items[-1].text and "per execution" in items[-1].text
