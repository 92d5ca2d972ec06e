"""Pure functions and small objects, tested directly."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from kernelpool.cli import parse_when
from kernelpool.errors import InvalidArgument, LimitReached, PathRefused
from kernelpool.executions.outputs import OutputLimits, Outputs, StreamText, outputs_size
from kernelpool.kernels.pip_extension import _PIP_COMMAND, diagnose
from kernelpool.mcp.content import strip_ansi, truncate
from kernelpool.notebooks.filework import FileWork
from kernelpool.notebooks.paths import check_notebook_path
from kernelpool.users.sessions import SessionContexts
from kernelpool.users.throttle import AuthThrottle


def test_session_contexts_are_per_user_and_expire() -> None:
    live = {"s1", "s2"}
    ctx = SessionContexts(idle_timeout=0.2, max_per_user=2, live=lambda: live)
    ctx.reserve("alice")
    ctx.opened("alice", "s1")
    assert ctx.set_notebook("alice", "s1", "a.ipynb")
    assert ctx.active_notebook("alice", "s1") == "a.ipynb"
    assert ctx.active_notebook("bob", "s1") is None, "a session id under another user's token finds nothing"
    assert not ctx.set_notebook("bob", "s1", "b.ipynb"), "an id not issued to bob gets no context"
    assert not ctx.set_notebook("alice", "made-up", "a.ipynb") and len(ctx) == 1
    assert ctx.active_notebook("alice", None) is None
    time.sleep(0.3)
    assert ctx.expire() == 1
    assert ctx.active_notebook("alice", "s1") is None


def test_sessions_per_user_cap_counts_sessions_being_opened() -> None:
    live = {"s1"}
    ctx = SessionContexts(idle_timeout=60, max_per_user=2, live=lambda: live)
    ctx.reserve("alice")
    ctx.opened("alice", "s1")
    ctx.reserve("alice")  # being opened: counted
    with pytest.raises(LimitReached, match=r"MCP sessions per user limit reached \(2\); close sessions"):
        ctx.reserve("alice")
    ctx.reserve("bob")  # another user's cap is their own
    ctx.opened("alice", None)  # that one failed to open
    ctx.reserve("alice")
    ctx.opened("alice", "s2")
    live.add("s2")
    with pytest.raises(LimitReached):
        ctx.reserve("alice")
    live.discard("s1")  # the SDK closed it (DELETE or idle timeout)
    ctx.reserve("alice")
    assert not ctx.is_issued("alice", "s1")


def test_auth_throttle_backs_off_per_address_and_honours_trusted_proxies() -> None:
    now = [0.0]
    t = AuthThrottle(limit=3, window=10, backoff=5, trusted_proxies=["10.0.0.0/8"], clock=lambda: now[0])
    direct = {"client": ("203.0.113.5", 1), "headers": [(b"x-forwarded-for", b"1.2.3.4")]}
    assert t.client_address(direct) == "203.0.113.5", "X-Forwarded-For from an untrusted peer is ignored"
    proxied = {"client": ("10.1.1.1", 1), "headers": [(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4, 10.2.2.2")]}
    assert t.client_address(proxied) == "1.2.3.4", "the right-most hop that is not a trusted proxy"
    for _ in range(2):
        t.failed("1.2.3.4", "bad")
    assert t.retry_after("1.2.3.4") == 0
    t.failed("1.2.3.4", "bad")
    assert t.retry_after("1.2.3.4") == 5 and t.retry_after("203.0.113.5") == 0
    now[0] = 5.1
    assert t.retry_after("1.2.3.4") == 0
    now[0] = 30
    t.failed("1.2.3.4", "bad")
    assert t.retry_after("1.2.3.4") == 0, "old failures fall out of the window"


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
    s = StreamText(1000)
    for i in range(100_000):
        s.add(f"{i}\n", 10**9)
    text = s.text()
    assert text.startswith("0\n1\n2\n") and text.endswith("99998\n99999\n")
    assert len(text) < 1200 and "characters of output dropped" in text
    small = StreamText(1000)
    small.add("abc", 10**9)
    small.add("def", 10**9)
    assert small.text() == "abcdef"
    tight = StreamText(1000)
    assert tight.add("x" * 300, 100) == 100 and tight.add("y" * 5000, 0) == 0 and tight.size == 100


def test_every_mime_type_and_the_execution_are_bounded() -> None:
    limits = OutputLimits(stream_chars=1000, outputs=50, image_bytes=600, execution_chars=5000)
    outs = Outputs(limits)

    def display(data: dict) -> None:
        outs.add({"msg_type": "display_data", "content": {"data": data, "metadata": {}}})

    display({"text/plain": "p" * 40_000, "text/html": "<b>" + "h" * 40_000 + "</b>"})
    display({"application/json": {"k": "v" * 5000}, "application/pdf": "A" * 5000, "image/png": "B" * 4000})
    items = outs.items
    first, second = items[0].data, items[1].data
    assert len(first["text/plain"]) < 1200 and first["text/plain"].startswith("ppp") and "dropped" in first["text/plain"]
    assert len(first["text/html"]) < 1200 and first["text/html"].endswith("</b>")
    assert set(second) == {"text/plain"} and second["text/plain"].count("dropped") == 3
    for _ in range(20):
        display({"text/plain": "q" * 900})
    outs.add({"msg_type": "stream", "content": {"name": "stdout", "text": "s" * 10_000}})
    items = outs.items
    assert outputs_size(items) <= 5000 + 300, "all outputs together stay within the execution's limit (and a note)"
    assert "kept per execution" in items[-2].data["text/plain"], "the output that did not fit is replaced by a note"
    assert items[-1].name == "stderr" and "more outputs dropped" in items[-1].text and "per execution" in items[-1].text


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

    from kernelpool.notebooks.cells import insert_cell
    from kernelpool.notebooks.service import NotebookService
    from sandbox import SafeRoot

    svc = NotebookService(lambda user: SafeRoot(str(tmp_path)), FileWork(), 100 << 20)
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

    from kernelpool.notebooks.cells import insert_cell
    from kernelpool.notebooks.service import NotebookService
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

    svc = NotebookService(lambda user: SafeRoot(str(tmp_path)), FileWork(), 100 << 20)
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


def test_finished_results_are_bounded_per_user_and_overall() -> None:
    from nbformat.v4 import new_output

    from kernelpool.config import Settings
    from kernelpool.errors import ResultExpired
    from kernelpool.executions.execute import ExecutionResult
    from kernelpool.executions.jobs import Job, JobService
    from kernelpool.metrics import Metrics

    # only the bookkeeping of finished results runs here: no kernel, notebook or user is touched
    jobs = JobService(Settings(max_result_bytes_per_user=2500, max_result_bytes=4000), None, None, None, Metrics())  # type: ignore[arg-type]

    def finish(user: str, size: int) -> Job:
        job = Job(id=f"{user}-{len(jobs._jobs)}", user=user, notebook="n.ipynb", cell_id=None, background=True)
        job.result = ExecutionResult("ok", outputs=[new_output("stream", name="stdout", text="x" * size)] if size else [])
        jobs._jobs[job.id] = job
        jobs._hold(job)
        return job

    a = [finish("alice", 1000) for _ in range(3)]
    zero = finish("alice", 0)
    assert jobs.result_bytes("alice") == 2000 and "alice-0" not in jobs._jobs, "the oldest went first"
    with pytest.raises(ResultExpired, match="max_result_bytes_per_user"):
        jobs.get("alice", a[0].id)
    with pytest.raises(InvalidArgument):
        jobs.get("bob", a[0].id)  # another user's id: not even "expired"
    b = [finish("bob", 1000) for _ in range(2)]
    finish("bob", 500)  # 4500 in all, over 4000: the biggest holder (bob, 2500 against 2000) loses its oldest
    assert jobs.result_bytes() <= 4000 and b[0].id not in jobs._jobs and a[1].id in jobs._jobs
    jobs._drop(zero, "test")
    jobs._drop(a[1], "test")
    assert jobs.result_bytes("alice") == 1000


def test_an_oversized_stream_message_keeps_head_and_tail_unparsed() -> None:
    import json

    from kernelpool.kernels.messages import _head_and_tail, _Sample

    body = "".join(("é\"\\\n" if i % 7 == 0 else "abc\u2603") for i in range(100_000)) + "THE END\n"
    raw = json.dumps({"name": "stdout", "text": body}, ensure_ascii=False).encode()
    for keep in (1000, 1001, 1002, 1003, 1005, 5003):  # cuts land inside escapes and UTF-8 characters
        sample = _Sample(keep + 256, keep + 64)  # as the reader keeps it: pieces of any size pass through
        at = 0
        for size in (1, 700, 65536, 13, 4096) * 200:
            sample.add(raw[at:at + size])
            at += size
        sample.add(raw[at:])
        assert bytes(sample.head) == raw[:keep + 256] and bytes(sample.tail)[-(keep + 64):] == raw[-(keep + 64):]
        text = _head_and_tail(bytes(sample.head), bytes(sample.tail), keep, len(raw))
        assert text is not None
        head, _, rest = text.partition("\n[... about ")
        assert "bytes of output dropped unread" in rest
        tail = rest.split(" ...]\n", 1)[1]
        assert body.startswith(head) and len(head) > keep // 4
        assert body.endswith(tail) and tail.endswith("THE END\n")
    assert _head_and_tail(b'{"data": {}}', b'{"data": {}}', 10, 12) is None


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


def test_memory_limits_are_parsed_once_into_bytes() -> None:
    from pydantic import ValidationError

    from kernelpool.config import Settings, memory_limit

    s = Settings(kernel_memory="512M", user_memory="none")
    assert (s.kernel_memory, s.user_memory) == (512 << 20, None)
    assert Settings().kernel_memory == 2 << 30, "the default is bytes too"
    assert [memory_limit(v) for v in ("max", "None", "", None, "1G", 4096)] == [None, None, None, None, 1 << 30, 4096]
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValidationError, match="kernel_memory"):
            Settings(kernel_memory=bad)


def test_setting_options_are_made_from_the_settings_fields(tmp_path, monkeypatch) -> None:
    from kernelpool.cli import _settings, build_parser

    for key in [k for k in os.environ if k.startswith("KERNELPOOL_")]:
        monkeypatch.delenv(key)
    parse = build_parser().parse_args
    s = _settings(parse(["serve", "--data-dir", str(tmp_path), "--port", "0", "--pool-size", "3", "--log-json",
                         "--kernel-network", "none", "--insecure-no-sandbox", "--log-level", "debug"]))
    assert (s.port, s.pool_size, s.log_json, s.kernel_network, s.insecure_no_sandbox, s.log_level) == \
        (0, 3, True, "none", True, "debug")
    monkeypatch.setenv("KERNELPOOL_POOL_SIZE", "5")
    s = _settings(parse(["serve", "--data-dir", str(tmp_path)]))
    assert (s.port, s.pool_size, s.log_json, s.insecure_no_sandbox, s.data_dir) == (8765, 5, False, False, tmp_path)
    # a user's override is not the server's setting
    args = parse(["users", "set-limits", "ann", "--memory", "1G", "--cpus", "0.5", "--data-dir", str(tmp_path)])
    assert (args.kernel_memory, args.kernel_cpus) == ("1G", 0.5) and _settings(args).kernel_memory == 2 << 30
    with pytest.raises(SystemExit):
        parse(["serve", "--port", "eighty"])


def test_file_content_decoding_and_text_pages() -> None:
    from kernelpool.errors import InvalidArgument
    from kernelpool.notebooks.files import _text_page, decode_content

    assert decode_content("aé", "utf-8") == "aé".encode()
    assert decode_content("AAE=", "base64") == b"\0\1"
    for bad, encoding in (("a\ud800", "utf-8"), ("AAE", "base64"), ("A A=", "base64")):
        with pytest.raises(InvalidArgument):
            decode_content(bad, encoding)  # type: ignore[arg-type]
    # a character cut at the page's end waits for the next page; NULs and bad bytes are binary
    assert _text_page("é😀".encode()[:4], at_end=False, max_chars=10) == ("é", 2)
    assert _text_page("é😀".encode(), at_end=True, max_chars=1) == ("é", 2)
    assert _text_page(b"a\0b", at_end=True, max_chars=10) is None
    assert _text_page(b"\xff", at_end=True, max_chars=10) is None
    assert _text_page("😀".encode()[1:], at_end=True, max_chars=10) is None


def test_chdir_code_quotes_the_folder_for_each_language() -> None:
    from kernelpool.kernels.registry import chdir_code

    folder = "a b/it's \"q\" $(x) `y`\\é"
    assert chdir_code("python", folder) == f"import os as _o; _o.chdir({folder!r}); del _o"
    assert chdir_code("R", folder) == 'setwd("a b/it\'s \\"q\\" $(x) `y`\\\\\\u00e9")'
    assert chdir_code("bash", folder) == "cd -- 'a b/it'\"'\"'s \"q\" $(x) `y`\\é'"
    assert chdir_code("julia", folder) is None


def test_a_kernelspecs_env_cannot_say_who_or_where_the_user_is() -> None:
    from kernelpool.kernels.environment import other_kernel_env

    env = other_kernel_env("/usr/bin/R", {"R_HOME": "/usr/lib/R", "PATH": "/opt/r/bin", "HOME": "/root"},
                           "kp-alice", "/data/users/alice", "/run/alice")
    assert env["R_HOME"] == "/usr/lib/R" and env["PATH"] == "/opt/r/bin"
    assert (env["HOME"], env["USER"], env["TMPDIR"]) == ("/data/users/alice", "kp-alice", "/run/alice")
