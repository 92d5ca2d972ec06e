"""The MCP server: registration of every tool and resource, and the one wrapper around each tool.

The tools themselves are module-level functions grouped by noun (`notebooks`, `cells`,
`execution`, `kernels`): each parses its arguments, calls one service method and formats the
result. Tool names and arguments follow jupyter-mcp-server where the meaning is the same. Every
tool that touches a notebook takes `notebook`; without it the MCP session's active notebook is
used, and without either the call fails (`NoNotebook`): never a shared fallback.

The wrapper (`_run`) is the only place that knows who is calling, writes the audit row, counts
the call in the metrics and maps kernelpool's exceptions to MCP tool errors. Callers: `app`.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Annotated, Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool as SdkTool
from mcp.types import CallToolResult, Icon

from kernelpool import __version__
from kernelpool.errors import KernelpoolError, UnknownArguments
from kernelpool.mcp import cells, execution, files, kernels, notebooks
from kernelpool.mcp.arguments import UNKNOWN, refuse_unknown
from kernelpool.mcp.call import Call, Tool, ToolFunction
from kernelpool.mcp.presentation import OUTPUTS, TITLES
from kernelpool.mcp.resources import register as register_resources
from kernelpool.mcp.resources import session_of
from kernelpool.mcp.services import Services
from kernelpool.mcp.wire import clean_replies, clean_text

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
kernelpool runs Python code in Jupyter notebooks that belong to you alone. Each notebook has its
own kernel. Pass `notebook` (a path relative to your folder, like 'work/analysis.ipynb') to every
tool, or call use_notebook once to make a notebook the active one of this session. Cells are
addressed by `cell_index` (0-based; negative counts from the end) or by `cell_id`."""

TOOLS: tuple[Tool, ...] = (*notebooks.TOOLS, *files.TOOLS, *cells.TOOLS, *execution.TOOLS, *kernels.TOOLS)


def build_mcp(services: Services, token_verifier: Any, auth: Any, *, icon_url: str | None = None) -> MCPServer:
    """The MCP server with every tool, resource handler and the session middleware registered."""
    # every tool refuses arguments it does not take (kernelpool.mcp.arguments)
    tools = [refuse_unknown(SdkTool.from_function(_entry(services, tool), name=tool.name, title=TITLES[tool.name],
                                                  description=tool.description, annotations=tool.annotations))
             for tool in TOOLS]
    icons = [Icon(src=icon_url, mime_type="image/svg+xml", sizes=["any"])] if icon_url else None
    server: MCPServer = MCPServer(
        name="kernelpool", title="kernelpool", instructions=INSTRUCTIONS, version=__version__, icons=icons,
        tools=tools,
        token_verifier=token_verifier, auth=auth,
        # no subscriptions/listen (2026-07-28): its bus is server-wide, not per user, and kernelpool
        # publishes nothing on it; sessions subscribe with resources/subscribe (kernelpool/mcp/notices.py)
        subscriptions=False,
    )

    # resources, completion and logging/setLevel go on the low-level server: MCPServer lists the
    # same resources to everyone, and each user must see only their own; every request also
    # leaves its session's handle, so that notices can reach that session later
    def attach(ctx: Any) -> None:
        token, sid = get_access_token(), session_of(ctx)
        if token is not None and sid is not None:
            services.notices.attach(token.client_id, sid, ctx.session)

    async def attach_session(ctx: Any, call_next: Any) -> Any:
        attach(ctx)
        return await call_next(ctx)

    server.middleware.append(attach_session)
    server.middleware.append(clean_replies)  # innermost: sees each handler's wire-shaped result first
    register_resources(server._lowlevel_server, services, attach)
    return server


def _entry(services: Services, tool: Tool) -> ToolFunction:
    """What the SDK registers for `tool`: its arguments (the parameters after `call`) and the
    request's `Context`, which the SDK fills in and leaves out of the argument schema."""

    async def entry(ctx: Context, **arguments: Any) -> CallToolResult:
        return await _run(services, tool, ctx, arguments)

    params = list(inspect.signature(tool.fn, eval_str=True).parameters.values())[1:]
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Context)
    # a stable structured result is published as the tool's output schema (and checked by the SDK)
    returns: Any = Annotated[CallToolResult, OUTPUTS[tool.name]] if tool.name in OUTPUTS else CallToolResult
    entry.__signature__ = inspect.Signature([context, *params], return_annotation=returns)  # type: ignore[attr-defined]
    entry.__annotations__ = {"ctx": Context, **{p.name: p.annotation for p in params}, "return": returns}
    entry.__name__ = entry.__qualname__ = tool.fn.__name__
    entry.__doc__ = tool.fn.__doc__
    return entry


async def _run(s: Services, tool: Tool, ctx: Context, arguments: dict[str, Any]) -> CallToolResult:
    """Call one tool for the authenticated user, with audit, metrics and the one mapping of our
    errors to tool errors."""
    start = time.monotonic()
    unknown: list[str] = arguments.pop(UNKNOWN, [])
    token = get_access_token()
    user = token.client_id if token else None
    outcome, detail = "ok", None
    try:
        if user is None:  # the SDK's auth middleware runs first; this is a wiring bug
            raise ToolError("not authenticated")
        if unknown:
            raise UnknownArguments(tool.name, unknown, tool.arguments)
        # added by the CLI since we last looked, or removed and added again (another uid)
        await s.users.ensure_known(user, (token.claims or {}).get("uid") if token else None)
        result = await tool.fn(Call(s, user, ctx), **arguments)
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
        log.exception("tool %s failed", tool.name)
        raise ToolError(f"internal error in {tool.name}: {type(exc).__name__}: {exc}") from exc
    finally:
        duration = (time.monotonic() - start) * 1000
        s.metrics.tool_calls.labels(tool.name, outcome).inc()
        notebook = arguments.get("notebook")
        try:
            await s.store.audit(user, tool.name, notebook if isinstance(notebook, str) else None,
                                outcome, duration, clean_text(detail) if detail is not None else None,
                                client=_client_name(ctx))
        except Exception as exc:  # an audit write must not turn a result into a failure
            log.warning("audit write failed: %s", exc)


def _client_name(ctx: Context) -> str | None:
    """The calling client as it named itself (clientInfo, in `initialize` or the request's envelope)."""
    try:
        params = ctx.session.client_params
    except Exception:  # no session on this request (the SDK raises outside a request)
        return None
    info = params.client_info if params is not None else None
    return f"{info.name} {info.version}"[:120] if info is not None else None
