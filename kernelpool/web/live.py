"""Live updates of open notebook pages, by server-sent events, from the services' change stream.

Each rendered notebook page gets a `Page`: what that page shows (each cell's mark, the order,
the running cells). The change listener (called in the agent's task, `kernelpool.notebooks.
changes`) only flags the pages of that user and notebook and wakes their streams; each page's
stream then does the work in its own task: it reloads the notebook (the service's parsed copy),
re-renders only the cells whose mark changed, and sends them with the order; for a running cell
it sends its outputs so far (`JobService.live_outputs`, bounded). A flood costs the agent one flag
per output message, and the page at most one update per `_BATCH` seconds: each update is capped
(`max_update_bytes`); past the cap the page is told to reload instead. A page's state outlives
its stream for `_KEEP` seconds, so an EventSource that reconnects gets only what it missed.
Callers: `kernelpool.web.view` (tracks pages, serves their streams), the app (close).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nbformat import NotebookNode

from kernelpool.errors import KernelpoolError
from kernelpool.executions.jobs import JobService
from kernelpool.notebooks.changes import Change, Changes
from kernelpool.notebooks.encoding import Mark, fingerprint, same
from kernelpool.notebooks.service import NotebookService
from kernelpool.web import render

# seconds a stream waits after a wake-up for more changes to come with it: at most 5 writes a
# second per page (each write to a socket on the same host cost about as much as the update itself)
_BATCH = 0.2
_HEARTBEAT = 15.0  # seconds between comments on an idle stream (proxies close silent ones)
_KEEP = 300.0  # seconds a page's state is kept after its stream ended (a reconnect resumes it)
_PAGES_PER_USER = 50  # open pages kept per user; the oldest are forgotten first
LIVE_CHARS = 64_000  # characters of a running cell's stream shown while it runs


@dataclass(eq=False)
class Page:
    id: str
    user: str
    path: str
    marks: dict[str, Mark] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    dirty: bool = False  # the notebook was saved since this page was last sent its cells
    outputs: set[str] = field(default_factory=set)  # running cells whose outputs grew since
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    streaming: bool = False
    evicted: bool = False  # dropped for a newer page of its user (`_PAGES_PER_USER`): its stream ends
    seen: float = field(default_factory=time.monotonic)


def event(name: str, data: object) -> str:
    """One SSE event; JSON data never holds a raw newline."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class LiveHub:
    def __init__(self, changes: Changes, notebooks: NotebookService, jobs: JobService, *,
                 max_update_bytes: int = 2 * 1024 * 1024) -> None:
        self._changes, self._notebooks, self._jobs = changes, notebooks, jobs
        self._max_bytes = max_update_bytes
        self._pages: dict[str, OrderedDict[str, Page]] = {}  # user -> page id -> page
        self._closing = False
        self._stop = changes.subscribe(self._on_change)

    def track(self, user: str, path: str, nb: NotebookNode, running: set[str]) -> Page:
        """A page rendered now from `nb`: later changes are sent relative to it."""
        self._expire()
        page = Page(secrets.token_urlsafe(18), user, path, running=set(running))
        page.marks = {c.id: fingerprint(c) for c in nb.cells}
        page.order = [c.id for c in nb.cells]
        pages = self._pages.setdefault(user, OrderedDict())
        pages[page.id] = page
        while len(pages) > _PAGES_PER_USER:  # the oldest other page that no stream reads, else the oldest
            others = [p for p in pages.values() if p is not page]
            oldest = next((p for p in others if not p.streaming), others[0])
            del pages[oldest.id]
            oldest.evicted = True
            oldest.wake.set()
        return page

    def page(self, user: str, page_id: str) -> Page | None:
        """The page `page_id` if it is `user`'s (another user's id is no page at all)."""
        pages = self._pages.get(user)
        return pages.get(page_id) if pages is not None else None

    def _on_change(self, change: Change) -> None:
        pages = self._pages.get(change.user)
        for page in pages.values() if pages is not None else ():
            if page.path != change.path or not page.streaming:
                continue
            if change.kind == "output" and change.cell_id is not None:
                page.outputs.add(change.cell_id)
            else:
                page.dirty = True
            page.wake.set()

    async def stream(self, page: Page) -> AsyncIterator[str]:
        """The page's event stream: `cells`, `outputs`, `reload`, `gone` events, until it goes away."""
        page.streaming, page.dirty = True, True  # whatever happened between the render and now
        self._changes.watch(page.user)
        try:
            yield "retry: 2000\n\n"
            while not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(page.wake.wait(), _HEARTBEAT)
                if self._closing:
                    break
                if page.evicted:
                    yield event("reload", {"message": "too many pages of yours are open: reload this one to go on"})
                    return
                if not page.wake.is_set():
                    yield ": idle\n\n"
                    continue
                await asyncio.sleep(_BATCH)
                page.wake.clear()
                messages = await self._updates(page)
                if messages:
                    yield "".join(messages)  # one write for the batch
                if any(m.startswith(("event: reload", "event: gone")) for m in messages):
                    return
        finally:
            page.streaming = False
            page.seen = time.monotonic()
            self._changes.unwatch(page.user)

    async def _updates(self, page: Page) -> list[str]:
        out: list[str] = []
        if page.dirty:
            page.dirty = False
            try:
                cells = await self._cells(page)
            except KernelpoolError:
                return [event("gone", {"message": "this notebook is gone (deleted or moved)"})]
            if cells is not None:
                out.append(cells)
        outputs, page.outputs = page.outputs, set()
        for cell_id in sorted(outputs):
            live = self._jobs.live_outputs(page.user, page.path, cell_id, LIVE_CHARS)
            if live is None or cell_id not in page.order:
                continue  # finished (its saved outputs come with the save), or not placed yet
            html = render.outputs(live)
            if len(html) > self._max_bytes:
                html = ('<p class="output-note">This output is too large to show while it runs: '
                        "reload the page to see more.</p>")
            out.append(event("outputs", {"id": cell_id, "html": html}))
        if sum(len(m) for m in out) > self._max_bytes:
            return [event("reload", {"message": "too much changed at once: reload the page to see more"})]
        return out

    async def _cells(self, page: Page) -> str | None:
        """The `cells` event for what changed since the page was last sent its cells, or None."""
        nb = self._notebooks.peek(page.user, page.path) or await self._notebooks.load(page.user, page.path)
        running = self._jobs.running_cells(page.user, page.path)
        order = [c.id for c in nb.cells]
        changed: dict[str, str] = {}
        for c in nb.cells:
            mark, run = fingerprint(c), c.id in running
            if same(mark, page.marks.get(c.id)) and run == (c.id in page.running):
                continue
            live = self._jobs.live_outputs(page.user, page.path, c.id, LIVE_CHARS) if run else None
            changed[c.id] = render.cell(c, running=run, live=live)
            page.marks[c.id] = mark
        for gone in set(page.marks) - set(order):
            del page.marks[gone]
        if not changed and order == page.order and running == page.running:
            return None
        # cells added at the end (what agents mostly do) need no order: the page appends new cells
        appended = order[:len(page.order)] == page.order
        page.order, page.running = order, running
        message: dict[str, object] = {"cells": [[cid, html] for cid, html in changed.items()]}
        if not appended:
            message["order"] = order
        return event("cells", message)

    def _expire(self) -> None:
        cutoff = time.monotonic() - _KEEP
        for user, pages in list(self._pages.items()):
            for key in [k for k, p in pages.items() if not p.streaming and p.seen < cutoff]:
                del pages[key]
            if not pages:
                del self._pages[user]

    def close(self) -> None:
        """End every stream (the server shuts down: uvicorn waits for open responses)."""
        self._closing = True
        self._stop()
        for pages in self._pages.values():
            for page in pages.values():
                page.wake.set()
