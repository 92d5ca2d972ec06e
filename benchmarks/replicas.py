"""`python -m benchmarks.sessions --replicas 1,2,3`: kernelpool through HAProxy against 1..N
replicas on this machine, with the direct single-process server (SQLite) in the same run as the
baseline. Real processes throughout: a PostgreSQL 15 server, `kernelpool serve` replicas, Debian's
HAProxy 2.6 (testkit/replicas.py), the MCP SDK's client.

For each configuration: (1) the proxy's cost: a trivial `execute_code` timed directly against a
user's home replica and through HAProxy, in interleaved rounds on the same kernel; (2) each
concurrency level: sessions of distinct users (spread over the replicas by placement), closed
loop for `duration` seconds once every session's kernel is up: cells/s, p50/p99, errors, and
cross-talk (each cell prints a marker of its own session; a reply with another is cross-talk). On
a 2-core machine the replicas share the same cores: more replicas cannot add throughput here, so
the ratios to the baseline show the cost of the extra processes and the proxy, not the gain of
more machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from benchmarks.stats import summary
from testkit.client import mcp_client, text
from testkit.postgres import PostgresServer, running_postgres
from testkit.replicas import Cluster
from testkit.server import KernelpoolServer, make_data_dir, sandbox_reason, server_env

UIDS = {"KERNELPOOL_UID_MIN": "63000", "KERNELPOOL_UID_MAX": "63999",
        "KERNELPOOL_ACCOUNT_PREFIX": f"kpb{os.getpid() % 100000}-", "KERNELPOOL_POOL_SIZE": "0"}


def _args() -> list[str]:
    return [] if sandbox_reason() is None else ["--insecure-no-sandbox"]


@contextlib.asynccontextmanager
async def _direct(users: list[str]) -> AsyncIterator[tuple[str, dict[str, str], str]]:
    server = KernelpoolServer(make_data_dir(), server_env(**UIDS))
    try:
        for u in users:
            await asyncio.to_thread(server.add_user, u)
        await asyncio.to_thread(server.start, *_args())
        yield server.url, server.tokens, server.url
    finally:
        await asyncio.to_thread(server.cleanup)


@contextlib.asynccontextmanager
async def _cluster(pg: PostgresServer, n: int, users: list[str]) -> AsyncIterator[tuple[str, dict[str, str], str]]:
    cluster = Cluster(pg, tuple(f"r{i + 1}" for i in range(n)), **UIDS)
    try:
        await asyncio.to_thread(cluster.start, *_args())
        for u in users:
            await asyncio.to_thread(cluster.add_user, u)
        first = cluster.homes[users[0]]
        yield cluster.url, cluster.tokens, cluster.replicas[first].url
    finally:
        await asyncio.to_thread(cluster.cleanup)


async def _timed_calls(url: str, token: str, calls: int) -> list[float]:
    out = []
    async with mcp_client(url, token, mode="auto") as c:
        await c.call_tool("use_notebook", {"notebook": "lat.ipynb", "mode": "create"})
        await c.call_tool("execute_code", {"notebook": "lat.ipynb", "code": "1+1"})  # the kernel is up
        for _ in range(calls):
            t0 = time.perf_counter()
            r = await c.call_tool("execute_code", {"notebook": "lat.ipynb", "code": "1+1"})
            out.append(time.perf_counter() - t0)
            if text(r).strip() != "2":
                raise RuntimeError(f"wrong reply: {text(r)!r}")
    return out


async def proxy_cost(url: str, direct: str, token: str, calls: int, rounds: int) -> dict[str, Any]:
    """The same user's trivial execute, through the proxy and straight to its home, interleaved."""
    via: list[float] = []
    straight: list[float] = []
    for _ in range(rounds):
        via += await _timed_calls(url, token, calls)
        straight += await _timed_calls(direct, token, calls)
    a, b = summary(via), summary(straight)
    return {"via_proxy_ms": a, "direct_ms": b,
            "added_p50_ms": None if a["p50"] is None or b["p50"] is None else round(a["p50"] - b["p50"], 3)}


async def _session(url: str, token: str, marker: str, ready: _Start, lat: list[float], bad: dict[str, int]) -> None:
    nb = f"{marker}.ipynb"
    waited = False
    try:
        async with mcp_client(url, token, mode="legacy") as c:
            # its kernel starts before the clock does: the window measures cells, not start-ups
            await c.call_tool("use_notebook", {"notebook": nb, "mode": "create"})
            await c.call_tool("execute_code", {"notebook": nb, "code": "0"})
            waited = True
            until = await ready.wait()
            n = 0
            while time.monotonic() < until:
                t0 = time.perf_counter()
                r = await c.call_tool("execute_code", {"notebook": nb, "code": f"print('{marker}-{n}')"})
                lat.append(time.perf_counter() - t0)
                got = text(r).strip()
                if r.is_error:
                    bad["errors"] += 1
                elif got != f"{marker}-{n}":
                    bad["cross_talk"] += 1
                n += 1
    except Exception:
        bad["errors"] += 1
    finally:
        if not waited:  # its start failed: the others do not wait for it
            await ready.wait()


