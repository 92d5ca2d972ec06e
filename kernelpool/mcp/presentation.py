"""How clients present the tools: a title for each, and the output schema of those whose
structured result has a stable shape (the SDK checks each successful result against it).
Kept apart from the tool modules so that a tool's code and its presentation change separately.
Callers: `kernelpool.mcp.server`."""

from __future__ import annotations

from typing import Any

from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

TITLES = {
    "list_files": "List files", "list_notebooks": "List notebooks", "use_notebook": "Open or create a notebook",
    "unuse_notebook": "Close a notebook", "read_notebook": "Read a notebook", "read_cell": "Read a cell",
    "insert_cell": "Insert a cell", "overwrite_cell_source": "Replace a cell's source",
    "edit_cell_source": "Edit a cell's source", "delete_cell": "Delete a cell", "move_cell": "Move a cell",
    "clear_cell_output": "Clear a cell's output", "execute_cell": "Run a cell",
    "insert_execute_code_cell": "Insert and run a code cell", "execute_code": "Run code",
    "get_execution": "Get an execution's result", "cancel_execution": "Cancel an execution",
    "list_kernels": "List kernels", "restart_notebook": "Restart a notebook's kernel",
    "interrupt_kernel": "Interrupt a kernel", "list_kernelspecs": "List the kernels on offer",
    "read_file": "Read a file", "write_file": "Write a file", "delete_file": "Delete a file",
}


class FilesOut(TypedDict):
    path: str
    files: list[dict[str, Any]]


class NotebookEntry(TypedDict):
    path: str
    kernel: str
    active: bool


class NotebooksOut(TypedDict):
    notebooks: list[NotebookEntry]
    active: str | None


class UseOut(TypedDict):
    notebook: str
    mode: str
    kernel_id: str
    active: bool


class UnuseOut(TypedDict):
    notebook: str
    kernel_stopped: bool


class CellOut(TypedDict):
    notebook: str
    cell_index: int
    cell_id: str


class EditOut(CellOut):
    replacements: int


class DeleteOut(CellOut):
    source: str


MoveOut = TypedDict("MoveOut", {"notebook": str, "from": int, "to": int, "cell_id": str})


class KernelsOut(TypedDict):
    kernels: list[dict[str, Any]]
    warm: int


class RestartOut(TypedDict):
    notebook: str
    kernel_id: str


class InterruptOut(TypedDict):
    notebook: str
    interrupted: bool


OUTPUTS: dict[str, type] = {
    "list_files": FilesOut, "list_notebooks": NotebooksOut, "use_notebook": UseOut, "unuse_notebook": UnuseOut,
    "insert_cell": CellOut, "overwrite_cell_source": CellOut, "edit_cell_source": EditOut, "delete_cell": DeleteOut,
    "move_cell": MoveOut, "clear_cell_output": CellOut, "list_kernels": KernelsOut, "restart_notebook": RestartOut,
    "interrupt_kernel": InterruptOut,
}
