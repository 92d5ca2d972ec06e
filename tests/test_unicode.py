"""Strings that are not valid Unicode never break a reply, a session or a notebook file.

A notebook can hold lone surrogates (a "\\ud800" JSON escape in the .ipynb, which Python reads as
is), a kernel can send them in its output (as an escape, or as the UTF-8 bytes of a surrogate,
which jupyter_client's JSON decoding lets through) or send bytes that are not UTF-8, and a kernel
can name a file with bytes that are not UTF-8. Before, with a session the server logged "Error in
message router" and the session stopped answering; sessionless clients got JSON they could not
parse. Here a real server, real kernels and the real MCP client in both protocol modes, and the
raw HTTP of one session checked byte by byte: every reply is valid UTF-8 JSON without lone
surrogates (U+FFFD stands for each), the session answers the next call, and the .ipynb written
back stays valid UTF-8 JSON that keeps the escapes it had.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx2
import nbformat
import pytest
from mcp.types import JSONRPCResponse

from testkit.client import mcp_client, text
from testkit.server import KernelpoolServer

# as a kernel could write it: lone surrogates as JSON escapes in sources, outputs, metadata, names
NOTEBOOK = r"""{
 "cells": [
  {"cell_type": "code", "execution_count": 1, "id": "c1", "metadata": {"tag\ud800": "v\udfff"},
   "outputs": [{"name": "stdout", "output_type": "stream", "text": ["out\udcff\n"]},
               {"data": {"text/plain": ["plain\ud83d"]}, "execution_count": 1, "metadata": {},
                "output_type": "execute_result"}],
   "source": "print('src\ud800')"},
  {"cell_type": "markdown", "id": "m1", "metadata": {}, "source": "md \udbff end"}
 ],
 "metadata": {"kernelspec": {"display_name": "Py\ud800", "language": "python", "name": "python3"}, "custom\udc00": 1},
 "nbformat": 4,
 "nbformat_minor": 5
}
"""

# a kernel sends its own messages: a lone surrogate as an escape and as raw UTF-8 bytes, then
# bytes that are not UTF-8 at all (that message is dropped by the server, and said so in its log)
CRAFTED = r"""k = get_ipython().kernel
k.session.send(k.iopub_socket, 'stream', b'{"name": "stdout", "text": "esc\\ud800 raw\xed\xa0\x80 end\\n"}', parent=k.get_parent())
k.session.send(k.iopub_socket, 'stream', b'{"name": "stdout", "text": "bad\xff\xfe end\\n"}', parent=k.get_parent())
k.session.send(k.iopub_socket, 'display_data', b'{"data": {"text/plain": "shown\\udfff"}, "metadata": {"m\\ud800": 1}}', parent=k.get_parent())
None"""

BAD_NAME = b"bad\xff.ipynb"
SHOWN_NAME = "bad\ufffd.ipynb"


def no_surrogates(value: Any) -> None:
    if isinstance(value, str):
        assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value), ascii(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            no_surrogates(k)
            no_surrogates(v)
    elif isinstance(value, list):
        for v in value:
            no_surrogates(v)


@pytest.fixture(scope="module")
def planted(kp: KernelpoolServer) -> KernelpoolServer:
    """alice's folder with the notebook above and a notebook named with a byte that is not UTF-8."""
    home = os.path.join(kp.data_dir, "users", "alice")
    owner = os.stat(home)
    for name, body in ((b"sur.ipynb", NOTEBOOK.encode()), (BAD_NAME, nbformat.writes(nbformat.v4.new_notebook()).encode())):
        path = os.path.join(os.fsencode(home), name)
        with open(path, "wb") as f:
            f.write(body)
        os.chown(path, owner.st_uid, owner.st_gid)
    return kp


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_replies_are_valid_unicode_and_the_session_lives_on(planted: KernelpoolServer, mode: str) -> None:
    kp = planted
    notebook = f"sur-{mode}.ipynb"
    home = os.path.join(kp.data_dir, "users", "alice")
    with open(os.path.join(home, notebook), "w") as f:
        f.write(NOTEBOOK)
    owner = os.stat(home)
    os.chown(os.path.join(home, notebook), owner.st_uid, owner.st_gid)
    async with mcp_client(kp.url, kp.tokens["alice"], mode=mode) as c:
        r = await c.call_tool("read_notebook", {"notebook": notebook, "response_format": "detailed"})
        assert not r.is_error, text(r)
        cells = r.structured_content["cells"]
        assert cells[0]["source"] == "print('src\ufffd')" and cells[1]["source"] == "md \ufffd end"
        assert [o.get("text") for o in cells[0]["outputs"]] == ["out\ufffd\n", "plain\ufffd"]
        assert "src\ufffd" in text(r)
        r = await c.call_tool("read_cell", {"notebook": notebook, "cell_id": "c1"})
        assert not r.is_error and "out\ufffd" in text(r), text(r)
        r = await c.call_tool("list_files", {})
        assert SHOWN_NAME in [f["path"] for f in r.structured_content["files"]], r.structured_content
        r = await c.call_tool("list_notebooks", {})
        assert SHOWN_NAME in [n["path"] for n in r.structured_content["notebooks"]]
        # resources: the notebook as JSON and markdown, one output, the list
        got = await c.read_resource(f"notebook://{notebook}")
        as_json = json.loads(got.contents[0].text)
        assert as_json["cells"][0]["metadata"] == {"tag\ufffd": "v\ufffd"}
        assert as_json["metadata"]["kernelspec"]["display_name"] == "Py\ufffd"
        got = await c.read_resource(f"notebook://{notebook}?format=markdown")
        assert "md \ufffd end" in got.contents[0].text
        got = await c.read_resource(f"output://{notebook}/c1/0")
        assert got.contents[0].text == "out\ufffd\n"
        listed = await c.list_resources()
        assert SHOWN_NAME in [res.name for res in listed.resources] and "notebook://bad%EF%BF%BD.ipynb" in [
            str(res.uri) for res in listed.resources]
        # a kernel's own messages, run in a cell whose outputs are saved
        r = await c.call_tool("use_notebook", {"notebook": notebook})
        assert not r.is_error, text(r)
        r = await c.call_tool("insert_execute_code_cell", {"notebook": notebook, "cell_index": -1, "cell_source": CRAFTED})
        assert not r.is_error and "esc\ufffd raw\ufffd end" in text(r) and "shown\ufffd" in text(r), text(r)
        r = await c.call_tool("execute_code", {"notebook": notebook, "code": CRAFTED})
        assert not r.is_error and "esc\ufffd raw\ufffd end" in text(r), text(r)
        # what ipykernel itself does with a lone surrogate: its message packer refuses it, in the kernel
        for code, said in (("print('p\\ud800')", "UnicodeEncodeError"),
                           ("display({'text/plain': 'd\\ud800'}, raw=True)", "UnicodeEncodeError")):
            r = await c.call_tool("execute_code", {"notebook": notebook, "code": code})
            assert said in text(r), text(r)
        # the session (or the sessionless client) answers the next call
        r = await c.call_tool("execute_code", {"notebook": notebook, "code": "6 * 7"})
        assert text(r) == "42"
        await c.call_tool("unuse_notebook", {"notebook": notebook})
    # what was saved: valid UTF-8 JSON, a valid notebook, the escapes kept as the file had them
    raw = Path(os.path.join(home, notebook)).read_bytes()
    saved = json.loads(raw.decode("utf-8"))
    nbformat.validate(nbformat.reads(raw.decode("utf-8"), as_version=4))
    assert "".join(saved["cells"][0]["source"]) == "print('src\ud800')" and b"src\\ud800" in raw
    assert saved["metadata"]["custom\udc00"] == 1
    outputs = saved["cells"][-1]["outputs"]
    assert "".join(outputs[0]["text"]) == "esc\ud800 raw\ud800 end\n", outputs
    assert "".join(outputs[1]["data"]["text/plain"]) == "shown\udfff", outputs
    assert "Error in message router" not in kp.log() and "audit: writing" not in kp.log()


