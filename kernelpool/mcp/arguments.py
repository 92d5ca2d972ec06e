"""Tool arguments a tool does not take are refused, never dropped.

The MCP SDK builds each tool's argument model (pydantic) from the function's signature and
ignores fields it does not know: `use_notebook(kernal="ir")` would quietly create a Python
notebook. Here each registered tool's model keeps what it does not know and hands the names on
under `UNKNOWN` (a key no parameter can have: the SDK refuses parameters starting with '_', and
the extras are collected here, so a client's own `_unknown` is one of them), and the input schema
says `additionalProperties: false`. The one tool wrapper (`kernelpool.mcp.server._run`) then
refuses the call, naming what it does not know and what it takes, before anything runs.
Callers: `kernelpool.mcp.server.build_mcp`.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver.tools import Tool as SdkTool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from pydantic import ConfigDict

UNKNOWN = "_unknown_arguments"


def _keeping_unknown(model: type[ArgModelBase]) -> type[ArgModelBase]:
    """`model`, but keeping fields it does not know and passing their names on under `UNKNOWN`."""

    class Keeping(model):  # type: ignore[misc,valid-type]
        model_config = ConfigDict(extra="allow")  # merged with the SDK's

        def model_dump_one_level(self) -> dict[str, Any]:
            known = super().model_dump_one_level()
            extra = self.model_extra or {}
            return {**known, UNKNOWN: sorted(extra)} if extra else known

    Keeping.__name__ = Keeping.__qualname__ = model.__name__
    return Keeping


def refuse_unknown(tool: SdkTool) -> SdkTool:
    """Make `tool` (registered from a `kernelpool.mcp.server` entry) pass on unknown arguments
    and say in its schema that it takes no others."""
    tool.fn_metadata.arg_model = _keeping_unknown(tool.fn_metadata.arg_model)
    tool.parameters["additionalProperties"] = False
    return tool
