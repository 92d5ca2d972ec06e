"""Users' file work, directly: turns per user in the file-work pool, the upper bound of a notebook
parse's memory on worst-case shapes (measured in a fresh process), lone surrogates in saved files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from kernelpool.errors import PathRefused
from kernelpool.notebooks.encoding import file_bytes
from kernelpool.notebooks.filework import LISTED_PER_SECOND, FileWork
from kernelpool.notebooks.listing import LIST_LIMIT
from kernelpool.notebooks.reading import parse_cost
from kernelpool.notebooks.scanner import ScanFailed
from sandbox import SafeRoot

# ---- turns ------------------------------------------------------------------------------------


async def test_one_user_holds_at_most_its_turns_and_others_pass() -> None:
    work = FileWork(workers=4, per_user=2)
    gate = threading.Event()
    running = {"alice": 0, "most": 0}
    lock = threading.Lock()

    def slow() -> str:
        with lock:
            running["alice"] += 1
            running["most"] = max(running["most"], running["alice"])
        gate.wait(10)
        with lock:
            running["alice"] -= 1
        return "alice"

    try:
        alice = [asyncio.create_task(work.run("alice", slow)) for _ in range(8)]
        await asyncio.sleep(0.2)
        assert running["most"] == 2 and work.busy("alice") == 8
        start = time.monotonic()
        assert await work.run("bob", lambda: "bob") == "bob"
        assert time.monotonic() - start < 0.5, "bob did not wait for alice's calls"
        # a cancelled call keeps its turn until its thread ends: alice cannot get past her 2
        alice[0].cancel()
        await asyncio.sleep(0.2)
        assert running["alice"] == 2 and running["most"] == 2 and not alice[0].done()
        gate.set()
        done = await asyncio.gather(*alice, return_exceptions=True)
        assert isinstance(done[0], asyncio.CancelledError) and done[1:] == ["alice"] * 7
        assert running["most"] == 2 and work.busy("alice") == 0
    finally:
        gate.set()
        work.close()


# ---- listings: in scanner processes, paced per user ------------------------------------------------


def _folder(tmp: str, names: list[str]) -> SafeRoot:
    os.makedirs(os.path.join(tmp, "d"))
    for name in names:
        with open(os.path.join(os.fsencode(tmp), b"d", os.fsencode(name)), "wb"):
            pass
    return SafeRoot(tmp)


async def test_listings_come_from_a_scanner_process_that_is_replaced_when_it_dies(tmp_path: Path) -> None:
    """A listing runs in a child process (not in the server's interpreter); one killed while it
    answers fails that listing with a clear error, and the next one gets a new child. Names that are
    not UTF-8 (surrogate escapes), links and refusals come back as they would in the server."""
    names = [f"f{i:03d}.txt" for i in range(40)] + ["caf\udce9.txt", "n.ipynb"]
    root = _folder(str(tmp_path), names)
    os.symlink("/etc/passwd", tmp_path / "d" / "link")
    work = FileWork(scanners=1)
    try:
        found = await work.scan("alice", "files", root, "d", None)
        assert sorted(e["path"] for e in found.items) == sorted(f"d/{n}" for n in [*names, "link"])
        assert {e["type"] for e in found.items if e["path"] == "d/link"} == {"symlink"} and found.note is None
        found = await work.scan("alice", "files", root, "d", "*.ipynb")
        assert [e["path"] for e in found.items] == ["d/n.ipynb"]
        assert (await work.scan("alice", "notebooks", root)).items == ["d/n.ipynb"]
        with pytest.raises(PathRefused, match="no such folder"):
            await work.scan("alice", "files", root, "nowhere", None)
        with pytest.raises(PathRefused, match="link"):
            await work.scan("alice", "files", root, "d/link", None)
        (pid,) = work.scanners.pids()
        assert pid != os.getpid() and psutil.Process(pid).ppid() == os.getpid()

        os.kill(pid, signal.SIGSTOP)  # caught mid-answer: the listing waits for it, then it dies
        listing = asyncio.create_task(work.scan("alice", "files", root, "d", None))
        await asyncio.sleep(0.3)
        assert not listing.done()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ScanFailed, match="scanner process stopped while listing"):
            await listing
        found = await work.scan("bob", "files", root, "d", "f00?.txt")
        assert len(found.items) == 10 and work.scanners.pids() not in ([], [pid])
    finally:
        pids = work.scanners.pids()
        await work.aclose()
    assert pids and not [p for p in pids if psutil.pid_exists(p)], "a closed FileWork's children are gone"


async def test_a_users_listings_are_paced_and_other_users_are_not(tmp_path: Path) -> None:
    """After a listing, its user's turn stays held for its entries at LISTED_PER_SECOND: the answer
    comes at once, the same user's next file call waits, another user's does not."""
    root = _folder(str(tmp_path), [f"f{i:04d}" for i in range(1000)])
    work = FileWork()
    hold = LIST_LIMIT / LISTED_PER_SECOND
    try:
        await work.scan("warm", "files", root, "d", None)  # the child started
        await asyncio.sleep(hold)
        start = time.monotonic()
        found = await work.scan("alice", "files", root, "d", None)
        first = time.monotonic() - start
        assert len(found.items) == LIST_LIMIT and found.note is not None
        bob = time.monotonic()
        assert await work.run("bob", lambda: "bob") == "bob"
        bob = time.monotonic() - bob
        assert await work.run("alice", lambda: "alice") == "alice"
        second = time.monotonic() - start
        assert second >= hold, f"alice's next call came {second:.3f} s after her listing of {LIST_LIMIT} entries"
        assert bob < hold, f"bob waited {bob:.3f} s"
        # an empty listing holds nothing
        start = time.monotonic()
        await work.scan("carol", "files", root, "d", "*.none")
        await work.run("carol", lambda: None)
        assert work.busy("alice") == 0 and first < 5
    finally:
        await work.aclose()


# ---- what a parse holds ---------------------------------------------------------------------------

# VmHWM, the process's peak RSS: unlike getrusage's ru_maxrss it starts afresh at exec
MEASURE = """
import json, sys
from kernelpool.notebooks.reading import parse, parse_cost
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
data = open(sys.argv[1], "rb").read()
before = peak()
nb = parse(data, "x.ipynb")
print(json.dumps({"peak": peak() - before, "cost": parse_cost(data), "size": len(data)}))
"""


def _notebook(cells: list[dict[str, object]] | None = None, metadata: object = None) -> str:
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {"x": metadata} if metadata is not None else {},
                       "cells": cells or []}, separators=(",", ":"), ensure_ascii=False)


def _cell(i: int, source: str = "") -> dict[str, object]:
    return {"cell_type": "raw", "id": f"c{i}", "metadata": {}, "source": source}


SIZE = 3_000_000
SHAPES = {
    "long ASCII text": lambda: _notebook([_cell(0, "x" * SIZE)]),
    "text beyond U+FFFF": lambda: _notebook([_cell(0, "x" * SIZE + "\U0001F600")]),
    "escaped wide text": lambda: _notebook([_cell(0, "x" * SIZE + "\u0101")]).replace("\u0101", "\\u0101"),
    "many tiny cells": lambda: _notebook([_cell(i) for i in range(SIZE // 60)]),
    "empty objects": lambda: _notebook(metadata=[{} for _ in range(SIZE // 3)]),
    "empty lists": lambda: _notebook(metadata=[[] for _ in range(SIZE // 3)]),
    "short strings": lambda: _notebook(metadata=[f"{i:x}"[-2:] for i in range(SIZE // 5)]),
    "numbers": lambda: _notebook(metadata=[i * 0.5 for i in range(SIZE // 8)]),
    "lines": lambda: _notebook([_cell(0, "a\n" * (SIZE // 6))]),
    "objects in lists": lambda: _notebook(metadata=[{"a": [i]} for i in range(SIZE // 12)]),
    "many keys": lambda: _notebook(metadata={f"k{i}": 0 for i in range(SIZE // 10)}),
    "nested objects": lambda: _notebook(metadata=[{"a": {"b": {}}} for _ in range(SIZE // 16)]),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_parse_cost_bounds_what_parsing_holds(shape: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".ipynb", encoding="utf-8") as f:
        f.write(SHAPES[shape]())
        f.flush()
        out = subprocess.run([sys.executable, "-c", MEASURE, f.name], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout)
    print(f"{shape}: file {got['size'] / 2**20:.1f} MiB, peak {got['peak'] / 2**20:.1f} MiB, bound {got['cost'] / 2**20:.1f} MiB")
    assert got["peak"] <= got["cost"], got


def test_parse_cost_is_cheap_and_sees_every_value() -> None:
    assert parse_cost(b"{}") < parse_cost(b'{"a":[{},{}]}')
    plain = b'{"a": "' + b"x" * 10_000_000 + b'"}'
    start = time.perf_counter()
    assert 3 * len(plain) <= parse_cost(plain) <= 3 * len(plain) + 17 * 2**20
    assert time.perf_counter() - start < 1


# ---- lone surrogates in a saved notebook -----------------------------------------------------------

def test_lone_surrogates_are_saved_as_their_escapes() -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("a\ud800b\udfff")])
    nb.metadata["k\udc80"] = "v"
    data = file_bytes(nbformat.writes(nb))
    text = data.decode("utf-8")  # strict: valid UTF-8
    assert "\\ud800" in text and "\\udfff" in text and "\\udc80" in text
    back = nbformat.reads(text, as_version=4)
    assert back.cells[0].source == "a\ud800b\udfff" and back.metadata["k\udc80"] == "v"
    assert file_bytes("plain é \U0001F600") == "plain é \U0001F600".encode()
