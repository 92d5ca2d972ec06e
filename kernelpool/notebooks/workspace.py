"""A user's notebooks as the tools see them: each with its kernel, one the session's active notebook.

The sequences that touch a notebook, its kernel and the MCP session's context together live
here, in one order each: `open` creates or loads the notebook, then acquires its kernel, then
makes it the session's active notebook; `close` shuts the kernel down and forgets it as active.
Callers: the tool layer (`kernelpool.mcp.notebooks`, `kernelpool.mcp.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kernelpool.errors import InvalidArgument
from kernelpool.kernels.kernel import Kernel
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.kernels.specs import DEFAULT
from kernelpool.notebooks.service import NotebookService
from kernelpool.users.accounts import UserService
from kernelpool.users.sessions import SessionContexts


@dataclass(frozen=True)
class Opened:
    path: str
    kernel: Kernel
    active: bool  # made the session's active notebook (False: no session the server issued)
    kernels: int  # kernels the user has now


@dataclass(frozen=True)
class NotebookEntry:
    path: str
    kernel: str  # its kernel's state, or "none"
    active: bool


class Workspace:
    def __init__(self, notebooks: NotebookService, kernels: KernelRegistry, users: UserService,
                 sessions: SessionContexts) -> None:
        self._notebooks = notebooks
        self._kernels = kernels
        self._users = users
        self._sessions = sessions

    async def open(self, user: str, session_id: str | None, path: str, mode: Literal["connect", "create"],
                   kernel_name: str | None = None) -> Opened:
        """Create (with `kernel_name`'s kernelspec, default python3) or load the notebook, then its
        kernel, of the kind the notebook records; then the session's active notebook."""
        specs = self._kernels.specs
        if mode == "create":
            spec = specs.get(kernel_name or DEFAULT)  # KernelNotAllowed before anything is written
            await self._notebooks.create(user, path, spec.metadata())
        else:
            nb = await self._notebooks.load(user, path)  # exists and is a valid notebook
            spec = specs.for_notebook(nb.metadata)
            if kernel_name is not None and kernel_name != spec.name:
                specs.get(kernel_name)
                raise InvalidArgument("kernel", f"{path!r} records kernel {spec.name!r}; an existing notebook opens "
                                                "with its own kernel (create a new notebook for another)")
        kernel = await self._kernels.acquire(user, path, spec.name)
        count = len(self._kernels.of_user(user))
        # only for a session id the server issued to this user: a made-up one gets no context
        active = session_id is not None and self._sessions.set_notebook(user, session_id, path)
        return Opened(path, kernel, active, count)

    async def close(self, user: str, session_id: str | None, path: str) -> bool:
        """Shut the notebook's kernel down (the file stays); whether it had one running."""
        stopped = await self._kernels.shutdown(user, path)
        if session_id is not None and self._sessions.active_notebook(user, session_id) == path:
            self._sessions.set_notebook(user, session_id, None)
        return stopped

    async def notebooks(self, user: str, session_id: str | None) -> tuple[list[NotebookEntry], str | None, str | None]:
        """Every notebook of the user with its kernel's state; the session's active notebook; and
        a note when the list was cut (a folder too large to read whole)."""
        active = self._sessions.active_notebook(user, session_id)
        entries = []
        found = await self._notebooks.list_notebooks(user)
        for path in found.items:
            kernel = self._kernels.get(user, path)
            entries.append(NotebookEntry(path, kernel.state.value if kernel else "none", path == active))
        return entries, active, found.note

    def kernels(self, user: str) -> tuple[list[Kernel], int]:
        """The user's kernels, and how many warm ones wait for the user's next notebook."""
        return self._kernels.of_user(user), len(self._kernels.pooled(user))

    async def restart(self, user: str, path: str) -> Kernel:
        """A fresh kernel of the kind the notebook records."""
        spec = await self.spec_of(user, path)
        return await self._kernels.restart(await self._users.get(user), path, spec)

    async def spec_of(self, user: str, path: str) -> str:
        """The kernelspec the notebook records (KernelNotAllowed when this server does not offer it)."""
        nb = await self._notebooks.load(user, path)
        return self._kernels.specs.for_notebook(nb.metadata).name

    async def interrupt(self, user: str, path: str) -> bool:
        """Interrupt what the notebook's kernel runs; False when it has none."""
        kernel = self._kernels.get(user, path)
        if kernel is None:
            return False
        await self._kernels.interrupt(kernel)
        return True
