"""Tools on kernels: list_kernelspecs, list_kernels, restart_notebook, interrupt_kernel."""

from __future__ import annotations

from mcp.types import CallToolResult

from kernelpool.mcp.call import DESTRUCTIVE, EDIT, READ, Call, Tools, result

TOOLS = Tools()


@TOOLS.add("list_kernelspecs", "List the kernels this server offers for new notebooks (use_notebook's `kernel`): "
           "name, display name, language.", READ)
async def list_kernelspecs(call: Call) -> CallToolResult:
    specs = [spec.describe() for spec in call.services.kernels.specs.specs.values()]
    lines = [f"{s['name']:12} {s['language']:10} {s['display_name']}{'  (default)' if s['default'] else ''}" for s in specs]
    return result("\n".join(lines), {"kernelspecs": specs})


@TOOLS.add("list_kernels", "List your running kernels: notebook, state, start time, executions.", READ)
async def list_kernels(call: Call) -> CallToolResult:
    kernels, warm = call.services.workspace.kernels(call.user)
    items = [{
        "kernel_id": k.id, "notebook": k.path, "kernel": k.spec, "state": k.state.value, "pid": k.pid,
        "started_at": k.started_at, "executions": k.executions,
    } for k in kernels]
    lines = [f"{k['kernel_id']}  {k['kernel']:8} {k['state']:8} {k['notebook']}  executions={k['executions']}" for k in items]
    return result("\n".join(lines) or "(no kernels)", {"kernels": items, "warm": warm})


@TOOLS.add("restart_notebook", "Restart a notebook's kernel: a fresh kernel, all variables lost; the file stays.", DESTRUCTIVE)
async def restart_notebook(call: Call, *, notebook: str | None = None) -> CallToolResult:
    path = call.notebook(notebook)
    kernel = await call.services.workspace.restart(call.user, path)
    await call.services.notices.to_user(
        call.user, "notice", f"the kernel of {path} was restarted (restart_notebook): its variables are gone",
        {"notebook": path, "kernel_id": kernel.id})
    return result(f"restarted the kernel of {path} (kernel {kernel.id}, {kernel.spec})",
                  {"notebook": path, "kernel_id": kernel.id, "kernel": kernel.spec})


@TOOLS.add("interrupt_kernel", "Interrupt what a notebook's kernel is running (like Ctrl-C).", EDIT)
async def interrupt_kernel(call: Call, *, notebook: str | None = None) -> CallToolResult:
    path = call.notebook(notebook)
    if not await call.services.workspace.interrupt(call.user, path):
        return result(f"{path} has no running kernel", {"notebook": path, "interrupted": False})
    return result(f"interrupted the kernel of {path}", {"notebook": path, "interrupted": True})
