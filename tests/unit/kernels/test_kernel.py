"""A kernel's state machine and the words for how its process ended."""

from __future__ import annotations

import pytest

from kernelpool.kernels.kernel import Kernel, KernelState
from tests.unit.fakes import FakeManager


def kernel() -> Kernel:
    return Kernel(id="k1", user="alice", manager=FakeManager(), cgroup=None, memory_limit=None)  # type: ignore[arg-type]


def test_states_move_only_along_the_machine() -> None:
    k = kernel()
    for state in (KernelState.IDLE, KernelState.BUSY, KernelState.IDLE, KernelState.BUSY, KernelState.DEAD,
                  KernelState.STOPPING):
        k.transition(state)
        assert k.state is state
    with pytest.raises(RuntimeError, match="no transition stopping -> idle"):
        k.transition(KernelState.IDLE)
    fresh = kernel()
    with pytest.raises(RuntimeError, match="no transition starting -> busy"):
        fresh.transition(KernelState.BUSY)
    fresh.transition(KernelState.STARTING)  # staying is no move
    dead = kernel()
    dead.transition(KernelState.DEAD)
    with pytest.raises(RuntimeError):
        dead.transition(KernelState.IDLE)


@pytest.mark.parametrize("returncode, words", [
    (-9, "the kernel process was killed by SIGKILL"), (-11, "the kernel process was killed by SIGSEGV"),
    (-99, "the kernel process was killed by signal 99"), (3, "the kernel process exited with code 3"),
    (None, "the kernel process died"),
])
def test_why_a_kernel_died_is_said_in_words_once(returncode: int | None, words: str) -> None:
    k = kernel()
    manager = k.manager
    assert isinstance(manager, FakeManager)
    manager.provisioner.process.returncode = returncode
    assert k.mark_dead() == words and k.state is KernelState.DEAD
    manager.provisioner.process.returncode = 0
    assert k.explain_death() == words, "the first cause found stays"


async def test_a_dead_or_stopping_kernel_is_not_alive_whatever_its_process() -> None:
    k = kernel()
    assert await k.is_alive()
    k.transition(KernelState.STOPPING)
    assert not await k.is_alive()
