"""Tools on files and notebooks: list_files, list_notebooks, use_notebook, unuse_notebook, read_notebook."""

from __future__ import annotations

from typing import Literal

from mcp.types import CallToolResult

from kernelpool.mcp.call import DESTRUCTIVE, EDIT, READ, Call, Tools, result
from kernelpool.mcp.cells import cell_summary
from kernelpool.mcp.content import simplify
from kernelpool.notebooks.paths import check_notebook_path

TOOLS = Tools()


@TOOLS.add("list_files", "List files and folders in your folder (or a subfolder), optionally filtered by a glob pattern; "
           "at most 500 entries (the result says when it was cut).", READ)
async def list_files(call: Call, *, path: str = "", pattern: str | None = None) -> CallToolResult:
    found = await call.services.notebooks.list_files(call.user, path, pattern=pattern)
    lines = [f"{e['type']:7} {e['size']:>10}  {e['path']}" for e in found.items] or ["(empty)"]
    if found.note:
        lines.append(f"[{found.note}]")
    return result("\n".join(lines), {"path": path, "files": found.items, "truncated": found.note is not None,
                                     "note": found.note})


@TOOLS.add("list_notebooks", "List your notebooks, with the state of each one's kernel and which is active in this session.", READ)
async def list_notebooks(call: Call) -> CallToolResult:
    entries, active, note = await call.services.workspace.notebooks(call.user, call.session_id)
    items = [{"path": e.path, "kernel": e.kernel, "active": e.active} for e in entries]
    lines = [f"{'*' if i['active'] else ' '} {i['path']}  (kernel: {i['kernel']})" for i in items] or ["(no notebooks)"]
    if note:
        lines.append(f"[{note}]")
    return result("\n".join(lines), {"notebooks": items, "active": active, "truncated": note is not None, "note": note})


@TOOLS.add("use_notebook", "Open a notebook (mode='connect') or create it (mode='create'), start its kernel, and make it "
           "this session's active notebook. `kernel` names the kernel of a new notebook (list_kernelspecs; default "
           "python3); an existing notebook opens with the kernel it records.", EDIT)
async def use_notebook(call: Call, *, notebook: str, mode: Literal["connect", "create"] = "connect",
                       kernel: str | None = None) -> CallToolResult:
    s = call.services
    opened = await s.workspace.open(call.user, call.session_id, check_notebook_path(notebook), mode, kernel)
    await s.notices.usage(call.user, "kernels", opened.kernels, s.settings.max_kernels_per_user, s.settings.near_limit_ratio)
    path, started = opened.path, opened.kernel
    if opened.active:
        note = f"{path} is now this session's active notebook"
    else:
        note = f"{path} is ready; this client has no MCP session, so pass notebook={path!r} to every tool"
    verb = "created" if mode == "create" else "connected"
    return result(f"{verb} {path} (kernel {started.id}, {started.spec}: {started.state.value}). {note}.",
                  {"notebook": path, "mode": mode, "kernel_id": started.id, "kernel": started.spec, "active": opened.active})


@TOOLS.add("unuse_notebook", "Shut down a notebook's kernel (its variables are lost; the file stays) and make it "
           "no longer this session's active notebook.", DESTRUCTIVE)
async def unuse_notebook(call: Call, *, notebook: str | None = None) -> CallToolResult:
    path = call.notebook(notebook)
    stopped = await call.services.workspace.close(call.user, call.session_id, path)
    text = f"kernel of {path} shut down" if stopped else f"{path} had no running kernel"
    return result(text, {"notebook": path, "kernel_stopped": stopped})


@TOOLS.add("read_notebook", "Read a notebook's cells: brief (index, type, id, first line) or detailed (full source and outputs).", READ)
async def read_notebook(
    call: Call, *, notebook: str | None = None, start_index: int = 0, limit: int = 20,
    response_format: Literal["brief", "detailed"] = "brief",
) -> CallToolResult:
    path = call.notebook(notebook)
    total, cells = await call.services.notebooks.cell_window(call.user, path, start_index, limit)
    max_chars = call.services.settings.max_output_chars
    items, lines = [], [f"{path}: {total} cells; showing {start_index}..{start_index + len(cells) - 1}"]
    for i, cell in enumerate(cells, start=start_index):
        item = cell_summary(i, cell)
        if response_format == "detailed":
            item["source"] = cell.source
            if cell.cell_type == "code":
                item["outputs"] = [simplify(o, max_chars) for o in cell.outputs]
            lines.append(f"--- [{i}] {cell.cell_type} id={cell.id} exec={item.get('execution_count')}\n{cell.source}")
            for o in item.get("outputs", []):
                if "text" in o:
                    lines.append(f"  > {o['text']}")
        else:
            first = cell.source.splitlines()[0] if cell.source else ""
            lines.append(f"[{i}] {cell.cell_type:8} id={cell.id}  {first[:100]}")
        items.append(item)
    return result("\n".join(lines), {"notebook": path, "total_cells": total, "start_index": start_index, "cells": items})