def _events(body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an SSE (or JSON) reply, each checked as strictly as the SDK's own
    client does (pydantic refuses lone-surrogate escapes), after a strict UTF-8 decoding."""
    decoded = body.decode("utf-8")
    found = [line[5:].strip() for line in decoded.splitlines() if line.startswith("data:")] or [decoded]
    out = []
    for data in filter(None, found):
        JSONRPCResponse.model_validate_json(data)
        parsed = json.loads(data)
        no_surrogates(parsed)
        out.append(parsed)
    return out


async def test_the_wire_carries_valid_json_for_a_session(planted: KernelpoolServer) -> None:
    kp = planted
    headers = {"Authorization": f"Bearer {kp.tokens['alice']}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    async with httpx2.AsyncClient(timeout=120) as http:
        r = await http.post(kp.url, json=init, headers=headers)
        assert r.status_code == 200, r.text
        session = headers | {"mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        await http.post(kp.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        calls = [("tools/call", {"name": "read_notebook", "arguments": {"notebook": "sur.ipynb", "response_format": "detailed"}}),
                 ("tools/call", {"name": "read_cell", "arguments": {"notebook": "sur.ipynb", "cell_index": 0}}),
                 ("tools/call", {"name": "list_notebooks", "arguments": {}}),
                 ("resources/read", {"uri": "notebook://sur.ipynb"}),
                 ("resources/read", {"uri": "output://sur.ipynb/c1/1"}),
                 ("resources/list", {}),
                 ("completion/complete", {"ref": {"type": "ref/resource", "uri": "notebook://{path}{?format}"},
                                          "argument": {"name": "path", "value": "bad"}}),
                 ("tools/call", {"name": "list_files", "arguments": {}})]
        for i, (method, params) in enumerate(calls, start=2):
            r = await http.post(kp.url, json={"jsonrpc": "2.0", "id": i, "method": method, "params": params}, headers=session)
            assert r.status_code == 200, (method, r.status_code, r.content[:300])
            replies = [m for m in _events(r.content) if m.get("id") == i]
            assert len(replies) == 1 and "result" in replies[0], (method, replies)
            wire = json.dumps(replies[0]["result"], ensure_ascii=False)
            assert "\ufffd" in wire, (method, wire[:300])
            if method == "completion/complete":
                assert replies[0]["result"]["completion"]["values"] == [SHOWN_NAME]