class _Start:
    """The closed loop's start: when every session's kernel is up (or its start failed), all run
    for `duration` seconds from the same moment."""

    def __init__(self, sessions: int, duration: float) -> None:
        self._left, self._duration = sessions, duration
        self._go = asyncio.Event()
        self.at = self.until = 0.0

    async def wait(self) -> float:
        self._left -= 1
        if self._left == 0:
            self.at = time.monotonic()
            self.until = self.at + self._duration
            self._go.set()
        await self._go.wait()
        return self.until


async def level(url: str, tokens: dict[str, str], users: list[str], sessions: int, duration: float) -> dict[str, Any]:
    lat: list[float] = []
    bad = {"errors": 0, "cross_talk": 0}
    start = _Start(sessions, duration)
    await asyncio.gather(*(_session(url, tokens[users[i % len(users)]], f"s{i}", start, lat, bad) for i in range(sessions)))
    took = time.monotonic() - start.at
    return {"sessions": sessions, "cells": len(lat), "cells_per_s": round(len(lat) / took, 1), **bad,
            "latency_ms": summary(lat)}


async def run(replicas: list[int], levels: list[int], duration: float, calls: int, rounds: int,
              log: Any) -> dict[str, Any]:
    users = [f"b{i:02d}" for i in range(max(levels))]
    results: dict[str, Any] = {"replicas": replicas, "levels": levels, "duration_s": duration, "configs": {}}
    with running_postgres() as pg:
        configs: list[tuple[str, Any]] = [("direct", lambda: _direct(users))]
        configs += [(f"{n} replica{'s' if n > 1 else ''}", lambda n=n: _cluster(pg, n, users)) for n in replicas]
        for name, make in configs:
            log(f"replicas: {name} ...")
            async with make() as (url, tokens, home):
                entry: dict[str, Any] = {}
                if name != "direct":
                    entry["proxy"] = await proxy_cost(url, home, tokens[users[0]], calls, rounds)
                else:
                    entry["trivial_ms"] = summary(sum([await _timed_calls(url, tokens[users[0]], calls)
                                                       for _ in range(rounds)], []))
                entry["levels"] = [await level(url, tokens, users, n, duration) for n in levels]
                results["configs"][name] = entry
    base = results["configs"]["direct"]["levels"]
    for name, entry in results["configs"].items():
        for mine, ref in zip(entry["levels"], base, strict=True):
            mine["ratio_to_direct"] = round(mine["cells_per_s"] / ref["cells_per_s"], 2) if ref["cells_per_s"] else None
        entry["name"] = name
    return results


def render(r: dict[str, Any]) -> str:
    out = ["### Replicas behind HAProxy on one machine (baseline: the direct single-process server)", "",
           "| configuration | sessions | cells/s | x direct | p50 ms | p99 ms | errors | cross-talk |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in r["configs"].items():
        for lv in entry["levels"]:
            out.append(f"| {name} | {lv['sessions']} | {lv['cells_per_s']} | {lv['ratio_to_direct']} | "
                       f"{lv['latency_ms']['p50']} | {lv['latency_ms']['p99']} | {lv['errors']} | {lv['cross_talk']} |")
    out += ["", "| configuration | trivial execute p50 via HAProxy | direct to its replica | added by HAProxy |",
            "| --- | --- | --- | --- |"]
    for name, entry in r["configs"].items():
        if "proxy" in entry:
            p = entry["proxy"]
            out.append(f"| {name} | {p['via_proxy_ms']['p50']} | {p['direct_ms']['p50']} | {p['added_p50_ms']} |")
        else:
            out.append(f"| {name} (no proxy) | - | {entry['trivial_ms']['p50']} | - |")
    return "\n".join(out)


def problems(r: dict[str, Any]) -> list[str]:
    """What must hold: no errors, no cross-talk, HAProxy adds at most 1 ms p50 to a trivial execute."""
    found = []
    for name, entry in r["configs"].items():
        for lv in entry["levels"]:
            if lv["errors"] or lv["cross_talk"]:
                found.append(f"{name}, {lv['sessions']} sessions: {lv['errors']} errors, {lv['cross_talk']} cross-talk")
        added = entry.get("proxy", {}).get("added_p50_ms")
        if added is not None and added > 1.0:
            found.append(f"{name}: HAProxy added {added} ms p50 to a trivial execute (at most 1 ms)")
    return found
