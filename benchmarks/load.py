"""Load shapes over many sessions: open loop, closed loop; and the cross-talk checks.

A session is anything with `async run(tag) -> Verdict`: it runs one cell that prints `tag` and
judges the reply. Every cell prints a tag unique in the run (`T<run>-<phase>-S<session>-C<n>`),
so a reply or a notebook cell that carries another session's tag is cross-talk.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nbformat

from benchmarks.stats import percentile, summary

TAG = re.compile(r"T\w+-\w+-S(\d+)-C\d+")
CALL_TIMEOUT = 120.0  # one cell; a bound, not a target


@dataclass
class Verdict:
    ok: bool
    error: str | None = None
    crosstalk: bool = False  # the reply carried another session's tag, or named another notebook


Run = Callable[[str], Awaitable[Verdict]]


def tag_of(run_id: str, phase: str, session: int, n: int) -> str:
    return f"T{run_id}-{phase}-S{session}-C{n}"


def judge_text(text: str, tag: str) -> Verdict:
    """The reply text of a cell that printed `tag`."""
    found = TAG.findall(text)
    own = TAG.match(tag)
    assert own is not None
    if any(s != own.group(1) for s in found):
        return Verdict(ok=False, error=f"reply carries another session's tag: {text[:120]!r}", crosstalk=True)
    if text.strip() != tag:
        return Verdict(ok=False, error=f"unexpected reply {text[:120]!r}, wanted {tag!r}")
    return Verdict(ok=True)


@dataclass
class Phase:
    """The outcome of one load phase over all sessions."""

    name: str
    sessions: int
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    crosstalk_replies: int = 0
    per_session: list[int] = field(default_factory=list)
    sent: list[list[str]] = field(default_factory=list)  # tags answered ok, per session
    wall: float = 0.0

    def record(self, session: int, tag: str, started: float, verdict: Verdict) -> None:
        if verdict.ok:
            self.latencies.append(time.perf_counter() - started)
            self.per_session[session] += 1
            self.sent[session].append(tag)
        else:
            self.errors.append(f"S{session} {tag}: {verdict.error}")
            if verdict.crosstalk:
                self.crosstalk_replies += 1

    def report(self) -> dict[str, Any]:
        lat = summary(self.latencies)
        return {
            "sessions": self.sessions,
            "cells": len(self.latencies),
            "wall_s": round(self.wall, 3),
            "throughput_per_s": round(len(self.latencies) / self.wall, 2) if self.wall else None,
            "latency_ms": lat,
            "fairness_p99_over_p50": round(lat["p99"] / lat["p50"], 2) if lat["p50"] else None,
            "cells_per_session_min_max": [min(self.per_session), max(self.per_session)] if self.per_session else None,
            "errors": len(self.errors),
            "error_examples": self.errors[:5],
            "crosstalk_replies": self.crosstalk_replies,
        }


async def _one(phase: Phase, i: int, run: Run, tag: str, started: float) -> None:
    try:
        verdict = await asyncio.wait_for(run(tag), CALL_TIMEOUT)
    except Exception as exc:
        verdict = Verdict(ok=False, error=f"{type(exc).__name__}: {exc}")
    phase.record(i, tag, started, verdict)


def _new_phase(name: str, n: int) -> Phase:
    phase = Phase(name, n)
    phase.per_session = [0] * n
    phase.sent = [[] for _ in range(n)]
    return phase


async def open_loop(runs: Sequence[Run], run_id: str, duration: float, interval: float = 2.0) -> Phase:
    """Each session starts one cell every `interval` s, whether or not the last has answered;
    sessions are spread evenly over the interval. Latency counts from the scheduled start, so a
    queue that builds up shows (no coordinated omission)."""
    phase = _new_phase("open", len(runs))
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []

    async def session(i: int, run: Run) -> None:
        k = 0
        while True:
            at = t0 + interval * i / len(runs) + k * interval
            if at - t0 >= duration:
                return
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(phase, i, run, tag_of(run_id, "open", i, k), at)))
            k += 1

    await asyncio.gather(*(session(i, r) for i, r in enumerate(runs)))
    await asyncio.gather(*tasks)
    phase.wall = time.perf_counter() - t0
    return phase


async def closed_loop(runs: Sequence[Run], run_id: str, duration: float, max_cells: int) -> Phase:
    """Each session sends its next cell as soon as the last answered, for `duration` s or
    `max_cells` cells; throughput is answered cells over the time until the last answer."""
    phase = _new_phase("closed", len(runs))
    t0 = time.perf_counter()
    end = t0 + duration

    async def session(i: int, run: Run) -> None:
        k = 0
        while time.perf_counter() < end and k < max_cells:
            await _one(phase, i, run, tag_of(run_id, "closed", i, k), time.perf_counter())
            k += 1

    await asyncio.gather(*(session(i, r) for i, r in enumerate(runs)))
    phase.wall = time.perf_counter() - t0
    return phase


def check_notebook(path: str, session: int, answered: Sequence[str]) -> dict[str, Any]:
    """A notebook on disk that only session `session` wrote to: every cell carries its own tag,
    every output matches its cell, and every answered tag is there exactly once."""
    with open(path) as f:
        nb = nbformat.read(f, as_version=4)
    nbformat.validate(nb)
    misplaced, wrong_output, seen = [], [], []
    for cell in nb.cells:
        m = TAG.search(cell.source)
        if m is None:
            continue
        tag = m.group(0)
        if int(m.group(1)) != session:
            misplaced.append(tag)
            continue
        seen.append(tag)
        texts = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        if texts.strip() != tag:
            wrong_output.append(f"{tag}: {texts[:80]!r}")
    missing = sorted(set(answered) - set(seen))
    duplicated = sorted({t for t in seen if seen.count(t) > 1})
    return {"cells": len(nb.cells), "misplaced": misplaced, "wrong_output": wrong_output,
            "missing": missing, "duplicated": duplicated}


def quantiles_ms(seconds: Sequence[float]) -> str:
    p = [percentile([s * 1000 for s in seconds], q) for q in (50, 90, 99)]
    return "/".join("-" if v is None else f"{v:.0f}" for v in p)
