"""read_file, write_file, delete_file and file:// resources: a real server and client, real
files; bounded by max_file_bytes and the disk quota, within the user's folder, bad input refused
with nothing changed."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from testkit.client import mcp_client, text
from testkit.server import KernelpoolServer, make_data_dir, server_env

MAX = 64 * 1024  # max_file_bytes of this module's server
QUOTA = 3 << 20


@pytest.fixture(scope="module")
def srv(server_args: list[str]) -> Iterator[KernelpoolServer]:
    server = KernelpoolServer(make_data_dir(), server_env(
        KERNELPOOL_POOL_SIZE="0", KERNELPOOL_MAX_FILE_BYTES=str(MAX), KERNELPOOL_USER_DISK_QUOTA="3M",
        KERNELPOOL_USER_DISK_RECOUNT="0.2"))
    try:
        for name in ("alice", "bob", "carol"):
            server.add_user(name)
        server.start(*server_args)
        yield server
    finally:
        server.cleanup()


def home(srv: KernelpoolServer, user: str) -> str:
    return os.path.join(srv.data_dir, "users", user)


async def call(c: Any, tool: str, **args: Any) -> Any:
    return await c.call_tool(tool, args)


async def read_all(c: Any, path: str, max_chars: int) -> tuple[bytes, int]:
    """The whole file through read_file pages; and how many pages it took."""
    out, offset, pages = b"", 0, 0
    while True:
        r = await call(c, "read_file", path=path, offset=offset, max_chars=max_chars)
        assert not r.is_error, text(r)
        sc = r.structured_content
        out += sc["content"].encode() if sc["encoding"] == "utf-8" else base64.b64decode(sc["content"])
        pages += 1
        if sc["next_offset"] is None:
            assert not [b for b in r.content if b.type == "resource_link"]
            return out, pages
        links = [b for b in r.content if b.type == "resource_link"]
        assert links and links[0].uri.endswith(f"?offset={sc['next_offset']}")
        offset = sc["next_offset"]


async def test_text_and_binary_round_trip_in_pages(srv: KernelpoolServer) -> None:
    body = "".join(f"line {i}: é€😀 ✓\n" for i in range(3000))  # 1-4 bytes a character, over MAX
    data = body.encode()
    async with mcp_client(srv.url, srv.tokens["alice"], mode="auto") as c:
        chunks = [data[i:i + MAX // 2] for i in range(0, len(data), MAX // 2)]
        # cut anywhere: base64 for the pieces, which may split a character
        r = await call(c, "write_file", path="docs/t.txt", content=base64.b64encode(chunks[0]).decode(), encoding="base64")
        assert not r.is_error and r.structured_content["created"], text(r)
        for chunk in chunks[1:]:
            r = await call(c, "write_file", path="docs/t.txt", content=base64.b64encode(chunk).decode(),
                           encoding="base64", mode="append")
            assert not r.is_error, text(r)
        assert r.structured_content["size"] == len(data)
        got, pages = await read_all(c, "docs/t.txt", 1000)
        assert got == data and pages > 10
        r = await call(c, "read_file", path="docs/t.txt", max_chars=5)
        assert r.structured_content["content"] == "line " and r.structured_content["encoding"] == "utf-8"
        blob = bytes(range(256)) * 50
        assert not (await call(c, "write_file", path="b.bin", content=base64.b64encode(blob).decode(),
                               encoding="base64")).is_error
        got, _ = await read_all(c, "b.bin", 4000)
        assert got == blob
        r = await call(c, "read_file", path="b.bin")
        assert r.structured_content["encoding"] == "base64"
        # the same through file:// resources, page after page
        uri, got = "file://b.bin", b""
        while uri:
            res = await c.read_resource(uri)
            content = res.contents[0]
            got += base64.b64decode(content.blob)
            uri = (content.meta or {}).get("next")
        assert got == blob
        res = await c.read_resource("file://docs/t.txt?offset=0")
        assert res.contents[0].text.startswith("line 0: é€😀") and res.contents[0].mime_type == "text/plain"
        r = await call(c, "write_file", path="docs/t.txt", content="short", mode="overwrite")
        assert not r.is_error and not r.structured_content["created"]
    path = os.path.join(home(srv, "alice"), "docs", "t.txt")
    with open(path, "rb") as f:
        assert f.read() == b"short"
    st, folder = os.stat(path), os.stat(home(srv, "alice"))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (folder.st_uid, folder.st_gid, 0o600)
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".kptmp")]


def _plant(srv: KernelpoolServer, user: str) -> dict[str, str]:
    """What a hostile kernel leaves in its folder: links, a FIFO, a folder, a hard link to root's file."""
    root = home(srv, user)
    outside = os.path.join(srv.data_dir, "root-secret.txt")
    with open(outside, "w") as f:
        f.write("root only\n")
    os.chmod(outside, 0o600)
    os.symlink(outside, os.path.join(root, "link.txt"))
    os.mkfifo(os.path.join(root, "fifo.txt"))
    os.mkdir(os.path.join(root, "folder.txt"))
    os.link(outside, os.path.join(root, "hard.txt"))
    return {"outside": outside}


