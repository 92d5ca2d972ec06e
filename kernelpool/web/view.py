"""The read-only web view: a signed-in person's notebooks (a list, and each one rendered and kept
live), the download of a notebook, and their activity. Kernels and the operators' page are in
`kernelpool.web.kernels`; live updates in `kernelpool.web.live`; rendering in `kernelpool.web.render`.

Every URL names its owner (`/view/<user>/...`) and every page checks it against the person
signed in in this browser: another user's name, notebook, kernel or page id is 404, the same
answer as for one that does not exist (nothing tells whether it does). Paths follow the tools'
rules (`kernelpool.notebooks.paths`) and are looked up in the signed-in person's folder only.
A signed-out browser is sent to sign in, and back. Callers: `kernelpool.web.server`.
"""

from __future__ import annotations

import asyncio
import math
import urllib.parse

import nbformat
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from kernelpool.errors import CorruptNotebook, KernelpoolError, NotebookNotFound
from kernelpool.notebooks.paths import check_notebook_path
from kernelpool.users import activity
from kernelpool.web import render
from kernelpool.web.home import HANDOFF_PATH, take_handoff
from kernelpool.web.kernels import KernelPages
from kernelpool.web.live import LIVE_CHARS
from kernelpool.web.pages import HEADERS
from kernelpool.web.viewbase import Person, ViewBase, ViewDeps, when

PAGE_SIZE = 50
PAGE_BYTES = 32 * 1024 * 1024  # HTML of one notebook page at most


def render_page(cells: list[nbformat.NotebookNode], running: set[str],
                live: dict[str, list[nbformat.NotebookNode] | None]) -> list[str]:
    """Every cell of a notebook page, up to `PAGE_BYTES` of HTML (a notebook file may hold up to
    512 MB: past the budget the page says so and offers the download)."""
    out: list[str] = []
    size = 0
    for i, c in enumerate(cells):
        html = render.cell(c, running=c.id in running, live=live.get(c.id))
        size += len(html)
        if size > PAGE_BYTES:
            out.append(f'<p class="notice" role="note">{len(cells) - i} more cells are not shown: this notebook is too '
                       'large to show whole here. Download it to see all of it.</p>')
            break
        out.append(html)
    return out


