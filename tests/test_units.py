"""Pure functions and small objects, tested directly."""

from __future__ import annotations

import asyncio
import time

import pytest

from kernelpool.cli import parse_when
from kernelpool.errors import PathRefused
from kernelpool.execution import _Stream
from kernelpool.kernel_pip import _PIP_COMMAND, diagnose
from kernelpool.notebooks import check_notebook_path
from kernelpool.outputs import strip_ansi, truncate
from kernelpool.sessions import SessionContexts


def test_session_contexts_are_per_user_and_expire() -> None:
    ctx = SessionContexts(idle_timeout=0.2)
    ctx.set_notebook("alice", "s1", "a.ipynb")
    assert ctx.active_notebook("alice", "s1") == "a.ipynb"
    assert ctx.active_notebook("bob", "s1") is None, "a session id under another user's token finds nothing"
    assert ctx.active_notebook("alice", None) is None
    time.sleep(0.3)
    assert ctx.expire() == 1
    assert ctx.active_notebook("alice", "s1") is None


@pytest.mark.parametrize("path, norm", [("a.ipynb", "a.ipynb"), ("./x//y/b.ipynb", "x/y/b.ipynb"),
                                        ("cafe\u0301.ipynb", "caf\u00e9.ipynb"), ("a b/c d.ipynb", "a b/c d.ipynb")])
def test_notebook_paths_normalise(path: str, norm: str) -> None:
    assert check_notebook_path(path) == norm


@pytest.mark.parametrize("path", ["", "/abs.ipynb", "../up.ipynb", "a/../../b.ipynb", "nul\x00.ipynb", "x.txt",
                                  "bad\udc80.ipynb", "a/..", ".", "rtl\u202e.ipynb", " lead.ipynb", "dir /a.ipynb",
                                  "new\nline.ipynb", "/".join(["d"] * 32) + "/x.ipynb", "x" * 250 + ".ipynb"])
def test_notebook_paths_refused(path: str) -> None:
    with pytest.raises(PathRefused):
        check_notebook_path(path)


def test_stream_keeps_head_and_tail_within_its_limit() -> None:
    s = _Stream(1000)
    for i in range(100_000):
        s.add(f"{i}\n")
    text = s.text()
    assert text.startswith("0\n1\n2\n") and text.endswith("99998\n99999\n")
    assert len(text) < 1200 and "characters of output dropped" in text
    small = _Stream(1000)
    small.add("abc")
    small.add("def")
    assert small.text() == "abcdef"


def test_truncate_and_ansi() -> None:
    assert truncate("x" * 10, 20) == ("x" * 10, 0)
    cut, n = truncate("a" * 100 + "b" * 100, 30)
    assert n == 170 and cut.startswith("a" * 20) and cut.endswith("b" * 10)
    assert strip_ansi("\x1b[0;31mValueError\x1b[0m: boom") == "ValueError: boom"


def test_parse_when() -> None:
    assert abs(parse_when("2h") - (time.time() + 7200)) < 5
    assert parse_when("2001-01-01T00:00:00") == 978307200.0
    with pytest.raises(Exception):
        parse_when("soon")


async def test_incremental_validation_still_refuses_an_invalid_change(tmp_path) -> None:
    import nbformat

    from kernelpool.notebooks import NotebookService, insert_cell
    from sandbox import SafeRoot

    svc = NotebookService(lambda user: SafeRoot(str(tmp_path)))
    await svc.create("u", "n.ipynb")
    for i in range(5):
        await svc.edit("u", "n.ipynb", lambda nb, i=i: insert_cell(nb, -1, "code", f"x = {i}"))
    before = (tmp_path / "n.ipynb").read_bytes()

    def break_outputs(nb):
        nb.cells[2].outputs = [{"output_type": "stream"}]  # no name, no text

    def duplicate_id(nb):
        nb.cells[3]["id"] = nb.cells[1]["id"]

    def break_metadata(nb):
        nb["metadata"] = {"kernelspec": 5}

    for change in (break_outputs, duplicate_id, break_metadata):
        with pytest.raises(ValueError):
            await svc.edit("u", "n.ipynb", change)
        assert (tmp_path / "n.ipynb").read_bytes() == before
    nb = await svc.load("u", "n.ipynb")
    nbformat.validate(nb)
    assert [c.source for c in nb.cells] == [f"x = {i}" for i in range(5)]


@pytest.mark.parametrize(("line", "args"), [
    ("pip install x", "install x"),
    ("pip3 install -U x==1.0", "install -U x==1.0"),
    ("/opt/venv/bin/pip uninstall -y x", "uninstall -y x"),
    ("python -m pip install x", "install x"),
    ("python3.11 -m pip list", "list"),
    ("pip", ""),
    ("pipx install x", None),
    ("echo pip install x", None),
    ("python -m pipdeptree", None),
])
def test_shell_lines_that_run_pip_go_through_the_wrapper(line: str, args: str | None) -> None:
    match = _PIP_COMMAND.match(line)
    assert (match.group(1).strip() if match else None) == args


def test_pip_failures_are_named() -> None:
    disk = diagnose("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device", "/tmp")
    assert disk is not None and "your folder is full" in disk and "MB free" in disk
    net = diagnose("WARNING: Retrying ... NewConnectionError(... [Errno 101] Network is unreachable')", "/tmp")
    assert net is not None and "cannot reach the package index" in net
    assert diagnose("ERROR: No matching distribution found for nosuchpackage", "/tmp") is None


async def test_a_cancelled_save_holds_the_lock_until_its_write_is_done(tmp_path) -> None:
    """An edit cancelled while its write thread runs must not let a later edit's rename land
    first (the late write would then wipe it): the later edit waits for the file to be final."""
    import threading

    from kernelpool.notebooks import NotebookService, insert_cell
    from sandbox import SafeRoot

    release = threading.Event()
    entered = threading.Event()

    class SlowFirstWrite(SafeRoot):
        slow = True

        def write_bytes_atomic(self, path: str, data: bytes) -> None:  # type: ignore[override]
            if SlowFirstWrite.slow:
                SlowFirstWrite.slow = False
                entered.set()
                release.wait(10)  # a slow disk, under the writer's control
            super().write_bytes_atomic(path, data)

    svc = NotebookService(lambda user: SafeRoot(str(tmp_path)))
    await svc.create("u", "n.ipynb")
    svc._roots = lambda user: SlowFirstWrite(str(tmp_path))  # the writes of this test go slow once
    first = asyncio.ensure_future(svc.edit("u", "n.ipynb", lambda nb: insert_cell(nb, -1, "code", "first")))
    await asyncio.to_thread(entered.wait, 10)
    first.cancel()
    second = asyncio.ensure_future(svc.edit("u", "n.ipynb", lambda nb: insert_cell(nb, -1, "code", "second")))
    await asyncio.sleep(0.2)
    assert not second.done()  # held: the first write has not finished
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    import nbformat

    sources = [c.source for c in nbformat.read(str(tmp_path / "n.ipynb"), as_version=4).cells]
    assert sources[-1] == "second"