async def test_bad_input_is_refused_and_changes_nothing(srv: KernelpoolServer) -> None:
    planted = _plant(srv, "bob")
    with open(planted["outside"], "rb") as f:
        secret = f.read()
    async with mcp_client(srv.url, srv.tokens["bob"], mode="legacy") as c:
        assert not (await call(c, "write_file", path="keep.txt", content="kept")).is_error
        before = sorted(os.listdir(home(srv, "bob")))
        refused: list[tuple[str, dict[str, Any], str]] = [
            ("read_file", {"path": "../alice/docs/t.txt"}, "path refused"),
            ("read_file", {"path": "/etc/passwd"}, "absolute"),
            ("read_file", {"path": ""}, "empty path"),
            ("read_file", {"path": "a\x00b"}, "path refused"),
            ("read_file", {"path": "link.txt"}, "symbolic link"),
            ("read_file", {"path": "fifo.txt"}, "not a regular file"),
            ("read_file", {"path": "folder.txt"}, "path refused"),
            ("read_file", {"path": "hard.txt"}, "hard link"),
            ("read_file", {"path": "missing.txt"}, "no such file"),
            ("read_file", {"path": "keep.txt", "offset": -1}, "offset"),
            ("read_file", {"path": "keep.txt", "offset": 99}, "past the end"),
            ("read_file", {"path": "keep.txt", "max_chars": 0}, "max_chars"),
            ("read_file", {"path": "keep.txt", "max_chars": MAX + 1}, "max_chars"),
            ("read_file", {"path": "keep.txt", "encoding": "latin-1"}, "encoding"),
            ("write_file", {"path": "keep.txt", "content": "x"}, "exists"),
            ("write_file", {"path": "new.txt", "content": "x", "mode": "append"}, "does not exist"),
            ("write_file", {"path": "link.txt", "content": "x", "mode": "overwrite"}, "symbolic link"),
            ("write_file", {"path": "link.txt", "content": "x", "mode": "append"}, "symbolic link"),
            ("write_file", {"path": "hard.txt", "content": "x", "mode": "append"}, "hard link"),
            ("write_file", {"path": "fifo.txt", "content": "x", "mode": "overwrite"}, "not a regular file"),
            ("write_file", {"path": "fifo.txt", "content": "x", "mode": "append"}, "not a regular file"),
            ("write_file", {"path": "folder.txt", "content": "x", "mode": "overwrite"}, "folder"),
            ("write_file", {"path": "link.txt/x", "content": "x"}, "symbolic link"),
            ("write_file", {"path": "big.txt", "content": "x" * (MAX + 1)}, "max_file_bytes"),
            ("write_file", {"path": "b.bin", "content": "not base64!", "encoding": "base64"}, "base64"),
            ("write_file", {"path": "../alice/x.txt", "content": "x"}, "path refused"),
            ("delete_file", {"path": "folder.txt"}, "folder"),
            ("delete_file", {"path": "fifo.txt"}, "not a regular file"),
            ("delete_file", {"path": "missing.txt"}, "no such file"),
            ("delete_file", {"path": "../alice/docs/t.txt"}, "path refused"),
        ]
        for tool, args, said in refused:
            r = await call(c, tool, **args)
            assert r.is_error and said in text(r), (tool, args, text(r))
        r = await call(c, "read_file", path="b.bin", encoding="utf-8")
        assert r.is_error, "no such file for bob"
        assert not (await call(c, "write_file", path="b.bin", content="AAE=", encoding="base64")).is_error
        r = await call(c, "read_file", path="b.bin", encoding="utf-8")
        assert r.is_error and "not UTF-8" in text(r)
        before.append("b.bin")
        assert sorted(os.listdir(home(srv, "bob"))) == sorted(before)
        with open(os.path.join(home(srv, "bob"), "keep.txt")) as f:
            assert f.read() == "kept"
        with open(planted["outside"], "rb") as f:
            assert f.read() == secret
        # a link is deleted itself, never its target; a file goes
        assert not (await call(c, "delete_file", path="link.txt")).is_error
        assert not (await call(c, "delete_file", path="keep.txt")).is_error
        assert not os.path.lexists(os.path.join(home(srv, "bob"), "link.txt"))
        assert os.path.exists(planted["outside"])
    assert os.path.exists(os.path.join(home(srv, "alice"), "docs", "t.txt")), "bob's calls never reached alice's folder"


