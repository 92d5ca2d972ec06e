"""`python -m benchmarks.view`: what open web-view pages cost the agents, measured in one run.

One server, N MCP sessions of one user, each on a notebook of its own of 20 cells that it runs
over and over with `execute_cell` in a closed loop (the concurrency scenario's level N,
`benchmarks.scenarios`, on notebooks that do not grow during the run). One user, so that every change reaches the listener that holds all P
pages (the most work per change); also because `Bench.data_dir` adds users from several CLI
processes at once, and since uids are never given twice (schema migration 3) a later slice
that commits first leaves an earlier one without a uid. The same level is
measured in rounds, alternately without and with P pages of the read-only view open on the busy
notebooks (each page a signed-in browser session: the sign-in form, the rendered notebook, then
its server-sent events read to the end by a Python client; no browser is needed for the load).
Rounds alternate (off, on, on, off, ...) so that drift on a shared machine hits both alike; the
p50 of all cells of each kind is compared. Also reported: events and bytes the pages received.

Exit status: 0 when every result was right, 1 when one was wrong, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import psutil

from benchmarks.harness import Bench, RunningServer
from benchmarks.load import Run, Verdict, closed_loop
from benchmarks.scenarios import WrongResult, _clients, call, texts
from benchmarks.stats import percentile, summary


class Page:
    """What one page's event stream brought."""

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0


async def _sign_in(http: httpx2.AsyncClient, user: str, token: str) -> None:
    form = await http.get("/signin", params={"next": "/view"})
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    if csrf is None:
        raise WrongResult(f"no sign-in form: {form.status_code}")
    r = await http.post("/signin", data={"csrf": csrf.group(1), "txn": "", "next": "/view", "user": user, "token": token})
    if r.status_code != 303:
        raise WrongResult(f"sign-in of {user} answered {r.status_code}")


