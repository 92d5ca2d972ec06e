"""The web view's kernel pages: a person's kernels with their state, memory against its limit,
CPU, uptime and idle time; interrupt and restart (the view's only actions: each asks for a
confirmation on a page of its own, needs the browser's CSRF token, and is written to the audit
log); and the operators' page (users with the admin flag): every user's kernels, sessions,
memory against limits and recent failures, and no notebook content or path of anyone.
Callers: `kernelpool.web.server`.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from kernelpool.errors import KernelpoolError, fmt_bytes
from kernelpool.kernels.kernel import Kernel
from kernelpool.notebooks.changes import Change
from kernelpool.users import activity
from kernelpool.web.pages import message
from kernelpool.web.view import Person, ViewBase, span

ACTIONS = {"interrupt": "Interrupt", "restart": "Restart"}
_WHY = {
    "interrupt": "This stops the cell the kernel is running now, as Ctrl-C would. Its variables stay.",
    "restart": "This stops the kernel and starts a fresh one: every variable in it is lost. The notebook file stays.",
}
FAILURE_WINDOW = 24 * 3600.0


def _usage(kernel: Kernel) -> dict[str, Any]:
    """What a kernel uses, read from its cgroup (else its process): runs in a thread."""
    memory: int | None = None
    cpu: float | None = None
    if kernel.cgroup is not None:
        memory, cpu = kernel.cgroup.memory_current(), kernel.cgroup.cpu_usage_seconds()
    if memory is None or cpu is None:
        rss, seconds = kernel.process_usage()
        memory, cpu = memory if memory is not None else rss, cpu if cpu is not None else seconds
    limit = kernel.memory_limit
    return {
        "id": kernel.id, "notebook": kernel.notebook or "", "state": kernel.state.value,
        "memory": fmt_bytes(memory) if memory else "unknown",
        "limit": fmt_bytes(limit) if limit else "no limit",
        "percent": round(100 * memory / limit) if memory and limit else None,
        "cpu": f"{cpu:.1f} s", "uptime": span(time.time() - kernel.started_at),
        "idle": span(time.monotonic() - kernel.last_used) if kernel.state.value == "idle" else "",
        "executions": kernel.executions,
    }


class KernelPages(ViewBase):
    def _kernel(self, who: Person, kernel_id: str) -> Kernel | None:
        return next((k for k in self.deps.kernels.of_user(who.user) if k.id == kernel_id), None)

    async def kernels(self, request: Request) -> Response:
        who = await self.owner(request)
        if not isinstance(who, Person):
            return who
        kernels = self.deps.kernels.of_user(who.user)
        rows = await asyncio.to_thread(lambda: [_usage(k) for k in kernels])
        done = request.query_params.get("done")
        return self.show(who, "view_kernels.html", title="Your kernels", rows=rows,
                         done=ACTIONS.get(done or ""), notebook=request.query_params.get("notebook", ""))

    async def confirm(self, request: Request) -> Response:
        who = await self.owner(request)
        if not isinstance(who, Person):
            return who
        action = request.path_params["action"]
        kernel = self._kernel(who, request.path_params["kernel"])
        if kernel is None or action not in ACTIONS:
            return self.not_found(who)
        return self.show(who, "view_confirm.html", title=f"{ACTIONS[action]} the kernel of {kernel.notebook}?",
                         action=action, label=ACTIONS[action], why=_WHY[action], kernel=kernel.id,
                         notebook=kernel.notebook, csrf=who.browser.csrf)

    async def act(self, request: Request) -> Response:
        who = await self.owner(request)
        if not isinstance(who, Person):
            return who
        form = dict(await request.form())
        if not self.deps.browsers.csrf_ok(who.browser, form.get("csrf")):
            response = message("Form expired", "This form was not sent from this page of kernelpool, or it has "
                               "expired. Go back, reload the page and try again.", 403)
            self.deps.browsers.set_cookie(response, who.cookie)
            return response
        action = request.path_params["action"]
        kernel = self._kernel(who, request.path_params["kernel"])
        if kernel is None or action not in ACTIONS or kernel.notebook is None:
            return self.not_found(who)
        if form.get("confirm") != "yes":
            return self.show(who, "message.html", 400, title="Not confirmed", text="Nothing was done.")
        notebook, start, outcome, detail = kernel.notebook, time.monotonic(), "ok", f"kernel {kernel.id}"
        try:
            if action == "interrupt":
                await self.deps.kernels.interrupt(kernel)
            else:
                await self.deps.kernels.restart(await self.deps.users.get(who.user), notebook)
        except KernelpoolError as exc:
            outcome, detail = "refused", f"kernel {kernel.id}: {exc}"
        finally:
            await self.deps.store.audit(who.user, f"view.{action}", notebook, outcome,
                                        (time.monotonic() - start) * 1000, detail, client="web view")
        if outcome != "ok":
            return self.show(who, "message.html", 409, title=f"{ACTIONS[action]} failed", text=detail)
        self.deps.notebooks.changes.publish(Change(who.user, notebook, "interrupted" if action == "interrupt" else "restarted"))
        target = f"/view/{urllib.parse.quote(who.user)}/kernels?done={action}&notebook={urllib.parse.quote(notebook)}"
        return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})

    async def operators(self, request: Request) -> Response:
        who = await self.person(request)
        if not isinstance(who, Person):
            return who
        if not who.admin:
            return self.not_found(who)
        deps = self.deps
        usage = await asyncio.to_thread(deps.kernels.usage)
        failures = await activity.failures(deps.store, time.time() - FAILURE_WINDOW)
        rows = []
        for row in await deps.store.list_users():
            user = await deps.users.get(row.name)
            memory, cpu = usage.get(row.name, (None, None))
            limit = user.user_limits.memory_bytes
            failed, last = failures.get(row.name, (0, None))
            rows.append({
                "name": row.name, "admin": row.admin, "kernels": deps.kernels.count(row.name),
                "warm": len(deps.kernels.pooled(row.name)), "sessions": deps.sessions.open_count(row.name),
                "memory": fmt_bytes(memory) if memory else "0 B", "limit": fmt_bytes(limit) if limit else "no limit",
                "percent": round(100 * memory / limit) if memory and limit else None,
                "cpu": f"{cpu:.1f} s" if cpu is not None else "", "failures": failed, "last_failure": last or "",
            })
        return self.show(who, "view_operators.html", title="All users", rows=rows,
                         kernels=len(deps.kernels.all()), warm=len(deps.kernels.pooled()))

