"""The growth scenario: what one more cell costs as a notebook grows to about 12 MB.

One session appends cells that each print `payload_kb` KB with `insert_execute_code_cell` (every
call answers only once its cell and outputs are in the `.ipynb` on disk). The per-cell latency is
taken in windows of cells just below each checkpoint size (0.1, 1, 5, 12 MB by default). The
baseline, in the same run and on the same disk: `nbformat.write` of the very file the server had
written at that checkpoint (what a server that rewrites the notebook with nbformat pays at least
once per cell; kernelpool used to pay it twice).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import nbformat

from benchmarks.harness import Bench
from benchmarks.stats import ratio, summary
from testkit.client import mcp_client

CHECKPOINTS_MB = (0.1, 1.0, 5.0, 12.0)
WINDOW = 20  # cells per checkpoint window


class GrowthFailed(Exception):
    pass


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def _baseline(path: str, samples: int = 5) -> list[float]:
    """Seconds for `nbformat.write` of the notebook at `path` (read once, written `samples` times)."""
    nb = nbformat.read(path, as_version=4)
    folder = tempfile.mkdtemp(prefix="kp-growth-")
    try:
        out: list[float] = []
        for i in range(samples):
            target = os.path.join(folder, f"{i}.ipynb")
            t0 = time.perf_counter()
            nbformat.write(nb, target)
            out.append(time.perf_counter() - t0)
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def growth(bench: Bench, checkpoints_mb: tuple[float, ...], payload_kb: int, problems: list[str],
                 log: Any = print) -> dict[str, Any]:
    user = "growth"
    d = await bench.data_dir([user])
    notebook = "growth/nb.ipynb"
    on_disk = os.path.join(d.path, "users", user, notebook)
    code = f"print(('x' * 99 + '\\n') * {payload_kb * 10})"
    rows: list[dict[str, Any]] = []
    async with bench.server(d, pool_size="1") as srv, mcp_client(srv.url, d.tokens[user], "legacy") as client:
        r = await client.call_tool("use_notebook", {"notebook": notebook, "mode": "create"})
        if r.is_error:
            raise GrowthFailed(f"use_notebook: {_text(r)}")
        window: list[tuple[float, int]] = []  # (seconds, file size after the cell)
        cells = 0
        for target in checkpoints_mb:
            while True:
                t0 = time.perf_counter()
                r = await client.call_tool("insert_execute_code_cell", {"notebook": notebook, "cell_index": -1,
                                                                       "cell_source": code})
                took = time.perf_counter() - t0
                cells += 1
                if r.is_error or not _text(r).startswith("x" * 99):
                    problems.append(f"growth: cell {cells} answered {_text(r)[:200]!r}")
                    raise GrowthFailed(f"cell {cells} failed")
                size = os.path.getsize(on_disk)
                window = (window + [(took, size)])[-WINDOW:]
                if size >= target * 1e6:
                    break
            base = _baseline(on_disk)
            row: dict[str, Any] = {"checkpoint_mb": target, "cells": cells, "size_mb": round(size / 1e6, 2),
                   "per_cell_ms": summary([t for t, _ in window]), "nbformat_write_ms": summary(base)}
            row["ratio_p50_over_nbformat_write"] = ratio(row["per_cell_ms"]["p50"], row["nbformat_write_ms"]["p50"])
            rows.append(row)
            log(f"growth: {row['size_mb']} MB after {cells} cells: p50 {row['per_cell_ms']['p50']} ms per cell, "
                f"nbformat.write {row['nbformat_write_ms']['p50']} ms")
        saved = nbformat.read(on_disk, as_version=4)
        if len(saved.cells) != cells:
            problems.append(f"growth: {cells} cells answered ok but the file holds {len(saved.cells)}")
        nbformat.validate(saved)
    return {
        "what": f"insert_execute_code_cell of a cell printing {payload_kb} KB, one session, one notebook; "
                f"per-cell latency over the last {WINDOW} cells before each size; baseline: nbformat.write of "
                "the file the server had written at that size, same disk",
        "payload_kb": payload_kb, "checkpoints": rows,
    }
