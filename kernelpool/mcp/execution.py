"""Tools that run code: execute_cell, insert_execute_code_cell, execute_code, get_execution,
cancel_execution; and how a run is reported: its progress, its result, log messages about it."""

from __future__ import annotations

import logging
import time
from typing import Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent

from kernelpool.executions.execute import Progress
from kernelpool.executions.jobs import Job
from kernelpool.mcp.call import EDIT, READ, RUN, Call, Tools, result
from kernelpool.mcp.content import simplify, to_content
from kernelpool.mcp.resources import output_links
from kernelpool.mcp.wire import clean_text

log = logging.getLogger(__name__)

TOOLS = Tools()
_BACKGROUND = "background=true returns an execution_id at once (see get_execution)."


@TOOLS.add("execute_cell", "Run a code cell in its notebook's kernel; its outputs are saved in the notebook and "
           "returned. " + _BACKGROUND, RUN)
async def execute_cell(
    call: Call, *, cell_index: int | None = None, cell_id: str | None = None, notebook: str | None = None,
    timeout: float | None = None, background: bool = False,
) -> CallToolResult:
    return await _report(call, await call.services.executions.run_cell(
        call.user, call.notebook(notebook), cell_index=cell_index, cell_id=cell_id, timeout=timeout,
        background=background, progress=_progress(call.ctx)))


@TOOLS.add("insert_execute_code_cell", "Insert a code cell at cell_index (-1 appends), run it, save and return its "
           "outputs. " + _BACKGROUND, RUN)
async def insert_execute_code_cell(
    call: Call, *, cell_index: int, cell_source: str, notebook: str | None = None, timeout: float | None = None,
    background: bool = False,
) -> CallToolResult:
    return await _report(call, await call.services.executions.run_new_cell(
        call.user, call.notebook(notebook), cell_index, cell_source, timeout=timeout, background=background,
        progress=_progress(call.ctx)))


@TOOLS.add("execute_code", "Run code in a notebook's kernel without adding it to the notebook (for inspection, "
           "installs, quick checks).", RUN)
async def execute_code(
    call: Call, *, code: str, notebook: str | None = None, timeout: float | None = None, background: bool = False,
) -> CallToolResult:
    return await _report(call, await call.services.executions.run_code(
        call.user, call.notebook(notebook), code, timeout=timeout, background=background,
        progress=_progress(call.ctx)))


@TOOLS.add("get_execution", "The status, and when finished the outputs, of an execution started with background=true; "
           "wait (seconds) waits for it to finish first.", READ)
async def get_execution(call: Call, *, execution_id: str, wait: float = 0) -> CallToolResult:
    job = await call.services.executions.result(call.user, execution_id, wait=wait)
    return job_result(call, job)


@TOOLS.add("cancel_execution", "Interrupt a running execution (its outputs so far are saved).", EDIT)
async def cancel_execution(call: Call, *, execution_id: str) -> CallToolResult:
    job, running = await call.services.executions.cancel(call.user, execution_id)
    return result(f"execution {job.id} " + ("interrupted" if running else "had already finished"),
                  {"execution_id": job.id, "interrupted": running})


def _progress(ctx: Context) -> Progress:
    async def progress(elapsed: float, message: str) -> None:
        try:
            await ctx.report_progress(elapsed, None, clean_text(message))  # notifications pass no middleware
        except Exception as exc:  # a client that went away must not stop the execution
            log.debug("progress not sent: %s", exc)

    return progress


async def _report(call: Call, job: Job) -> CallToolResult:
    if job.background:
        return result(
            f"started execution {job.id} in {job.path}; fetch its result with "
            f"get_execution(execution_id={job.id!r})",
            {"notebook": job.path, "execution_id": job.id, "status": "running", "cell_id": job.cell_id},
        )
    reply = job_result(call, job)
    await _tell_about(call, job, reply)
    return reply


def job_result(call: Call, job: Job) -> CallToolResult:
    """A job as a tool result: still running, its error, or its outputs (saved ones linked when large)."""
    if job.error is not None:
        raise ToolError(job.error)
    base: dict[str, Any] = {"notebook": job.path, "execution_id": job.id}
    if job.cell_id is not None:
        base |= {"cell_id": job.cell_id, "cell_index": job.saved_index, "saved": job.saved_index is not None}
    run = job.result
    if run is None:  # still running
        elapsed = time.time() - job.started_at
        return result(f"execution {job.id} is still running ({elapsed:.0f} s so far)",
                      base | {"status": "running", "elapsed_s": round(elapsed, 3)})
    st = call.services.settings
    content = to_content(run.outputs, st.max_output_chars, st.max_image_bytes)
    head = []
    if run.message:
        head.append(TextContent(type="text", text=f"[{run.status}] {run.message}"))
    if not content and not head:
        content = [TextContent(type="text", text="[no output]")]
    data = base | {
        "status": run.status, "execution_count": run.execution_count,
        "outputs": [simplify(o, st.max_output_chars) for o in run.outputs],
        "duration_ms": round(run.duration * 1000, 3),
    }
    if run.message:
        data["message"] = run.message
    if job.save_error is not None:
        data["save_error"] = job.save_error
        head.append(TextContent(type="text", text=f"[not saved in the notebook] {job.save_error}"))
    blocks: list[Any] = [*head, *content]
    if job.cell_id is not None and job.saved_index is not None:
        blocks += output_links(job.path, job.cell_id, run.outputs, st.max_output_chars, st.max_image_bytes)
    return CallToolResult(content=blocks, structured_content=data, is_error=run.status == "died")


async def _tell_about(call: Call, job: Job, reply: CallToolResult) -> None:
    """Log messages about one finished call, on the call's own stream (kernelpool/mcp/notices.py)."""
    r = job.result
    if r is None:
        return
    where = {"notebook": job.path, "execution_id": job.id}
    said: list[tuple[Any, str]] = []
    if r.status == "died":
        said.append(("error", f"the kernel of {job.path} died: {r.message}; the next call starts a fresh one"))
    elif r.status == "timeout":
        said.append(("warning", f"an execution in {job.path} hit its timeout: {r.message}"))
    links = [b for b in reply.content if b.type == "resource_link"]
    if links or any(o.get("truncated") for o in (reply.structured_content or {}).get("outputs", [])):
        said.append(("warning", f"output of the execution in {job.path} was truncated in this reply"
                     + (f"; the whole of it: {', '.join(link.uri for link in links)}" if links else
                        "; read_cell pages through it")))
    rc = call.ctx.request_context
    if rc.request_id is None:
        return
    notices, sid = call.services.notices, call.session_id
    for level, text in said:
        await notices.to_call(rc.session, rc.request_id, job.user, sid, level, text, where)
    if r.status == "died":
        await notices.to_user(job.user, "error", said[0][1], where, skip_session=sid)
