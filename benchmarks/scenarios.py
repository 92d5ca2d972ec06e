"""The four measurements, each against its baseline in the same run.

Every function returns a JSON-able dict and appends what was wrong (errors, cross-talk,
leftovers) to `problems`; nothing here judges a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil

from benchmarks.floor import FloorServer
from benchmarks.harness import Bench, DataDir, RunningServer
from benchmarks.load import Phase, Run, Verdict, check_notebook, closed_loop, judge_text, open_loop
from benchmarks.procs import memory_of
from benchmarks.stats import diff, ratio, summary
from benchmarks.stock import StockKernel, StockKernels
from testkit.client import mcp_client
from testkit.server import free_port


class WrongResult(Exception):
    pass


def texts(result: Any) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


async def call(client: Any, tool: str, args: dict[str, Any]) -> Any:
    r = await asyncio.wait_for(client.call_tool(tool, args), 120)
    if r.is_error:
        raise WrongResult(f"{tool}({args}) failed: {texts(r)[:300]}")
    return r


def _server_report(srv: RunningServer, problems: list[str], what: str) -> dict[str, Any]:
    if srv.leftovers:
        problems.append(f"{what}: left behind after the server stopped: {srv.leftovers[:5]}")
    out: dict[str, Any] = {"server_rss": srv.rss_result, "exit_code": srv.exit_code, "leftovers": srv.leftovers}
    if any(w in srv.log_tail for w in ("ERROR", "Traceback", "WARNING")):
        out["server_log_tail"] = srv.log_tail[-3000:]
    return out


# ---- 1. time to first result -----------------------------------------------------------

async def first_result(bench: Bench, samples: int, problems: list[str], mode: str = "legacy") -> dict[str, Any]:
    """`use_notebook(create)` + `insert_execute_code_cell("1+1")` on a notebook without a kernel,
    pool hit (pool_size=1, a warm kernel waiting) vs pool miss (pool_size=0) vs stock start."""
    d_hit = await bench.data_dir(["fr-hit"])
    d_miss = await bench.data_dir(["fr-miss"])
    hit: list[float] = []
    hit_use: list[float] = []
    miss: list[float] = []
    miss_use: list[float] = []
    stock: list[float] = []

    async def first(client: Any, path: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        await call(client, "use_notebook", {"notebook": path, "mode": "create"})
        t1 = time.perf_counter()
        r = await call(client, "insert_execute_code_cell", {"notebook": path, "cell_index": -1, "cell_source": "1+1"})
        t2 = time.perf_counter()
        if texts(r) != "2":
            raise WrongResult(f"1+1 in {path} answered {texts(r)!r}")
        await call(client, "unuse_notebook", {"notebook": path})  # not timed: keeps one kernel per server
        return t2 - t0, t1 - t0

    async with bench.server(d_hit, pool_size="1") as hit_srv, bench.server(d_miss, pool_size="0") as miss_srv, \
            StockKernels() as sk, \
            mcp_client(hit_srv.url, d_hit.tokens["fr-hit"], mode) as ch, mcp_client(miss_srv.url, d_miss.tokens["fr-miss"], mode) as cm:
        # a user's pool fills after its first kernel; the first notebooks are not measured
        await call(ch, "use_notebook", {"notebook": "fr/prime.ipynb", "mode": "create"})
        await call(cm, "use_notebook", {"notebook": "fr/prime.ipynb", "mode": "create"})
        for i in range(samples):  # interleaved, so that noise hits all three alike
            if await hit_srv.wait_warm(1, 60) is None:
                raise WrongResult("the pool did not refill within 60 s")
            total, use = await first(ch, f"fr/hit-{i}.ipynb")
            hit.append(total)
            hit_use.append(use)
            await hit_srv.wait_warm(1, 60)  # the refill the hit triggered is over before the next sample
            total, use = await first(cm, f"fr/miss-{i}.ipynb")
            miss.append(total)
            miss_use.append(use)
            k = sk.new()
            t0 = time.perf_counter()
            await k.start()
            status, text = await k.execute("1+1")
            stock.append(time.perf_counter() - t0)
            await k.stop()
            if status != "ok" or text != "2":
                raise WrongResult(f"stock 1+1 answered {status} {text!r}")
        counters = await hit_srv.health()
    out: dict[str, Any] = {
        "what": "use_notebook(mode=create) + insert_execute_code_cell('1+1') on a new notebook, "
                f"one MCP client (mode={mode}) already connected; stock: AsyncKernelManager.start_kernel "
                "+ wait_for_ready + execute('1+1') in the benchmark process",
        "pool_hit_ms": summary(hit), "pool_hit_use_notebook_ms": summary(hit_use),
        "pool_miss_ms": summary(miss), "pool_miss_use_notebook_ms": summary(miss_use),
        "stock_ms": summary(stock),
        "hit_server": _server_report(hit_srv, problems, "first-result (pool)"),
        "miss_server": _server_report(miss_srv, problems, "first-result (no pool)"),
        "healthz_at_end": counters,
    }
    out["ratio_hit_over_stock_p50"] = ratio(out["pool_hit_ms"]["p50"], out["stock_ms"]["p50"])
    out["ratio_miss_over_stock_p50"] = ratio(out["pool_miss_ms"]["p50"], out["stock_ms"]["p50"])
    return out


# ---- 2. trivial execute vs its two parts -----------------------------------------------

async def trivial_execute(bench: Bench, calls: int, rounds: int, modes: list[str], problems: list[str]) -> dict[str, Any]:
    """`execute_code("1+1", notebook=...)` vs (a) a bare jupyter_client round trip and (b) an
    empty tool on a minimal server of the same MCP SDK; the three interleaved in rounds."""
    d = await bench.data_dir(["lat"])
    token = secrets.token_urlsafe(24)
    per = max(1, calls // rounds)
    out: dict[str, Any] = {"what": "p50/p90/p99 per call after 20 warm-up calls each; "
                                   f"{rounds} interleaved rounds of {per} calls per measure"}
    async with bench.server(d) as srv, StockKernels() as sk:
        k = sk.new()
        await k.start()
        with FloorServer(free_port(), token) as floor_url:
            for mode in modes:
                path = f"lat/lat-{mode}.ipynb"
                kp: list[float] = []
                kp_inside: list[float] = []
                bare: list[float] = []
                floor: list[float] = []
                async with mcp_client(srv.url, d.tokens["lat"], mode) as c, mcp_client(floor_url, token, mode) as f:
                    await call(c, "use_notebook", {"notebook": path, "mode": "create"})

                    async def kp_call(*, record: bool) -> None:
                        t0 = time.perf_counter()
                        r = await call(c, "execute_code", {"code": "1+1", "notebook": path})
                        if record:
                            kp.append(time.perf_counter() - t0)
                            kp_inside.append(r.structured_content["duration_ms"] / 1000)
                        if texts(r) != "2":
                            raise WrongResult(f"execute_code 1+1 answered {texts(r)!r}")

                    async def bare_call(*, record: bool) -> None:
                        t0 = time.perf_counter()
                        status, text = await k.execute("1+1")
                        if record:
                            bare.append(time.perf_counter() - t0)
                        if status != "ok" or text != "2":
                            raise WrongResult(f"jupyter_client 1+1 answered {status} {text!r}")

                    async def floor_call(*, record: bool) -> None:
                        t0 = time.perf_counter()
                        r = await call(f, "execute_code", {"code": "1+1", "notebook": path})
                        if record:
                            floor.append(time.perf_counter() - t0)
                        if texts(r) != "2":
                            raise WrongResult(f"floor tool answered {texts(r)!r}")

                    for one in (kp_call, bare_call, floor_call):
                        for _ in range(20):
                            await one(record=False)
                    for _ in range(rounds):
                        for one in (kp_call, bare_call, floor_call):
                            for _ in range(per):
                                await one(record=True)
                res: dict[str, Any] = {
                    "kernelpool_ms": summary(kp), "kernelpool_execution_inside_ms": summary(kp_inside),
                    "jupyter_client_ms": summary(bare), "mcp_floor_ms": summary(floor),
                }
                res["overhead_p50_ms"] = diff(res["kernelpool_ms"]["p50"], res["jupyter_client_ms"]["p50"], res["mcp_floor_ms"]["p50"])
                out[mode] = res
    out["server"] = _server_report(srv, problems, "trivial-execute")
    return out


# ---- 3. concurrency --------------------------------------------------------------------

@contextlib.asynccontextmanager
async def _clients(url: str, tokens: list[str], mode: str) -> AsyncIterator[list[Any]]:
    """N MCP clients, each entered and exited in a task of its own (anyio scopes demand it)."""
    clients: list[Any] = [None] * len(tokens)
    ready = [asyncio.Event() for _ in tokens]
    done = asyncio.Event()
    failures: list[BaseException] = []

    async def hold(i: int) -> None:
        try:
            async with mcp_client(url, tokens[i], mode) as c:
                clients[i] = c
                ready[i].set()
                await done.wait()
        except BaseException as exc:
            failures.append(exc)
            ready[i].set()

    tasks = [asyncio.create_task(hold(i)) for i in range(len(tokens))]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 120)
        if failures:
            raise WrongResult(f"{len(failures)} MCP client(s) could not connect: {failures[0]!r}")
        yield clients
    finally:
        done.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


def _kp_run(client: Any, path: str, tool: str) -> Run:
    async def run(tag: str) -> Verdict:
        code = f'print("{tag}")'
        if tool == "execute_code":
            r = await client.call_tool("execute_code", {"notebook": path, "code": code})
        else:
            r = await client.call_tool("insert_execute_code_cell", {"notebook": path, "cell_index": -1, "cell_source": code})
        text = texts(r)
        if r.is_error:
            return Verdict(ok=False, error=f"tool error: {text[:200]}")
        sc = r.structured_content or {}
        if sc.get("notebook") != path:
            return Verdict(ok=False, error=f"reply names notebook {sc.get('notebook')!r}, not {path!r}", crosstalk=True)
        if sc.get("status") != "ok":
            return Verdict(ok=False, error=f"status {sc.get('status')}: {text[:200]}")
        return judge_text(text, tag)

    return run


def _stock_run(kernel: StockKernel) -> Run:
    async def run(tag: str) -> Verdict:
        status, text = await kernel.execute(f'print("{tag}")')
        if status != "ok":
            return Verdict(ok=False, error=f"status {status}: {text[:200]}")
        return judge_text(text, tag)

    return run


def _phases(phases: list[Phase], problems: list[str], what: str) -> dict[str, Any]:
    out = {}
    for p in phases:
        rep = p.report()
        if rep["errors"] or rep["crosstalk_replies"]:
            problems.append(f"{what} {p.name}: {rep['errors']} errors, {rep['crosstalk_replies']} cross-talk replies; "
                            f"e.g. {rep['error_examples'][:2]}")
        out[p.name] = rep
    return out


def open_interval(n: int) -> float:
    """Seconds between one session's cells in the open loop: 2 s up to 100 sessions (50 cells/s
    at 100), 4 s above (75 cells/s at 300: offered load well below either side's throughput)."""
    return 2.0 if n <= 100 else 4.0


async def _stock_level(n: int, duration: float, max_cells: int, at_once: int, run_id: str,
                       problems: list[str]) -> dict[str, Any]:
    async with StockKernels() as sk:
        ready = await sk.start_many(n, at_once)
        await asyncio.sleep(1)
        mem = memory_of([psutil.Process(p) for p in sk.pids()])
        runs = [_stock_run(k) for k in sk.kernels]
        opened = await open_loop(runs, run_id + "j", max(duration, 3 * open_interval(n)), open_interval(n))
        closed = await closed_loop(runs, run_id + "j", duration, max_cells)
    return {"all_ready_s": round(ready, 3), "started_at_once": at_once, "kernels_idle": mem,
            **_phases([opened, closed], problems, f"stock x{n}")}


async def _kp_level(bench: Bench, d: DataDir, n: int, duration: float, max_cells: int, mode: str, pool: int,
                    tool: str, run_id: str, problems: list[str], log: Any) -> dict[str, Any]:
    users = [f"u{j // 2}" for j in range(n)]  # two notebooks per user
    paths = [f"c{n}/s{j}.ipynb" for j in range(n)]
    n_users = len(set(users))
    settings = {"pool_size": str(pool), "max_kernels_per_user": str(max(16, 2 + pool + 1))}
    out: dict[str, Any] = {"users": n_users, "mode": mode, "pool_size": pool, "tool": tool}
    srv_box: list[RunningServer] = []
    try:
        await _kp_level_on(bench, d, n, duration, max_cells, mode, pool, tool, run_id, problems, log,
                           users, paths, settings, out, srv_box)
    except WrongResult as exc:
        if srv_box:
            exc.args = (f"{exc}; {_server_report(srv_box[0], problems, f'kernelpool x{n}').get('server_log_tail', '')[-1500:]}",)
        raise
    return out


async def _kp_level_on(bench: Bench, d: DataDir, n: int, duration: float, max_cells: int, mode: str, pool: int,
                       tool: str, run_id: str, problems: list[str], log: Any, users: list[str], paths: list[str],
                       settings: dict[str, str], out: dict[str, Any], srv_box: list[RunningServer]) -> None:
    n_users = len(set(users))
    async with bench.server(d, **settings) as srv:
        srv_box.append(srv)
        async with _clients(srv.url, [d.tokens[u] for u in users], mode) as clients:
            t0 = time.perf_counter()
            each: list[float] = []
            failed: list[str] = []

            async def open_one(j: int) -> None:
                try:
                    await call(clients[j], "use_notebook", {"notebook": paths[j], "mode": "create"})
                    each.append(time.perf_counter() - t0)
                except Exception as exc:  # a refusal, a timeout, a dropped stream: all counted, none fatal
                    failed.append(f"{paths[j]}: {type(exc).__name__}: {exc}")

            await asyncio.gather(*(open_one(j) for j in range(n)))
            out["all_ready_s"] = round(time.perf_counter() - t0, 3)
            out["ready_ms"] = summary(each)
            log(f"    {n - len(failed)}/{n} notebooks ready in {out['all_ready_s']:.1f} s")
            if failed:
                raise WrongResult(f"{len(failed)} of {n} use_notebook calls failed, e.g. {failed[:2]}")
            settle = await srv.wait_warm(n_users * pool, 30) if pool else 0.0  # not settling is reported, not waited out
            out["pool_settled_after_s"] = None if settle is None else round(settle, 3)
            log(f"    pool settled: {out['pool_settled_after_s']} s")
            await asyncio.sleep(1)
            out["healthz_idle"] = await srv.health()
            out["kernels_idle"] = memory_of(srv.kernels())
            out["helpers_idle"] = memory_of(srv.helpers())
            runs = [_kp_run(clients[j], paths[j], tool) for j in range(n)]
            opened = await open_loop(runs, run_id + "k", max(duration, 3 * open_interval(n)), open_interval(n))
            closed = await closed_loop(runs, run_id + "k", duration, max_cells)
            out.update(_phases([opened, closed], problems, f"kernelpool x{n}"))
            log(f"    loops done: open {len(opened.latencies)} cells, closed {len(closed.latencies)} cells")
        # every notebook on disk holds its own cells only, each with its own output
        checks: dict[str, Any] = {"notebooks": n, "misplaced": 0, "wrong_output": 0, "missing": 0, "duplicated": 0, "examples": []}
        for j in range(n):
            # execute_code adds no cell: then the notebook must hold none of the tags at all
            answered = opened.sent[j] + closed.sent[j] if tool != "execute_code" else []
            r = check_notebook(os.path.join(d.path, "users", users[j], paths[j]), j, answered)
            for key in ("misplaced", "wrong_output", "missing", "duplicated"):
                checks[key] += len(r[key])
                if r[key] and len(checks["examples"]) < 5:
                    checks["examples"].append(f"{paths[j]} {key}: {r[key][:3]}")
        out["notebooks_on_disk"] = checks
        if checks["misplaced"] or checks["wrong_output"] or checks["missing"] or checks["duplicated"]:
            problems.append(f"kernelpool x{n}: notebooks on disk wrong: {checks}")
    out.update(_server_report(srv, problems, f"kernelpool x{n}"))


async def concurrency(bench: Bench, levels: list[int], duration: float, max_cells: int, mode: str, pool: int,
                      at_once: int, tool: str, problems: list[str], log: Any) -> dict[str, Any]:
    """At each level N: bare jupyter_client driving N kernels, then a fresh kernelpool server
    with N MCP sessions (N/2 users x 2 notebooks); open loop, then closed loop, each `duration` s."""
    n_users = math.ceil(max(levels) / 2)
    d = await bench.data_dir([f"u{i}" for i in range(n_users)])
    run_id = secrets.token_hex(3)
    out: dict[str, Any] = {
        "what": f"open loop: one cell per session every 2 s (4 s above 100 sessions) for {duration:g} s or 3 "
                f"intervals, whichever is longer (latency from the scheduled start); closed loop: next cell when the last answered, {duration:g} s or {max_cells} cells per "
                f"session. kernelpool: {tool}(print(tag)) on the session's notebook (mode={mode}); "
                "stock: jupyter_client execute(print(tag)) on its kernel",
        "levels": {},
    }
    for n in levels:
        level: dict[str, Any] = {}
        for who in ("stock", "kernelpool"):
            log(f"  concurrency x{n}: {who}")
            try:
                if who == "stock":
                    level[who] = await _stock_level(n, duration, max_cells, at_once, f"{run_id}n{n}", problems)
                else:
                    level[who] = await _kp_level(bench, d, n, duration, max_cells, mode, pool, tool,
                                                 f"{run_id}n{n}", problems, log)
            except WrongResult as exc:  # one level failing must not lose the others
                problems.append(f"concurrency x{n} {who}: {exc}")
                level[who] = {"failed": str(exc)}
        out["levels"][str(n)] = level
    return out


# ---- 4. idle memory --------------------------------------------------------------------

async def idle_memory(bench: Bench, k: int, problems: list[str]) -> dict[str, Any]:
    """PSS/USS/RSS per idle kernel after one `1+1`: k kernelpool kernels (pool off, so exactly k)
    vs k stock kernels."""
    d = await bench.data_dir(["idle"])
    out: dict[str, Any] = {"kernels": k}
    async with bench.server(d, pool_size="0") as srv, mcp_client(srv.url, d.tokens["idle"], "legacy") as c:
        for i in range(k):
            await call(c, "use_notebook", {"notebook": f"idle/i{i}.ipynb", "mode": "create"})
            r = await call(c, "execute_code", {"code": "1+1", "notebook": f"idle/i{i}.ipynb"})
            if texts(r) != "2":
                raise WrongResult(f"1+1 answered {texts(r)!r}")
        await asyncio.sleep(2)
        out["kernelpool"] = memory_of(srv.kernels())
        out["kernelpool_helpers"] = memory_of(srv.helpers())  # e.g. a fork server: its pages are shared
        if out["kernelpool"]["processes"] != k:
            out["kernelpool"]["note"] = f"found {out['kernelpool']['processes']} kernel processes, expected {k}"
    out["kernelpool_server"] = _server_report(srv, problems, "idle-memory")
    async with StockKernels() as sk:
        await sk.start_many(k, 10)
        for kern in sk.kernels:
            await kern.execute("1+1")
        await asyncio.sleep(2)
        out["stock"] = memory_of([psutil.Process(p) for p in sk.pids()])
    out["ratio_pss_kernelpool_over_stock"] = ratio(out["kernelpool"]["pss_per_kernel_mb"], out["stock"]["pss_per_kernel_mb"])
    return out
