"""`python -m benchmarks.profile`: where the server's CPU goes under closed-loop load, by part.

For each level N (default 10 and 100 sessions, N/2 users x 2 notebooks) one server is started,
every session opens its notebook, and then every session runs cells back to back while
`py-spy record --gil` samples the server process (not its kernels): only the thread that holds
the GIL, so the samples are the Python work that competes for the one event loop, and waits in
worker threads (a notebook write's fsync) are left out. Each sample is put in the part of the
innermost frame that belongs to one, scanning from the leaf:

  notebook writes  nbformat, kernelpool's notebook modules, the atomic write in sandbox/fs.py
  kernel messages  jupyter_client, zmq, kernelpool's kernel and execution modules
  auth             kernelpool's token checks
  SQLite           aiosqlite, sqlite3, kernelpool/store.py
  MCP SDK / HTTP   mcp, mcp_types, starlette, uvicorn, anyio, h11, httptools, pydantic, sse_starlette
  event loop       asyncio, selectors (scheduling, not waiting: py-spy leaves idle samples out)
  other            everything else (kernelpool's own tool layer included)

Prints a table and writes the raw stacks and a JSON summary to benchmarks/results/. Needs
py-spy (`pip install py-spy`) and a host where the server can run (root for the sandbox).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import psutil

from benchmarks.harness import Bench
from benchmarks.load import closed_loop
from benchmarks.scenarios import _clients, _kp_run, call
from benchmarks.sessions import RESULTS, machine

PARTS: list[tuple[str, re.Pattern[str]]] = [
    # both layouts: today's packages and the flat modules of before the restructure (for before/after runs)
    ("notebook writes", re.compile(r"\((?:nbformat/|kernelpool/notebooks[/.])|write_bytes_atomic \(")),
    ("auth", re.compile(r"\((?:kernelpool/users/tokens\.py|kernelpool/mcp/auth\.py|kernelpool/auth\.py)")),
    ("SQLite", re.compile(r"\((?:aiosqlite/|sqlite3/|kernelpool/store\.py)")),
    ("kernel messages", re.compile(r"\((?:jupyter_client/|zmq/|kernelpool/kernels[/.]|kernelpool/executions/|"
                                   r"kernelpool/execution\.py|kernelpool/jobs\.py|kernelpool/client\.py)")),
    ("MCP SDK / HTTP", re.compile(r"\((?:mcp/|mcp_types/|starlette/|uvicorn/|anyio/|h11/|httptools/|pydantic/|"
                                  r"pydantic_core/|sse_starlette/)")),
    ("event loop", re.compile(r"\((?:asyncio/|selectors\.py)")),
]


def part_of(stack: str) -> str:
    """The part of one collapsed stack ("f (file:line);g (file:line)"), innermost frame first."""
    for frame in reversed(stack.split(";")):
        for name, pattern in PARTS:
            if pattern.search(frame):
                return name
    return "other"


def breakdown(raw_path: str) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if stack and n.isdigit():
                counts[part_of(stack)] += int(n)
    total = sum(counts.values())
    return {"samples": total, "parts": {k: round(100 * v / total, 1) for k, v in counts.most_common()} if total else {}}


async def level(bench: Bench, n: int, duration: float, tool: str, rate: int, out_dir: str, log: Any) -> dict[str, Any]:
    users = [f"p{n}u{j // 2}" for j in range(n)]  # names unique across the run: they are Unix accounts
    paths = [f"prof{n}/s{j}.ipynb" for j in range(n)]
    d = await bench.data_dir(sorted(set(users)))
    raw = os.path.join(out_dir, f"py-spy-{n}.txt")
    async with bench.server(d, pool_size="1", max_kernels_per_user="16") as srv, \
            _clients(srv.url, [d.tokens[u] for u in users], "legacy") as clients:
        await asyncio.gather(*(call(clients[j], "use_notebook", {"notebook": paths[j], "mode": "create"}) for j in range(n)))
        runs = [_kp_run(clients[j], paths[j], tool) for j in range(n)]
        await closed_loop(runs, f"warm{n}", 2.0, 50)  # warm up: first cells, caches
        spy = subprocess.Popen([shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy"),
                                "record", "--pid", str(srv.pid), "--duration", str(int(duration)), "--rate", str(rate),
                                "--format", "raw", "--output", raw, "--nonblocking", "--gil"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.perf_counter()
        before = _cpu(srv)
        phase = await closed_loop(runs, f"prof{n}", duration, 10**6)
        after = _cpu(srv)
        _, err = await asyncio.to_thread(spy.communicate)
        log(f"  x{n}: {len(phase.latencies)} cells in {time.perf_counter() - t0:.1f} s, {len(phase.errors)} errors")
    cells = max(1, len(phase.latencies))
    # where the 2 cores went, per answered cell: the MCP clients (this process), the server, the kernels
    cpu_ms = {k: round(1000 * (after[k] - before[k]) / cells, 2) for k in before}
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err.strip()[-500:]}")
    return {"sessions": n, "cells": len(phase.latencies), "errors": len(phase.errors),
            "cells_per_s": round(len(phase.latencies) / phase.wall, 1), "cpu_ms_per_cell": cpu_ms, "raw": raw,
            **breakdown(raw)}


def _cpu(srv: Any) -> dict[str, float]:
    """CPU seconds so far (user + system) of this process, of the server, and of its kernels."""
    def used(p: psutil.Process) -> float:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            return float(t.user + t.system)
        return 0.0

    return {"clients": used(psutil.Process()), "server": used(psutil.Process(srv.pid)),
            "kernels": sum(used(k) for k in srv.kernels())}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = os.path.join(RESULTS, f"profile-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "tool": args.tool, "duration_s": args.duration, "levels": []}
    async with Bench() as bench:
        for n in [int(x) for x in args.levels.split(",")]:
            result["levels"].append(await level(bench, n, args.duration, args.tool, args.rate, out_dir,
                                                lambda t: print(t, file=sys.stderr, flush=True)))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="10,100", help="session counts (default 10,100)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds sampled per level (15)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second (200)")
    p.add_argument("--tool", default="insert_execute_code_cell", choices=["insert_execute_code_cell", "execute_code"])
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    names = [name for name, _ in PARTS] + ["other"]
    print("| sessions | cells/s | CPU ms per cell: clients / server / kernels | samples | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for lv in result["levels"]:
        c = lv["cpu_ms_per_cell"]
        print(f"| {lv['sessions']} | {lv['cells_per_s']} | {c['clients']} / {c['server']} / {c['kernels']} | {lv['samples']} | "
              + " | ".join(f"{lv['parts'].get(n, 0.0)}%" for n in names) + " |")
    print(f"\nraw stacks and summary.json: {os.path.dirname(result['levels'][0]['raw']) if result['levels'] else '-'}")
    return 1 if any(lv["errors"] for lv in result["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
