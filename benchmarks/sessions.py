"""`python -m benchmarks.sessions`: kernelpool against its baselines, measured in one run.

Starts real kernelpool servers (one per measurement, on data folders of their own), drives them
with real MCP clients over HTTP on 127.0.0.1, prints a table and writes JSON
(default `benchmarks/results/<timestamp>.json`). Scenarios:

  first        time to the first result of `1+1` on a new notebook: pool hit / pool miss / stock start
  execute      trivial `execute_code` vs a bare jupyter_client round trip + an empty MCP tool, both modes
  concurrency  1, 10, 50, 100, 300 sessions, open and closed loop, vs bare jupyter_client on as many kernels
  memory       PSS per idle kernel, kernelpool vs stock
  growth       per-cell latency as one notebook grows to 12 MB vs nbformat.write of the same file

Exit status: 0 when every result was right; 1 when one was wrong (an error, a reply or a cell
in the wrong place, a kernel or cgroup left behind); 2 when the benchmark itself could not run.
Slowness never changes the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
from typing import Any

from benchmarks import scenarios
from benchmarks.growth import CHECKPOINTS_MB, GrowthFailed, growth
from benchmarks.harness import Bench
from benchmarks.report import render

ALL = ["first", "execute", "concurrency", "memory", "growth"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sessions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(ALL), help=f"comma-separated, from {','.join(ALL)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes: about 2 minutes")
    p.add_argument("--samples", type=int, help="first: samples of each kind (default 15; quick 5)")
    p.add_argument("--calls", type=int, help="execute: measured calls per measure and mode (default 300; quick 100)")
    p.add_argument("--rounds", type=int, default=5, help="execute: interleaved rounds (default 5)")
    p.add_argument("--modes", default="legacy,auto", help="execute: client modes (default legacy,auto)")
    p.add_argument("--levels", help="concurrency: session counts (default 1,10,50,100,300; quick 1,10)")
    p.add_argument("--duration", type=float, help="concurrency: seconds per loop phase (default 8; quick 4)")
    p.add_argument("--max-cells", type=int, default=300, help="concurrency: closed-loop cells per session at most (300)")
    p.add_argument("--mode", default="legacy", choices=["legacy", "auto"], help="concurrency: client mode (legacy)")
    p.add_argument("--pool-size", type=int, default=1, help="concurrency: the server's KERNELPOOL_POOL_SIZE (1, the default)")
    p.add_argument("--tool", default="insert_execute_code_cell", choices=["insert_execute_code_cell", "execute_code"],
                   help="concurrency: the tool each cell runs through (insert_execute_code_cell: the cell is saved)")
    p.add_argument("--stock-at-once", type=int, default=10, help="concurrency: stock kernels started together (10)")
    p.add_argument("--idle-kernels", type=int, help="memory: kernels of each kind (default 10; quick 4)")
    p.add_argument("--growth-mb", help="growth: checkpoint sizes in MB (default 0.1,1,5,12; quick 0.1,1)")
    p.add_argument("--payload-kb", type=int, default=20, help="growth: KB each cell prints (20)")
    p.add_argument("--replicas", help="instead of the scenarios: 1..N replicas behind HAProxy vs the direct server "
                   "(e.g. 1,2,3; benchmarks/replicas.py); --levels (default 1,10,30), --duration (default 6), --calls (100)")
    p.add_argument("--json", dest="json_path", help="where to write the results (default benchmarks/results/<timestamp>.json)")
    return p


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    import psutil
    import zmq

    return {
        "kernelpool_commit": _git("rev-parse", "HEAD"),
        "kernelpool_uncommitted": _git("status", "--short", "--", "kernelpool", "sandbox") or None,
        "host": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / (1 << 30), 1),
        "cpu_model": _cpu_model(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "mcp": version("mcp"), "jupyter_client": version("jupyter_client"), "ipykernel": version("ipykernel"),
        "pyzmq": zmq.__version__,
    }


def _git(*args: str) -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", *args], cwd=os.path.dirname(RESULTS) + "/..", capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    q = args.quick
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    levels = [int(x) for x in (args.levels or ("1,10" if q else "1,10,50,100,300")).split(",")]
    duration = args.duration or (4.0 if q else 8.0)
    problems: list[str] = []
    results: dict[str, Any] = {
        "started_at": dt.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
        "machine": machine(), "quick": q,
    }
    t_all = time.perf_counter()
    async with Bench() as bench:
        results["isolation"] = bench.isolation
        for name in chosen:
            t0 = time.perf_counter()
            log(f"{name} ...")
            try:
                if name == "first":
                    results[name] = await scenarios.first_result(bench, args.samples or (5 if q else 15), problems)
                elif name == "execute":
                    modes = [m.strip() for m in args.modes.split(",")]
                    results[name] = await scenarios.trivial_execute(bench, args.calls or (100 if q else 300),
                                                                    args.rounds, modes, problems)
                elif name == "concurrency":
                    results[name] = await scenarios.concurrency(bench, levels, duration, args.max_cells, args.mode,
                                                                args.pool_size, args.stock_at_once, args.tool, problems, log)
                elif name == "memory":
                    results[name] = await scenarios.idle_memory(bench, args.idle_kernels or (4 if q else 10), problems)
                elif name == "growth":
                    sizes = args.growth_mb or ("0.1,1" if q else ",".join(map(str, CHECKPOINTS_MB)))
                    results[name] = await growth(bench, tuple(float(x) for x in sizes.split(",")), args.payload_kb, problems, log)
            except (scenarios.WrongResult, GrowthFailed) as exc:
                problems.append(f"{name}: {exc}")
                results[name] = {"failed": str(exc)}
            results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
            log(f"{name} done in {time.perf_counter() - t0:.0f} s")
    results["cleanup_problems"] = bench.cleanup_problems
    problems += [f"cleanup: {p}" for p in bench.cleanup_problems]
    results["problems"] = problems
    results["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    return results, problems


async def run_replicas(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    from benchmarks import replicas

    levels = [int(x) for x in (args.levels or "1,10,30").split(",")]
    counts = [int(x) for x in args.replicas.split(",")]
    found = await replicas.run(counts, levels, args.duration or 6.0, args.calls or 100, args.rounds, log)
    found |= {"started_at": dt.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:], "machine": machine()}
    print(replicas.render(found))
    return found, replicas.problems(found)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results, problems = asyncio.run(run_replicas(args) if args.replicas else run(args))
    except KeyboardInterrupt:
        return 2
    except Exception as exc:
        import traceback

        traceback.print_exc()
        log(f"the benchmark could not run: {type(exc).__name__}: {exc}")
        return 2
    if not args.replicas:
        print(render(results))
    path = args.json_path or os.path.join(RESULTS, dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nresults: {path}")
    if problems:
        print(f"\nWRONG RESULTS ({len(problems)}):", *problems, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