async def test_content_that_is_not_unicode_is_refused(srv: KernelpoolServer) -> None:
    """A lone surrogate ("\\ud800" in the request's JSON; the SDK's client cannot send one): the
    SDK's JSON parser refuses the request before any tool sees it (decode_content would refuse it too)."""
    headers = {"Authorization": f"Bearer {srv.tokens['bob']}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    async with httpx2.AsyncClient(timeout=60) as http:
        r = await http.post(srv.url, json=init, headers=headers)
        session = headers | {"mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        await http.post(srv.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        body = ('{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "write_file", '
                '"arguments": {"path": "u.txt", "content": "a\\ud800b"}}}')
        r = await http.post(srv.url, content=body.encode(), headers=session)
    assert r.status_code == 400 and "Parse error" in r.text, r.text
    assert not os.path.exists(os.path.join(home(srv, "bob"), "u.txt"))


async def test_a_deleted_or_rewritten_notebook_is_read_afresh(srv: KernelpoolServer) -> None:
    async with mcp_client(srv.url, srv.tokens["bob"], mode="auto") as c:
        assert not (await call(c, "use_notebook", notebook="n.ipynb", mode="create")).is_error
        await call(c, "insert_cell", notebook="n.ipynb", cell_index=-1, cell_type="markdown", cell_source="one")
        assert (await call(c, "read_notebook", notebook="n.ipynb")).structured_content["total_cells"] == 1
        assert not (await call(c, "delete_file", path="n.ipynb")).is_error
        r = await call(c, "read_notebook", notebook="n.ipynb")
        assert r.is_error and "not found" in text(r)


async def test_disk_quota_refuses_writes_and_changes_nothing(srv: KernelpoolServer) -> None:
    chunk = base64.b64encode(b"q" * MAX).decode()
    async with mcp_client(srv.url, srv.tokens["carol"], mode="auto") as c:
        assert not (await call(c, "write_file", path="fill.bin", content=chunk, encoding="base64")).is_error
        for _ in range(QUOTA // MAX + 8):
            r = await call(c, "write_file", path="fill.bin", content=chunk, encoding="base64", mode="append")
            if r.is_error:
                break
        assert r.is_error and "disk quota of 3.0 MiB reached" in text(r) and "nothing changed" in text(r), text(r)
        # fill what room is left, to the byte: then any write that adds a byte is refused
        step = MAX // 2
        while step:
            piece = base64.b64encode(b"q" * step).decode()
            while not (await call(c, "write_file", path="fill.bin", content=piece, encoding="base64",
                                  mode="append")).is_error:
                pass
            step //= 2
        size = os.path.getsize(os.path.join(home(srv, "carol"), "fill.bin"))
        assert QUOTA - MAX < size <= QUOTA
        for tool, args in (("write_file", {"path": "more.txt", "content": "x"}),
                           ("use_notebook", {"notebook": "new.ipynb", "mode": "create"})):
            r = await call(c, tool, **args)
            assert r.is_error and "disk quota" in text(r), text(r)
        assert sorted(os.listdir(home(srv, "carol"))) == ["fill.bin"]
        assert os.path.getsize(os.path.join(home(srv, "carol"), "fill.bin")) == size
        # a write that frees space passes; then there is room again
        assert not (await call(c, "write_file", path="fill.bin", content="small", mode="overwrite")).is_error
        assert not (await call(c, "use_notebook", notebook="new.ipynb", mode="create")).is_error
        # what a kernel writes directly is seen at the next count: then the server's writes stop
        r = await call(c, "execute_code", notebook="new.ipynb",
                       code=f"open('direct.bin', 'wb').write(b'k' * {QUOTA + MAX}); print('ok')")
        assert "ok" in text(r), text(r)
        import asyncio

        await asyncio.sleep(0.5)
        r = await call(c, "write_file", path="after.txt", content="x")
        assert r.is_error and "disk quota" in text(r), text(r)
        assert not (await call(c, "delete_file", path="direct.bin")).is_error
        assert not (await call(c, "write_file", path="after.txt", content="x")).is_error
