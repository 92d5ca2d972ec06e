"""In-process stand-ins for a kernel process, for the unit tests of the registry, the jobs and the
execution service. Each says why it is a fake: what the tests using it are about is the
bookkeeping around a kernel (admission, state, outputs, saving), not the process, which needs a
uid of its own, a cgroup and a second or two to start. The real kernels are started by the system
suites (tests/test_e2e.py, tests/test_channels.py, tests/test_starve.py).

A `ScriptedKernel` answers the codes below as ipykernel would answer real code, message by message
into the request's real `kernels.channels.Inbox`:

- `print:TEXT` writes TEXT on stdout and finishes;
- `error:NAME` raises NAME;
- `sleep:SECONDS` runs that long, or until interrupted (then KeyboardInterrupt, as ipykernel);
- `die` ends the process without an answer;
- `wait` runs until the test calls `release()` (then prints "released").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from types import SimpleNamespace
from typing import Any

from kernelpool.config import Settings
from kernelpool.kernels.channels import Inbox
from kernelpool.kernels.kernel import Kernel
from kernelpool.kernels.launch import KernelLauncher
from kernelpool.kernels.messages import Misbehaviour
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.store import Store
from kernelpool.users.accounts import User, UserService

_PIDS = itertools.count(40_000)


class FakeManager:
    """Stands for jupyter_client's `AsyncKernelManager` of a process that does not exist: what the
    registry and `Kernel` ask of it (alive?, interrupt, its provisioner's pid and exit status)."""

    def __init__(self) -> None:
        self.alive = True
        self.interrupts = 0
        self.interrupted = asyncio.Event()
        self.connection_file = "/nonexistent/kernel.json"
        self.provisioner = SimpleNamespace(pid=next(_PIDS), process=SimpleNamespace(returncode=None))

    async def is_alive(self) -> bool:
        return self.alive

    async def interrupt_kernel(self) -> None:
        self.interrupts += 1
        self.interrupted.set()

    def exit(self, returncode: int) -> None:
        self.alive = False
        self.provisioner.process.returncode = returncode


class ScriptedKernel:
    """Stands for `kernels.channels.KernelChannels` over a running ipykernel: it answers each
    execute request from the script in this module's docstring instead of running the code."""

    def __init__(self, manager: FakeManager, budget: int = 1 << 20) -> None:
        self.manager = manager
        self.budget = budget
        self.codes: list[str] = []  # every code sent, silent ones (a chdir) included
        self.failure = None
        self.count = 0
        self._released = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def release(self) -> None:
        self._released.set()

    async def execute(self, code: str, silent: bool = False, store_history: bool = True,
                      listen: bool = True) -> tuple[str, Inbox | None]:
        msg_id = uuid.uuid4().hex
        self.codes.append(code)
        inbox = Inbox(self.budget) if listen else None
        if inbox is not None:
            task = asyncio.get_running_loop().create_task(self._answer(code, msg_id, inbox))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return msg_id, inbox

    def done(self, msg_id: str) -> None:
        pass

    async def request_shutdown(self) -> None:
        pass

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _answer(self, code: str, msg_id: str, inbox: Inbox) -> None:
        def send(channel: str, msg_type: str, **content: Any) -> None:
            inbox.put(channel, {"msg_type": msg_type, "content": content, "parent_header": {"msg_id": msg_id},
                                "header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type}, "metadata": {}})

        kind, _, arg = code.partition(":")
        if kind == "die":
            self.manager.exit(-9)
            inbox.close()
            return
        self.manager.interrupted.clear()
        send("iopub", "status", execution_state="busy")
        self.count += 1
        status = "ok"
        if kind == "print":
            send("iopub", "stream", name="stdout", text=arg)
        elif kind == "error":
            status = "error"
            send("iopub", "error", ename=arg, evalue="raised", traceback=[f"{arg}: raised"])
        elif kind in ("sleep", "wait"):
            waits = [asyncio.ensure_future(self.manager.interrupted.wait())]
            if kind == "wait":
                waits.append(asyncio.ensure_future(self._released.wait()))
            _, pending = await asyncio.wait(waits, timeout=float(arg) if kind == "sleep" else None,
                                            return_when=asyncio.FIRST_COMPLETED)
            for future in pending:
                future.cancel()
            if self.manager.interrupted.is_set():
                status = "error"
                send("iopub", "error", ename="KeyboardInterrupt", evalue="", traceback=["KeyboardInterrupt"])
            elif kind == "wait":
                send("iopub", "stream", name="stdout", text="released")
        send("shell", "execute_reply", status=status, execution_count=self.count)
        send("iopub", "status", execution_state="idle")


class FakeLauncher(KernelLauncher):
    """The registry's `KernelLauncher` without processes: `prepare` makes the `Kernel` as the real
    one does but with a `FakeManager`, `start` only counts (and can be held or made to fail), and
    `open_channels` gives a `ScriptedKernel`. The registry's admission, counting and stopping run
    as in the server; what a real start does is tested by the system suites."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gate: asyncio.Event | None = None  # set: starts wait for it
        self.fail_start: Exception | None = None
        self.fail_prepare: Exception | None = None
        self.running: set[str] = set()  # kernel ids started and not stopped
        self.peak = 0  # the most kernels running at once
        self.stopped: list[Kernel] = []
        self.kernels: list[Kernel] = []

    async def prepare(self, user: User, kid: str) -> Kernel:
        if self.fail_prepare is not None:
            raise self.fail_prepare
        kernel = Kernel(id=kid, user=user.name, manager=FakeManager(), cgroup=None,  # type: ignore[arg-type]
                        memory_limit=user.kernel_limits.memory_bytes, uid=user.uid, limits=user.kernel_limits)
        self.kernels.append(kernel)
        return kernel

    async def start(self, kernel: Kernel, user: User) -> None:
        self.running.add(kernel.id)
        self.peak = max(self.peak, len(self.running))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_start is not None:
            raise self.fail_start

    async def open_channels(self, kernel: Kernel) -> None:
        kernel.channels = ScriptedKernel(kernel.manager)  # type: ignore[assignment,arg-type]

    def misbehave(self, kernel: Kernel, exc: Misbehaviour) -> None:
        """What a kernel's channel reader does when the kernel breaks a bound: tell the registry."""
        self._on_misbehaviour(kernel, exc)

    async def stop(self, kernel: Kernel, now: bool = False) -> None:
        if kernel.channels is not None:
            await kernel.channels.close()
        with contextlib.suppress(AttributeError):
            kernel.manager.alive = False  # type: ignore[attr-defined]
        self.running.discard(kernel.id)
        self.stopped.append(kernel)


def registry_with_fake_launcher(settings: Settings, store: Store, users: UserService,
                                **options: Any) -> tuple[KernelRegistry, FakeLauncher]:
    """A real `KernelRegistry` whose launcher is a `FakeLauncher` (returned too, for the test to steer)."""
    made: list[FakeLauncher] = []

    def launcher(*args: Any) -> FakeLauncher:
        made.append(FakeLauncher(*args))
        return made[-1]

    registry = KernelRegistry(settings, store, users, None, launcher=launcher, **options)
    return registry, made[0]
