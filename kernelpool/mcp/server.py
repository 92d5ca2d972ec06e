"""The MCP surface: parse arguments, call a service, format the result. Nothing else lives here.

Tool names and arguments follow jupyter-mcp-server where the meaning is the same. Every tool
that touches a notebook takes `notebook`; without it the MCP session's active notebook is used,
and without either the call fails (`NoNotebook`): never a shared fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from nbformat import NotebookNode

from kernelpool.errors import InvalidArgument, KernelpoolError, NoNotebook
from kernelpool.executions.jobs import Job
from kernelpool.mcp.content import output_text, simplify, to_content
from kernelpool.mcp.resources import output_links, session_of
from kernelpool.mcp.resources import register as register_resources
from kernelpool.notebooks import service as nbops
from kernelpool.services import Services

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[CallToolResult]])

READ = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
EDIT = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
RUN = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True)

INSTRUCTIONS = """\
kernelpool runs Python code in Jupyter notebooks that belong to you alone. Each notebook has its
own kernel. Pass `notebook` (a path relative to your folder, like 'work/analysis.ipynb') to every
tool, or call use_notebook once to make a notebook the active one of this session. Cells are
addressed by `cell_index` (0-based; negative counts from the end) or by `cell_id`."""


def _result(text: str, data: dict[str, Any], extra: list[Any] | None = None) -> CallToolResult:
    content: list[Any] = [TextContent(type="text", text=text)]
    content.extend(extra or [])
    return CallToolResult(content=content, structured_content=data)


def build_mcp(services: Services, token_verifier: Any, auth: Any) -> MCPServer:
    """The MCP server with every tool registered; `services` is filled in by the app's lifespan."""
    server: MCPServer = MCPServer(
        name="kernelpool", instructions=INSTRUCTIONS, version="0.1.0",
        token_verifier=token_verifier, auth=auth,
        # no subscriptions/listen (2026-07-28): its bus is server-wide, not per user, and kernelpool
        # publishes nothing on it; sessions subscribe with resources/subscribe (kernelpool/mcp/notices.py)
        subscriptions=False,
    )
    s = services

    # issue 12: resources, completion, logging/setLevel on the low-level server (MCPServer has no
    # per-user resource list), and every request's session handle for notices
    async def attach_session(ctx: Any, call_next: Any) -> Any:
        attach(ctx)
        return await call_next(ctx)

    def attach(ctx: Any) -> None:
        token, sid = get_access_token(), session_of(ctx)
        if token is not None and sid is not None:
            s.notices.attach(token.client_id, sid, ctx.session)

    server.middleware.append(attach_session)
    register_resources(server._lowlevel_server, s, attach)

    def user_name() -> str:
        token = get_access_token()
        if token is None:  # the SDK's auth middleware runs first; this is a wiring bug
            raise ToolError("not authenticated")
        return token.client_id

    def session_id(ctx: Context) -> str | None:
        headers = ctx.headers
        return headers.get("mcp-session-id") if headers else None

    def resolve(ctx: Context, user: str, notebook: str | None) -> str:
        if notebook is not None:
            return nbops.check_notebook_path(notebook)
        active = s.sessions.active_notebook(user, session_id(ctx))
        if active is None:
            raise NoNotebook()
        return active

    def tool(name: str, description: str, annotations: ToolAnnotations) -> Callable[[F], F]:
        """Register a tool with audit, metrics and the one mapping of our errors to tool errors."""

        def wrap(fn: F) -> F:
            @functools.wraps(fn)
            async def run(*args: Any, **kwargs: Any) -> CallToolResult:
                start = time.monotonic()
                token = get_access_token()
                user = token.client_id if token else None
                outcome, detail = "ok", None
                try:
                    if user is not None and not s.users.known(user):
                        await s.users.load()  # added by the CLI since we last looked
                    result = await fn(*args, **kwargs)
                    if result.is_error:
                        outcome = "error"
                    return result
                except KernelpoolError as exc:
                    outcome, detail = "refused", str(exc)
                    raise ToolError(str(exc)) from exc
                except ToolError as exc:
                    outcome, detail = "refused", str(exc)
                    raise
                except Exception as exc:
                    outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
                    log.exception("tool %s failed", name)
                    raise ToolError(f"internal error in {name}: {type(exc).__name__}: {exc}") from exc
                finally:
                    duration = (time.monotonic() - start) * 1000
                    s.metrics.tool_calls.labels(name, outcome).inc()
                    notebook = kwargs.get("notebook")
                    try:
                        await s.store.audit(user, name, notebook if isinstance(notebook, str) else None,
                                            outcome, duration, detail)
                    except Exception as exc:  # an audit write must not turn a result into a failure
                        log.warning("audit write failed: %s", exc)

            server.tool(name=name, description=description, annotations=annotations)(run)
            return fn

        return wrap

    # ---- files and notebooks -------------------------------------------------------------

    @tool("list_files", "List files and folders in your folder (or a subfolder), optionally filtered by a glob pattern.", READ)
    async def list_files(path: str = "", pattern: str | None = None) -> CallToolResult:
        user = user_name()
        entries = await s.notebooks.list_files(user, path, pattern)
        lines = [f"{e['type']:7} {e['size']:>10}  {e['path']}" for e in entries] or ["(empty)"]
        return _result("\n".join(lines), {"path": path, "files": entries})

    @tool("list_notebooks", "List your notebooks, with the state of each one's kernel and which is active in this session.", READ)
    async def list_notebooks(ctx: Context) -> CallToolResult:
        user = user_name()
        active = s.sessions.active_notebook(user, session_id(ctx))
        items = []
        for path in await s.notebooks.list_notebooks(user):
            kernel = s.kernels.get(user, path)
            items.append({"path": path, "kernel": kernel.state.value if kernel else "none", "active": path == active})
        lines = [f"{'*' if i['active'] else ' '} {i['path']}  (kernel: {i['kernel']})" for i in items] or ["(no notebooks)"]
        return _result("\n".join(lines), {"notebooks": items, "active": active})

    @tool("use_notebook", "Open a notebook (mode='connect') or create it (mode='create'), start its kernel, and make it "
          "this session's active notebook.", EDIT)
    async def use_notebook(notebook: str, ctx: Context, mode: Literal["connect", "create"] = "connect") -> CallToolResult:
        user = user_name()
        path = nbops.check_notebook_path(notebook)
        if mode == "create":
            await s.notebooks.create(user, path)
        else:
            await s.notebooks.load(user, path)  # exists and is a valid notebook
        kernel = await s.kernels.acquire(await s.users.get(user), path)
        await s.notices.usage(user, "kernels", len(s.kernels.of_user(user)), s.settings.max_kernels_per_user,
                              s.settings.near_limit_ratio)
        sid = session_id(ctx)
        # only for a session id the server issued to this user: a made-up one gets no context
        active = sid is not None and s.sessions.set_notebook(user, sid, path)
        if active:
            note = f"{path} is now this session's active notebook"
        else:
            note = f"{path} is ready; this client has no MCP session, so pass notebook={path!r} to every tool"
        verb = "created" if mode == "create" else "connected"
        return _result(f"{verb} {path} (kernel {kernel.id}: {kernel.state.value}). {note}.",
                       {"notebook": path, "mode": mode, "kernel_id": kernel.id, "active": active})

    @tool("unuse_notebook", "Shut down a notebook's kernel (its variables are lost; the file stays) and make it "
          "no longer this session's active notebook.", DESTRUCTIVE)
    async def unuse_notebook(ctx: Context, notebook: str | None = None) -> CallToolResult:
        user = user_name()
        path = resolve(ctx, user, notebook)
        stopped = await s.kernels.shutdown(user, path)
        sid = session_id(ctx)
        if sid is not None and s.sessions.active_notebook(user, sid) == path:
            s.sessions.set_notebook(user, sid, None)
        text = f"kernel of {path} shut down" if stopped else f"{path} had no running kernel"
        return _result(text, {"notebook": path, "kernel_stopped": stopped})

    @tool("read_notebook", "Read a notebook's cells: brief (index, type, id, first line) or detailed (full source and outputs).", READ)
    async def read_notebook(
        ctx: Context, notebook: str | None = None, start_index: int = 0, limit: int = 20,
        response_format: Literal["brief", "detailed"] = "brief",
    ) -> CallToolResult:
        user = user_name()
        path = resolve(ctx, user, notebook)
        if start_index < 0:
            raise InvalidArgument("start_index", "must be 0 or more")
        if limit < 1:
            raise InvalidArgument("limit", "must be 1 or more")
        nb = await s.notebooks.load(user, path)
        cells = nb.cells[start_index:start_index + limit]
        items, lines = [], [f"{path}: {len(nb.cells)} cells; showing {start_index}..{start_index + len(cells) - 1}"]
        for i, cell in enumerate(cells, start=start_index):
            item = _cell_summary(i, cell)
            if response_format == "detailed":
                item["source"] = cell.source
                if cell.cell_type == "code":
                    item["outputs"] = [simplify(o, s.settings.max_output_chars) for o in cell.outputs]
                lines.append(f"--- [{i}] {cell.cell_type} id={cell.id} exec={item.get('execution_count')}\n{cell.source}")
                for o in item.get("outputs", []):
                    if "text" in o:
                        lines.append(f"  > {o['text']}")
            else:
                first = cell.source.splitlines()[0] if cell.source else ""
                lines.append(f"[{i}] {cell.cell_type:8} id={cell.id}  {first[:100]}")
            items.append(item)
        return _result("\n".join(lines), {"notebook": path, "total_cells": len(nb.cells), "start_index": start_index, "cells": items})

    async def load_cell(
        ctx: Context, notebook: str | None, cell_index: int | None, cell_id: str | None,
    ) -> tuple[str, str, int, NotebookNode]:
        """The cell named by index or id, read-only: (user, path, index, cell)."""
        user = user_name()
        path = resolve(ctx, user, notebook)
        nb = await s.notebooks.load(user, path)
        i = nbops.cell_position(nb, path, cell_index, cell_id)
        return user, path, i, nb.cells[i]

    @tool("read_cell", "Read one cell (by cell_index or cell_id): its source and, optionally, its outputs. "
          "For output too long for one reply, pass output_offset (0, then each reply's next_offset) to page "
          "through the outputs' text, max_chars at a time.", READ)
    async def read_cell(
        ctx: Context, cell_index: int | None = None, cell_id: str | None = None, notebook: str | None = None,
        include_outputs: bool = True, output_offset: int | None = None, max_chars: int | None = None,
    ) -> CallToolResult:
        _, path, i, cell = await load_cell(ctx, notebook, cell_index, cell_id)
        data = _cell_summary(i, cell) | {"notebook": path, "source": cell.source}
        if output_offset is not None:
            if output_offset < 0:
                raise InvalidArgument("output_offset", "must be 0 or more")
            size = s.settings.max_output_chars if max_chars is None else max_chars
            if not 1 <= size <= s.settings.max_output_chars:
                raise InvalidArgument("max_chars", f"use 1..{s.settings.max_output_chars}")
            whole = "".join(output_text(o) or "" for o in cell.get("outputs", []))
            page = whole[output_offset:output_offset + size]
            end = output_offset + len(page)
            data |= {"output_text": page, "output_offset": output_offset, "total_chars": len(whole),
                     "next_offset": end if end < len(whole) else None}
            return _result(page, data)
        extra: list[Any] = []
        if include_outputs and cell.cell_type == "code":
            data["outputs"] = [simplify(o, s.settings.max_output_chars) for o in cell.outputs]
            extra = [*to_content(cell.outputs, s.settings.max_output_chars, s.settings.max_image_bytes)]
            extra += output_links(path, cell.id, cell.outputs, s.settings.max_output_chars, s.settings.max_image_bytes)
        return _result(f"[{i}] {cell.cell_type} id={cell.id}\n{cell.source}", data, extra)

    @tool("insert_cell", "Insert a cell at cell_index (-1 appends). cell_type: code, markdown or raw.", EDIT)
    async def insert_cell(
        ctx: Context, cell_index: int, cell_type: Literal["code", "markdown", "raw"], cell_source: str,
        notebook: str | None = None,
    ) -> CallToolResult:
        user = user_name()
        path = resolve(ctx, user, notebook)
        pos, cell = await s.notebooks.edit(user, path, lambda nb: nbops.insert_cell(nb, cell_index, cell_type, cell_source))
        return _result(f"inserted {cell_type} cell at index {pos} (id {cell.id})",
                       {"notebook": path, "cell_index": pos, "cell_id": cell.id})

    async def edit_cell(
        ctx: Context, notebook: str | None, cell_index: int | None, cell_id: str | None,
        apply: Callable[[NotebookNode, int], Any],
    ) -> tuple[str, int, str, Any]:
        """Change the cell named by index or id under the notebook's lock; (path, index, id, what apply returned)."""
        user = user_name()
        path = resolve(ctx, user, notebook)

        def change(nb: NotebookNode) -> tuple[int, str, Any]:
            i = nbops.cell_position(nb, path, cell_index, cell_id)
            return i, nb.cells[i].id, apply(nb, i)

        i, cid, out = await s.notebooks.edit(user, path, change)
        return path, i, cid, out

    @tool("overwrite_cell_source", "Replace a cell's whole source.", EDIT)
    async def overwrite_cell_source(
        ctx: Context, cell_source: str, cell_index: int | None = None, cell_id: str | None = None,
        notebook: str | None = None,
    ) -> CallToolResult:
        path, i, cid, _ = await edit_cell(ctx, notebook, cell_index, cell_id,
                                          lambda nb, i: nbops.set_source(nb.cells[i], cell_source))
        return _result(f"overwrote cell {i} (id {cid})", {"notebook": path, "cell_index": i, "cell_id": cid})

    @tool("edit_cell_source", "Replace old_string by new_string in a cell's source (old_string must be unique unless replace_all).", EDIT)
    async def edit_cell_source(
        ctx: Context, old_string: str, new_string: str, replace_all: bool = False, cell_index: int | None = None,
        cell_id: str | None = None, notebook: str | None = None,
    ) -> CallToolResult:
        path, i, cid, n = await edit_cell(
            ctx, notebook, cell_index, cell_id,
            lambda nb, i: nbops.edit_source(nb.cells[i], old_string, new_string, replace_all))
        return _result(f"replaced {n} occurrence(s) in cell {i} (id {cid})",
                       {"notebook": path, "cell_index": i, "cell_id": cid, "replacements": n})

    @tool("delete_cell", "Delete a cell.", DESTRUCTIVE)
    async def delete_cell(
        ctx: Context, cell_index: int | None = None, cell_id: str | None = None, notebook: str | None = None,
    ) -> CallToolResult:
        path, i, cid, cell = await edit_cell(ctx, notebook, cell_index, cell_id, lambda nb, i: nb.cells.pop(i))
        return _result(f"deleted {cell.cell_type} cell {i} (id {cid})",
                       {"notebook": path, "cell_index": i, "cell_id": cid, "source": cell.source})

    @tool("move_cell", "Move a cell to new_index.", EDIT)
    async def move_cell(
        ctx: Context, new_index: int, cell_index: int | None = None, cell_id: str | None = None,
        notebook: str | None = None,
    ) -> CallToolResult:
        path, i, cid, j = await edit_cell(ctx, notebook, cell_index, cell_id,
                                          lambda nb, i: nbops.move_cell(nb, i, new_index))
        return _result(f"moved cell {cid} from {i} to {j}", {"notebook": path, "from": i, "to": j, "cell_id": cid})

    @tool("clear_cell_output", "Clear a code cell's outputs and execution count.", EDIT)
    async def clear_cell_output(
        ctx: Context, cell_index: int | None = None, cell_id: str | None = None, notebook: str | None = None,
    ) -> CallToolResult:
        path, i, cid, _ = await edit_cell(ctx, notebook, cell_index, cell_id,
                                          lambda nb, i: nbops.clear_outputs(nb.cells[i]))
        return _result(f"cleared outputs of cell {i} (id {cid})", {"notebook": path, "cell_index": i, "cell_id": cid})

    # ---- execution ---------------------------------------------------------------------

    async def run(ctx: Context, job: Job) -> CallToolResult:
        if job.background:
            return _result(
                f"started execution {job.id} in {job.notebook}; fetch its result with "
                f"get_execution(execution_id={job.id!r})",
                {"notebook": job.notebook, "execution_id": job.id, "status": "running", "cell_id": job.cell_id},
            )

        async def progress(elapsed: float, message: str) -> None:
            try:
                await ctx.report_progress(elapsed, None, message)
            except Exception as exc:  # a client that went away must not stop the execution
                log.debug("progress not sent: %s", exc)

        await s.jobs.wait(job, progress)
        result = job_result(job)
        await tell_about(ctx, job, result)
        return result

    async def tell_about(ctx: Context, job: Job, result: CallToolResult) -> None:
        """Log messages about one finished call, on the call's own stream (kernelpool/mcp/notices.py)."""
        r = job.result
        if r is None:
            return
        where = {"notebook": job.notebook, "execution_id": job.id}
        said: list[tuple[Any, str]] = []
        if r.status == "died":
            said.append(("error", f"the kernel of {job.notebook} died: {r.message}; the next call starts a fresh one"))
        elif r.status == "timeout":
            said.append(("warning", f"an execution in {job.notebook} hit its timeout: {r.message}"))
        links = [b for b in result.content if b.type == "resource_link"]
        if links or any(o.get("truncated") for o in (result.structured_content or {}).get("outputs", [])):
            said.append(("warning", f"output of the execution in {job.notebook} was truncated in this reply"
                         + (f"; the whole of it: {', '.join(link.uri for link in links)}" if links else
                            "; read_cell pages through it")))
        rc = ctx.request_context
        if rc.request_id is None:
            return
        for level, text in said:
            await s.notices.to_call(rc.session, rc.request_id, job.user, session_id(ctx), level, text, where)
        if r.status == "died":
            await s.notices.to_user(job.user, "error", said[0][1], where, skip_session=session_id(ctx))

    def job_result(job: Job) -> CallToolResult:
        if job.error is not None:
            raise ToolError(job.error)
        base: dict[str, Any] = {"notebook": job.notebook, "execution_id": job.id}
        if job.cell_id is not None:
            base |= {"cell_id": job.cell_id, "cell_index": job.saved_index, "saved": job.saved_index is not None}
        result = job.result
        if result is None:  # still running
            elapsed = time.time() - job.started_at
            return _result(f"execution {job.id} is still running ({elapsed:.0f} s so far)",
                           base | {"status": "running", "elapsed_s": round(elapsed, 3)})
        st = s.settings
        content = to_content(result.outputs, st.max_output_chars, st.max_image_bytes)
        head = []
        if result.message:
            head.append(TextContent(type="text", text=f"[{result.status}] {result.message}"))
        if not content and not head:
            content = [TextContent(type="text", text="[no output]")]
        data = base | {
            "status": result.status, "execution_count": result.execution_count,
            "outputs": [simplify(o, st.max_output_chars) for o in result.outputs],
            "duration_ms": round(result.duration * 1000, 3),
        }
        if result.message:
            data["message"] = result.message
        if job.save_error is not None:
            data["save_error"] = job.save_error
            head.append(TextContent(type="text", text=f"[not saved in the notebook] {job.save_error}"))
        blocks: list[Any] = [*head, *content]
        if job.cell_id is not None and job.saved_index is not None:
            blocks += output_links(job.notebook, job.cell_id, result.outputs, st.max_output_chars, st.max_image_bytes)
        return CallToolResult(content=blocks, structured_content=data, is_error=result.status == "died")

    @tool("execute_cell", "Run a code cell in its notebook's kernel; its outputs are saved in the notebook and returned. "
          "background=true returns an execution_id at once (see get_execution).", RUN)
    async def execute_cell(
        ctx: Context, cell_index: int | None = None, cell_id: str | None = None, notebook: str | None = None,
        timeout: float | None = None, background: bool = False,
    ) -> CallToolResult:
        user, path, i, cell = await load_cell(ctx, notebook, cell_index, cell_id)
        if cell.cell_type != "code":
            raise InvalidArgument("cell", f"cell {i} is a {cell.cell_type} cell; only code cells run")
        return await run(ctx, s.jobs.start(user, path, cell.source, timeout, cell_id=cell.id, background=background))

    @tool("insert_execute_code_cell", "Insert a code cell at cell_index (-1 appends), run it, save and return its outputs. "
          "background=true returns an execution_id at once (see get_execution).", RUN)
    async def insert_execute_code_cell(
        ctx: Context, cell_index: int, cell_source: str, notebook: str | None = None, timeout: float | None = None,
        background: bool = False,
    ) -> CallToolResult:
        user = user_name()
        path = resolve(ctx, user, notebook)
        s.jobs.timeout_of(timeout)  # a bad timeout must change nothing, so check it before inserting
        _, cell = await s.notebooks.edit(user, path, lambda nb: nbops.insert_cell(nb, cell_index, "code", cell_source))
        return await run(ctx, s.jobs.start(user, path, cell_source, timeout, cell_id=cell.id, background=background))

    @tool("execute_code", "Run code in a notebook's kernel without adding it to the notebook (for inspection, "
          "installs, quick checks).", RUN)
    async def execute_code(
        ctx: Context, code: str, notebook: str | None = None, timeout: float | None = None, background: bool = False,
    ) -> CallToolResult:
        user = user_name()
        path = resolve(ctx, user, notebook)
        if not await s.notebooks.exists(user, path):
            await s.notebooks.load(user, path)  # raises the precise error: not found, or refused
        return await run(ctx, s.jobs.start(user, path, code, timeout, store_history=False, background=background))

    @tool("get_execution", "The status, and when finished the outputs, of an execution started with background=true; "
          "wait (seconds) waits for it to finish first.", READ)
    async def get_execution(ctx: Context, execution_id: str, wait: float = 0) -> CallToolResult:
        user = user_name()
        job = s.jobs.get(user, execution_id)
        if wait < 0 or wait > 600:
            raise InvalidArgument("wait", "use 0 to 600 seconds")
        if wait and job.task is not None and not job.done:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.task), wait)
        return job_result(job)

    @tool("cancel_execution", "Interrupt a running execution (its outputs so far are saved).", EDIT)
    async def cancel_execution(ctx: Context, execution_id: str) -> CallToolResult:
        user = user_name()
        job = s.jobs.get(user, execution_id)
        running = not job.done
        if running:
            await s.jobs.cancel(job)
        return _result(f"execution {job.id} " + ("interrupted" if running else "had already finished"),
                       {"execution_id": job.id, "interrupted": running})

    # ---- kernels -----------------------------------------------------------------------

    @tool("list_kernels", "List your running kernels: notebook, state, start time, executions.", READ)
    async def list_kernels() -> CallToolResult:
        user = user_name()
        items = [{
            "kernel_id": k.id, "notebook": k.notebook, "state": k.state.value, "pid": k.pid,
            "started_at": k.started_at, "executions": k.executions,
        } for k in s.kernels.of_user(user)]
        lines = [f"{k['kernel_id']}  {k['state']:8} {k['notebook']}  executions={k['executions']}" for k in items]
        return _result("\n".join(lines) or "(no kernels)", {"kernels": items, "warm": len(s.kernels.pooled(user))})

    @tool("restart_notebook", "Restart a notebook's kernel: a fresh kernel, all variables lost; the file stays.", DESTRUCTIVE)
    async def restart_notebook(ctx: Context, notebook: str | None = None) -> CallToolResult:
        user = user_name()
        path = resolve(ctx, user, notebook)
        await s.notebooks.load(user, path)
        kernel = await s.kernels.restart(await s.users.get(user), path)
        await s.notices.to_user(user, "notice", f"the kernel of {path} was restarted (restart_notebook): its variables are gone",
                                {"notebook": path, "kernel_id": kernel.id})
        return _result(f"restarted the kernel of {path} (kernel {kernel.id})", {"notebook": path, "kernel_id": kernel.id})

    @tool("interrupt_kernel", "Interrupt what a notebook's kernel is running (like Ctrl-C).", EDIT)
    async def interrupt_kernel(ctx: Context, notebook: str | None = None) -> CallToolResult:
        user = user_name()
        path = resolve(ctx, user, notebook)
        kernel = s.kernels.get(user, path)
        if kernel is None:
            return _result(f"{path} has no running kernel", {"notebook": path, "interrupted": False})
        await s.kernels.interrupt(kernel)
        return _result(f"interrupted the kernel of {path}", {"notebook": path, "interrupted": True})

    return server


def _cell_summary(i: int, cell: NotebookNode) -> dict[str, Any]:
    item: dict[str, Any] = {"index": i, "id": cell.get("id"), "cell_type": cell.cell_type}
    if cell.cell_type == "code":
        item["execution_count"] = cell.get("execution_count")
    return item

