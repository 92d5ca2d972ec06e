"""Outputs as MCP content: long text keeps its head and tail, terminal colours are dropped."""

from __future__ import annotations

from kernelpool.mcp.content import strip_ansi, truncate


def test_truncate_and_ansi() -> None:
    assert truncate("x" * 10, 20) == ("x" * 10, 0)
    cut, n = truncate("a" * 100 + "b" * 100, 30)
    assert n == 170 and cut.startswith("a" * 20) and cut.endswith("b" * 10)
    assert strip_ansi("\x1b[0;31mValueError\x1b[0m: boom") == "ValueError: boom"