async def _read(http: httpx2.AsyncClient, user: str, path: str, page: Page, ready: asyncio.Event) -> None:
    r = await http.get(f"/view/{user}/notebooks/{path}")
    found = re.search(r'data-events="(/view/events/[^"]+)"', r.text)
    if r.status_code != 200 or found is None:
        raise WrongResult(f"notebook page of {user}/{path} answered {r.status_code}")
    # the stream itself over a plain socket: counting bytes costs the reader next to nothing
    url = urllib.parse.urlsplit(str(http.base_url))
    cookies = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(f"GET {found.group(1)} HTTP/1.1\r\nHost: {url.netloc}\r\nCookie: {cookies}\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise WrongResult(f"event stream answered {head[:40]!r}")
        ready.set()
        while chunk := await reader.read(1 << 16):
            page.bytes += len(chunk)
            page.events += chunk.count(b"event: ")
    finally:
        writer.close()


async def read_pages(base: str, who: list[tuple[str, str, str]]) -> None:
    """The reader process: a page per (user, token, notebook), each in a browser session (cookie
    jar) of its own; says `ready` once every stream is open, reads until stdin closes, then
    prints what the pages received as JSON."""
    pages = [Page() for _ in who]
    readies = [asyncio.Event() for _ in who]
    clients = [httpx2.AsyncClient(base_url=base, timeout=httpx2.Timeout(30, read=None)) for _ in who]
    for (user, token, _), http in zip(who, clients, strict=True):
        await _sign_in(http, user, token)
    tasks = [asyncio.create_task(_read(http, user, path, page, ready))
             for (user, _, path), http, page, ready in zip(who, clients, pages, readies, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    failed = [t.exception() for t in tasks if t.done() and t.exception() is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for http in clients:
        await http.aclose()
    print(json.dumps({"events": sum(p.events for p in pages), "bytes": sum(p.bytes for p in pages),
                      "reader_cpu_s": round(time.process_time(), 2), "failed": [repr(f) for f in failed]}), flush=True)


@contextlib.asynccontextmanager
async def open_pages(base: str, who: list[tuple[str, str, str]]) -> AsyncIterator[dict[str, Any]]:
    """The pages, read by a process of their own (so that reading them takes no time from the MCP
    clients of this process); yields the dict that gets their totals once they are closed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.view", "--reader", base, json.dumps(who),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    totals: dict[str, Any] = {}
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise WrongResult(f"the page reader did not start: {line!r}")
        yield totals
    finally:
        proc.stdin.close()
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    totals.update(json.loads(out.decode().strip().splitlines()[-1]))
    if totals["failed"]:
        raise WrongResult(f"{len(totals['failed'])} page stream(s) failed: {totals['failed'][0]}")


CELLS = 20  # cells in each busy notebook: the agent runs them over and over, so it does not grow


def _rerun(client: Any, path: str, session: int) -> Run:
    """A session's next call: `execute_cell` on the next of its notebook's cells (its outputs are
    replaced and saved; an open page hears running, output, finished and saved)."""
    count = [0]

    async def run(tag: str) -> Verdict:
        i = count[0] % CELLS
        count[0] += 1
        r = await client.call_tool("execute_cell", {"notebook": path, "cell_index": i})
        sc = r.structured_content or {}
        if r.is_error or sc.get("status") != "ok":
            return Verdict(ok=False, error=f"execute_cell: {texts(r)[:200]}")
        if sc.get("notebook") != path:
            return Verdict(ok=False, error=f"reply names notebook {sc.get('notebook')!r}, not {path!r}", crosstalk=True)
        want = f"s{session} c{i}"
        return Verdict(ok=True) if texts(r).strip() == want else Verdict(ok=False, error=f"reply {texts(r)[:80]!r}, wanted {want!r}")

    return run


async def measure(n: int, pages: int, rounds: int, duration: float, log: Any) -> dict[str, Any]:
    users = ["v0"] * n
    paths = [f"busy/s{j}.ipynb" for j in range(n)]
    async with Bench() as bench:
        d = await bench.data_dir(sorted(set(users)))
        async with bench.server(d, pool_size="1") as srv:
            return await _on(srv, d.tokens, users, paths, n, pages, rounds, duration, log)


async def _on(srv: RunningServer, tokens: dict[str, str], users: list[str], paths: list[str], n: int, pages: int,
              rounds: int, duration: float, log: Any) -> dict[str, Any]:
    base = srv.url.rsplit("/mcp", 1)[0]
    run_id = secrets.token_hex(3)
    lat: dict[str, list[float]] = {"off": [], "on": []}
    per_round: list[dict[str, Any]] = []
    received: dict[str, float] = {"events": 0, "bytes": 0}
    errors = 0
    server = psutil.Process(srv.pid)  # its CPU time per cell, a figure less noisy than latency here
    cpu = {"off": 0.0, "on": 0.0}
    async with _clients(srv.url, [tokens[u] for u in users], "legacy") as clients:
        for j in range(n):
            await call(clients[j], "use_notebook", {"notebook": paths[j], "mode": "create"})
            for i in range(CELLS):
                await call(clients[j], "insert_cell", {"notebook": paths[j], "cell_index": -1, "cell_type": "code",
                                                       "cell_source": f"print('s{j} c{i}')"})
        runs = [_rerun(clients[j], paths[j], j) for j in range(n)]
        await closed_loop(runs, run_id + "w", 3.0, 100)  # warm-up, not counted
        watched = [(users[j % n], tokens[users[j % n]], paths[j % n]) for j in range(pages)]
        # off, on, on, off, ...: a drift of the shared machine falls on both kinds alike
        kinds = [("off", "on", "on", "off")[r % 4] for r in range(rounds * 2)]
        for r, kind in enumerate(kinds):
            async with contextlib.AsyncExitStack() as stack:
                totals = await stack.enter_async_context(open_pages(base, watched)) if kind == "on" else None
                before = server.cpu_times()
                phase = await closed_loop(runs, f"{run_id}r{r}", duration, 10_000)
                after = server.cpu_times()
                await asyncio.sleep(0.3)  # the last updates reach the pages
            cpu[kind] += after.user + after.system - before.user - before.system
            if totals is not None:
                for key in ("events", "bytes", "reader_cpu_s"):
                    received[key] = round(received.get(key, 0) + totals[key], 2)
            rep = phase.report()
            errors += rep["errors"] + rep["crosstalk_replies"]
            lat[kind].extend(phase.latencies)
            per_round.append({"pages": kind, "cells": rep["cells"], "p50_ms": rep["latency_ms"]["p50"],
                              "errors": rep["error_examples"][:2]})
            log(f"  round {r + 1}/{len(kinds)} pages {kind}: {rep['cells']} cells, p50 {rep['latency_ms']['p50']} ms")
    p50 = {k: percentile([s * 1000 for s in v], 50) for k, v in lat.items()}
    change = (p50["on"] / p50["off"] - 1) * 100 if p50["off"] else None
    return {
        "what": f"{n} sessions in a closed loop of execute_cell over {CELLS} cells of a notebook each; {pages} view "
                f"pages open on the busy notebooks in half of {len(kinds)} rounds of {duration:g} s (off, on, on, off, ...)",
        "sessions": n, "pages": pages, "rounds": per_round,
        "without_pages_ms": summary(lat["off"]), "with_pages_ms": summary(lat["on"]),
        "p50_change_percent": None if change is None else round(change, 2),
        "server_cpu_ms_per_cell": {k: round(1000 * cpu[k] / len(lat[k]), 3) if lat[k] else None for k in cpu},
        "pages_received": received, "errors": errors,
    }


def _notebook(cells: int) -> Any:
    """A notebook as agents leave them: markdown, code with streams, a few errors and HTML tables."""
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    nb = new_notebook()
    for i in range(cells):
        if i % 3 == 0:
            nb.cells.append(new_markdown_cell(f"## Step {i}\n\nSome *text*, `code`, a [link](https://example.org):\n\n- a\n- b\n"))
            continue
        outs = [new_output("stream", name="stdout", text=f"line {i}\n" * 20)]
        if i % 7 == 0:
            outs.append(new_output("error", ename="ValueError", evalue="bad",
                                   traceback=["\x1b[0;31m---------\x1b[0m", "\x1b[0;31mValueError\x1b[0m: bad"]))
        if i % 11 == 0:
            outs.append(new_output("display_data", data={"text/html": "<table><tr><td>1</td></tr></table>", "text/plain": "t"}))
        nb.cells.append(new_code_cell(f"for j in range(20):\n    print('line', {i})", execution_count=i, outputs=outs))
    return nb


def render_cost(cells: int = 600, repeat: int = 5) -> dict[str, Any]:
    """The whole page's cells rendered by `kernelpool.web.render`, and by nbconvert's HTML exporter
    (basic template) where nbconvert is installed (it is not a dependency): median seconds."""
    import statistics

    started = time.perf_counter()
    from kernelpool.web import render
    out: dict[str, Any] = {"cells": cells, "kernelpool_import_s": round(time.perf_counter() - started, 3)}
    nb = _notebook(cells)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        html = "".join(render.cell(c) for c in nb.cells)
        times.append(time.perf_counter() - t)
    out.update(kernelpool_render_s=round(statistics.median(times), 3), kernelpool_html_bytes=len(html))
    try:
        started = time.perf_counter()
        from nbconvert import HTMLExporter
    except ImportError:
        out["nbconvert"] = "not installed"
        return out
    out["nbconvert_import_s"] = round(time.perf_counter() - started, 3)
    exporter = HTMLExporter(template_name="basic")
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        exporter.from_notebook_node(nb)
        times.append(time.perf_counter() - t)
    out["nbconvert_render_s"] = round(statistics.median(times), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.view", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=10, help="MCP sessions, one busy notebook each (10)")
    p.add_argument("--pages", type=int, default=10, help="view pages open in the 'on' rounds (10)")
    p.add_argument("--rounds", type=int, default=3, help="pairs of rounds, without and with pages (3)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per round (8)")
    p.add_argument("--json", dest="json_path", help="also write the result here")
    p.add_argument("--render", action="store_true", help="only the cost of rendering a notebook of 600 cells")
    p.add_argument("--reader", nargs=2, metavar=("BASE", "PAGES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reader:
        asyncio.run(read_pages(args.reader[0], [tuple(w) for w in json.loads(args.reader[1])]))
        return 0

    if args.render:
        print(json.dumps(render_cost(), indent=2))
        return 0

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.time()
    try:
        out = asyncio.run(measure(args.sessions, args.pages, args.rounds, args.duration, log))
    except WrongResult as exc:
        print(f"benchmarks.view: wrong result: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"benchmarks.view: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    out["took_s"] = round(time.time() - started, 1)
    print(json.dumps(out, indent=2))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
