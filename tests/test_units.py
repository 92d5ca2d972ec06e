"""Pure functions and small objects, tested directly."""

from __future__ import annotations

import os
import time

import pytest

from kernelpool.cli import parse_when
from kernelpool.errors import PathRefused
from kernelpool.execution import _Stream
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


@pytest.mark.parametrize("path, norm", [("a.ipynb", "a.ipynb"), ("./x//y/b.ipynb", "x/y/b.ipynb")])
def test_notebook_paths_normalise(path: str, norm: str) -> None:
    assert check_notebook_path(path) == norm


@pytest.mark.parametrize("path", ["", "/abs.ipynb", "../up.ipynb", "a/../../b.ipynb", "nul\x00.ipynb", "x.txt",
                                  "bad\udc80.ipynb", "a/..", "."])
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


def test_network_settings_are_checked(tmp_path, monkeypatch) -> None:
    from kernelpool.config import load_settings

    for key in [k for k in os.environ if k.startswith("KERNELPOOL_")]:
        monkeypatch.delenv(key)
    s = load_settings(data_dir=tmp_path)
    assert (s.kernel_network, s.kernel_network_range, s.kernel_network_allow, s.network_prefix) == \
        ("egress", "10.201.0.0/16", [], "kp")
    s = load_settings(data_dir=tmp_path, kernel_network_allow="10.20.30.0/24, 192.168.5.5", network_prefix="kpa")
    assert s.kernel_network_allow == ["10.20.30.0/24", "192.168.5.5/32"]
    bad = [
        {"kernel_network": "bridge"},
        {"kernel_network_range": "8.8.8.0/24"},  # not private
        {"kernel_network_range": "10.0.0.1/32"},  # room for no pair
        {"kernel_network_range": "10.0.0.1/24"},  # host bits set
        {"kernel_network_allow": "10.0.0.0/33"},
        {"network_prefix": "kp1"},  # must end in a letter
        {"network_prefix": "Kp"},
        {"network_prefix": "kpabcdef"},
        {"network_prefix": "kpabcd", "uid_max": 1234567890},  # kpabcd1234567890 > 15 characters
    ]
    for values in bad:
        with pytest.raises(ValueError):
            load_settings(data_dir=tmp_path, **values)
