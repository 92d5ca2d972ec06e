"""One stream of changes to users' notebooks, for every edge that shows them as they happen.

`NotebookService` publishes `saved` after each write; the execution jobs publish `running`,
`output` (the cell's outputs grew; the job holds them, see `JobService.live_outputs`) and
`finished` for a saved cell; the web view publishes `interrupted` and `restarted` when a person
stops or restarts a kernel there (the MCP layer then tells that user's sessions). Listeners are plain functions called in the publisher's task, so
they must only note the change and return: the MCP layer's resource updates and the web view's
open pages (`kernelpool.web.live`) both start their own work elsewhere. Every change carries
its user: a listener keys by it first and never shows one user's change to another.

`watch` / `unwatch` count who wants the execution events of a user: without a watcher, a
running job publishes no `output` changes at all, so a server with no page open pays nothing.
Callers: the app (builds one and subscribes the MCP notices), the notebook and execution
services (publish), the web view (subscribes, watches).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["saved", "running", "output", "finished", "interrupted", "restarted"]


@dataclass(frozen=True, slots=True)
class Change:
    user: str
    path: str
    kind: Kind
    cell_id: str | None = None  # running, output, finished: the saved cell that runs


Listener = Callable[[Change], None]


class Changes:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._watchers: dict[str, int] = {}

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every change from now on; returns the function that stops it."""
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop

    def publish(self, change: Change) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # a listener must not turn a saved change or a run into a failure
                log.exception("change listener failed")

    def watch(self, user: str) -> None:
        self._watchers[user] = self._watchers.get(user, 0) + 1

    def unwatch(self, user: str) -> None:
        left = self._watchers.get(user, 0) - 1
        if left > 0:
            self._watchers[user] = left
        else:
            self._watchers.pop(user, None)

    def watched(self, user: str) -> bool:
        return user in self._watchers