class NotebookPages(ViewBase):
    async def handoff(self, request: Request) -> Response:
        d = self.deps
        return await take_handoff(d.store, d.grants, d.browsers, d.replica, request)

    async def home(self, request: Request) -> Response:
        who = await self.person(request)
        if not isinstance(who, Person):
            return who
        return RedirectResponse(f"/view/{urllib.parse.quote(who.user)}/notebooks", status_code=303, headers=HEADERS)

    async def notebooks(self, request: Request) -> Response:
        who = await self.owner(request)
        if not isinstance(who, Person):
            return who
        sort = "name" if request.query_params.get("sort") == "name" else "changed"
        try:
            number = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            number = 1
        listing = await self.deps.notebooks.list_notebooks(who.user)
        paths: list[str] = listing.items
        changed = await self.deps.notebooks.modified(who.user, paths)
        if sort == "changed":
            paths.sort(key=lambda p: -changed.get(p, 0.0))
        pages = max(1, math.ceil(len(paths) / PAGE_SIZE))
        number = min(number, pages)
        rows = []
        for path in paths[(number - 1) * PAGE_SIZE:number * PAGE_SIZE]:
            kernel = self.deps.kernels.get(who.user, path)
            rows.append({"path": path, "changed": when(changed.get(path)),
                         "kernel": kernel.state.value if kernel is not None else "no kernel"})
        return self.show(who, "view_notebooks.html", title="Your notebooks", rows=rows, sort=sort, number=number,
                         pages=pages, total=len(paths), note=listing.note)

    async def _notebook(self, who: Person, raw: str) -> tuple[str, nbformat.NotebookNode] | Response:
        try:
            path = check_notebook_path(raw)
            return path, await self.deps.notebooks.load(who.user, path)
        except CorruptNotebook as exc:
            return self.show(who, "message.html", 422, title="Notebook not readable", text=str(exc))
        except (NotebookNotFound, KernelpoolError):
            return self.not_found(who)

    async def _owned_notebook(self, request: Request) -> tuple[Person, str, nbformat.NotebookNode] | Response:
        """The signed-in owner and the notebook the URL names (a page or a 404 otherwise): what
        `notebook` and `download` both start from."""
        who = await self.owner(request)
        if not isinstance(who, Person):
            return who
        found = await self._notebook(who, request.path_params["path"])
        if isinstance(found, Response):
            return found
        return who, *found

    async def notebook(self, request: Request) -> Response:
        found = await self._owned_notebook(request)
        if isinstance(found, Response):
            return found
        who, path, nb = found
        jobs = self.deps.jobs
        running = jobs.running_cells(who.user, path)
        live_outputs = {cid: jobs.live_outputs(who.user, path, cid, LIVE_CHARS) for cid in running}
        # in a thread: a notebook of thousands of cells must not hold up everyone else's requests
        cells = await asyncio.to_thread(render_page, list(nb.cells), running, live_outputs)
        live = self.deps.hub.track(who.user, path, nb, running)
        kernel = self.deps.kernels.get(who.user, path)
        return self.show(who, "view_notebook.html", title=path, path=path, cells=cells, page_id=live.id,
                         kernel=kernel.state.value if kernel is not None else "no kernel")

    async def download(self, request: Request) -> Response:
        found = await self._owned_notebook(request)
        if isinstance(found, Response):
            return found
        _, path, nb = found
        body = await asyncio.to_thread(nbformat.writes, nb)
        name = urllib.parse.quote(path.rsplit("/", 1)[-1])
        headers = HEADERS | {"Content-Disposition": f"attachment; filename*=UTF-8''{name}"}
        return Response(body, media_type="application/x-ipynb+json", headers=headers)

    async def events(self, request: Request) -> Response:
        who = await self.person(request)
        if not isinstance(who, Person):
            return who
        live = self.deps.hub.page(who.user, request.path_params["page"])
        if live is None:
            return self.not_found(who)
        headers = HEADERS | {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(self.deps.hub.stream(live), media_type="text/event-stream", headers=headers)

    async def activity(self, request: Request) -> Response:
        who = await self.owner(request)
        if not isinstance(who, Person):
            return who
        try:
            before = int(request.query_params["before"]) if "before" in request.query_params else None
        except ValueError:
            before = None
        rows = await activity.recent(self.deps.store, who.user, limit=PAGE_SIZE, before=before, tools_only=True)
        shown = [{"when": when(r.ts), "client": r.client or "", "tool": r.tool, "notebook": r.notebook or "",
                  "outcome": r.outcome, "ms": f"{r.duration_ms:.0f}", "detail": r.detail or ""} for r in rows]
        older = rows[-1].id if len(rows) == PAGE_SIZE else None
        return self.show(who, "view_activity.html", title="Your activity", rows=shown, older=older)


def view_routes(deps: ViewDeps) -> list[BaseRoute]:
    """The view's routes (`/view/...`); the sign-in pages and static files are `web.routes`'."""
    pages, kernels = NotebookPages(deps), KernelPages(deps)
    return [
        Route("/view", pages.home, methods=["GET"]),
        Route(HANDOFF_PATH + "/{ticket}", pages.handoff, methods=["GET"]),
        Route("/view/operators", kernels.operators, methods=["GET"]),
        Route("/view/events/{page}", pages.events, methods=["GET"]),
        Route("/view/{user}/notebooks", pages.notebooks, methods=["GET"]),
        Route("/view/{user}/notebooks/{path:path}", pages.notebook, methods=["GET"]),
        Route("/view/{user}/download/{path:path}", pages.download, methods=["GET"]),
        Route("/view/{user}/activity", pages.activity, methods=["GET"]),
        Route("/view/{user}/kernels", kernels.kernels, methods=["GET"]),
        Route("/view/{user}/kernels/{kernel}/{action}", kernels.confirm, methods=["GET"]),
        Route("/view/{user}/kernels/{kernel}/{action}", kernels.act, methods=["POST"]),
    ]
