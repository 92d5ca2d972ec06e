"""KernelRegistry: one kernel per (user, notebook), admitted against the per-user and server caps in
one step, counted until it is stopped, whatever way its start or its life ends. The launcher starts
no process (tests/unit/fakes.py says why); the registry, store and users are the server's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from kernelpool.config import Settings
from kernelpool.errors import KernelFailed, LimitReached
from kernelpool.kernels.kernel import Kernel, KernelState
from kernelpool.kernels.messages import Misbehaviour
from kernelpool.kernels.registry import KernelRegistry
from kernelpool.metrics import Metrics
from kernelpool.store import Store
from kernelpool.users.accounts import UserService
from tests.unit.fakes import FakeLauncher, FakeManager, registry_with_fake_launcher

Build = Callable[..., tuple[KernelRegistry, FakeLauncher]]


@pytest.fixture
async def build(make_settings: Callable[..., Settings], store: Store, users: UserService) -> AsyncIterator[Build]:
    """A registry with the given settings (pool off unless asked), closed after the test."""
    made: list[KernelRegistry] = []

    def make(**values: object) -> tuple[KernelRegistry, FakeLauncher]:
        registry, launcher = registry_with_fake_launcher(make_settings(**({"pool_size": 0} | values)), store, users,
                                                         metrics=Metrics())
        made.append(registry)
        return registry, launcher

    yield make
    for registry in made:
        await registry.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition never held"
        await asyncio.sleep(0.001)


async def test_the_per_user_cap_holds_when_starts_overlap(build: Build) -> None:
    registry, launcher = build(max_kernels_per_user=2, max_kernels=10)
    launcher.gate = asyncio.Event()  # starts take their time: the other requests come meanwhile
    alice = [asyncio.create_task(registry.acquire("alice", f"n{i}.ipynb")) for i in range(5)]
    await until(lambda: sum(t.done() for t in alice) == 3)
    assert registry.count("alice") == 2 and len(launcher.running) == 2, "two admitted, both still starting"
    bob = asyncio.create_task(registry.acquire("bob", "n.ipynb"))  # another user's cap is their own
    launcher.gate.set()
    results = await asyncio.gather(*alice, return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 3 and all(isinstance(r, LimitReached) and "kernels per user" in str(r) for r in refused)
    assert (await bob).user == "bob"
    assert launcher.peak == 3 and registry.count("alice") == 2 and registry.count() == 3
    assert {k.state for k in registry.all()} == {KernelState.IDLE}


async def test_the_server_cap_holds_across_users(build: Build) -> None:
    registry, launcher = build(max_kernels_per_user=2, max_kernels=3)
    launcher.gate = asyncio.Event()
    asks = [asyncio.create_task(registry.acquire(user, f"{user}{i}.ipynb")) for user in ("alice", "bob") for i in range(2)]
    await until(lambda: sum(t.done() for t in asks) == 1)
    launcher.gate.set()
    results = await asyncio.gather(*asks, return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and "kernels on this server limit reached (3)" in str(refused[0])
    assert registry.count() == 3 and launcher.peak == 3


async def test_one_notebook_gets_one_kernel_however_many_ask_at_once(build: Build) -> None:
    registry, launcher = build()
    launcher.gate = asyncio.Event()
    asks = [asyncio.create_task(registry.acquire("alice", "n.ipynb")) for _ in range(5)]
    await asyncio.sleep(0.01)
    launcher.gate.set()
    kernels = await asyncio.gather(*asks)
    assert len({k.id for k in kernels}) == 1 and len(launcher.kernels) == 1 and registry.count("alice") == 1


@pytest.mark.parametrize("where", ["prepare", "start"])
async def test_a_start_that_fails_gives_its_slot_back(build: Build, store: Store, where: str) -> None:
    registry, launcher = build(max_kernels_per_user=1)
    if where == "prepare":
        launcher.fail_prepare = OSError("no runtime folder")
        with pytest.raises(OSError):
            await registry.acquire("alice", "n.ipynb")
    else:
        launcher.fail_start = RuntimeError("the kernel exited at once")
        with pytest.raises(KernelFailed, match="could not start"):
            await registry.acquire("alice", "n.ipynb")
        assert launcher.stopped == launcher.kernels, "what was started is stopped again"
    assert registry.count("alice") == 0 and registry.count() == 0 and not await store.list_kernels()
    launcher.fail_prepare = launcher.fail_start = None
    kernel = await registry.acquire("alice", "n.ipynb")  # the one slot is free again
    assert [row.id for row in await store.list_kernels()] == [kernel.id]


async def test_a_kernel_of_a_user_being_removed_is_stopped_as_it_starts(build: Build, store: Store) -> None:
    registry, launcher = build()
    launcher.gate = asyncio.Event()
    ask = asyncio.create_task(registry.acquire("alice", "n.ipynb"))
    await until(lambda: len(launcher.running) == 1)
    await store.set_removing("alice", True)  # `users remove` began while the kernel was starting
    launcher.gate.set()
    with pytest.raises(KernelFailed, match="is being removed"):
        await ask
    assert not launcher.running and registry.count() == 0 and registry.get("alice", "n.ipynb") is None


async def test_a_dead_kernel_is_replaced_on_the_next_call(build: Build) -> None:
    registry, launcher = build(max_kernels_per_user=1)
    first = await registry.acquire("alice", "n.ipynb")
    assert await registry.acquire("alice", "n.ipynb") is first
    manager = first.manager
    assert isinstance(manager, FakeManager)
    manager.exit(-9)
    second = await registry.acquire("alice", "n.ipynb")  # at the cap of 1: the dead one's slot was given back
    assert second is not first and first in launcher.stopped and registry.count("alice") == 1
    assert first.explain_death() == "the kernel process was killed by SIGKILL"


async def test_shutting_a_kernel_down_frees_its_slot(build: Build, store: Store) -> None:
    registry, _ = build(max_kernels_per_user=1)
    await registry.acquire("alice", "a.ipynb")
    with pytest.raises(LimitReached):
        await registry.acquire("alice", "b.ipynb")
    assert await registry.shutdown("alice", "a.ipynb") and not await registry.shutdown("alice", "a.ipynb")
    kernel = await registry.acquire("alice", "b.ipynb")
    assert [(row.id, row.notebook) for row in await store.list_kernels()] == [(kernel.id, "b.ipynb")]


async def test_a_notebook_in_a_folder_runs_in_that_folder(build: Build) -> None:
    registry, _ = build()
    kernel = await registry.acquire("alice", "work/deep/n.ipynb")
    assert kernel.channels is not None
    assert kernel.channels.codes == ["import os as _o; _o.chdir('work/deep'); del _o"]  # type: ignore[attr-defined]
    top = await registry.acquire("alice", "top.ipynb")
    assert top.channels is not None and top.channels.codes == []  # type: ignore[attr-defined]


async def test_warm_kernels_count_against_the_cap(build: Build) -> None:
    registry, _ = build(pool_size=1, max_kernels_per_user=2)
    first = await registry.acquire("alice", "a.ipynb")
    await until(lambda: len(registry.pooled("alice")) == 1)  # refilled after the hand-out
    warm = registry.pooled("alice")[0]
    assert registry.count("alice") == 2 and registry.get("alice", "a.ipynb") is first
    assert registry.pooled("bob") == [], "warm kernels are started for the users who use kernels"
    second = await registry.acquire("alice", "b.ipynb")
    assert second is warm, "the warm kernel is handed out"
    await asyncio.sleep(0.05)
    assert registry.pooled("alice") == [] and registry.count("alice") == 2, "no refill past the cap"
    with pytest.raises(LimitReached):
        await registry.acquire("alice", "c.ipynb")


async def test_a_warm_kernel_started_with_other_limits_is_not_handed_out(build: Build, users: UserService) -> None:
    registry, launcher = build(pool_size=1)
    await registry.acquire("alice", "a.ipynb")
    await until(lambda: len(registry.pooled("alice")) == 1)
    stale = registry.pooled("alice")[0]
    await users.set_limits("alice", kernel_memory="1G")  # `users set-limits` while a warm kernel waits
    fresh = await registry.acquire("alice", "b.ipynb")
    assert fresh is not stale and stale in launcher.stopped
    assert fresh.limits is not None and fresh.limits.memory_bytes == 1 << 30


async def test_a_misbehaving_idle_kernel_is_stopped_and_its_user_told(build: Build) -> None:
    registry, launcher = build(max_kernels_per_user=1)
    told: list[tuple[str, str, str]] = []
    registry.listeners.append(lambda *heard: told.append(heard))
    kernel = await registry.acquire("alice", "n.ipynb")
    launcher.misbehave(kernel, Misbehaviour("flood", "it flooded its iopub channel"))
    launcher.misbehave(kernel, Misbehaviour("flood", "again"))  # the other channels' readers: told once
    await until(lambda: bool(told))
    assert told == [("alice", "n.ipynb", "the kernel was stopped because it flooded its iopub channel")]
    assert registry.get("alice", "n.ipynb") is None and registry.count("alice") == 0 and kernel in launcher.stopped
    assert (await registry.acquire("alice", "n.ipynb")) is not kernel


async def test_a_misbehaving_busy_kernel_is_stopped_without_a_second_message(build: Build) -> None:
    """A call runs on it: that call ends with the cause (kernelpool/executions), the listeners hear nothing."""
    registry, launcher = build()
    told: list[tuple[str, str, str]] = []
    registry.listeners.append(lambda *heard: told.append(heard))
    kernel = await registry.acquire("alice", "n.ipynb")
    kernel.transition(KernelState.BUSY)
    launcher.misbehave(kernel, Misbehaviour("too_large", "it sent a message of more than 1 GiB"))
    await until(lambda: kernel in launcher.stopped)
    await asyncio.sleep(0.01)
    assert told == [] and kernel.death_cause == "the kernel was stopped because it sent a message of more than 1 GiB"


async def test_idle_kernels_are_culled_busy_ones_are_not(build: Build) -> None:
    registry, _ = build(kernel_idle_timeout=0.05)
    idle = await registry.acquire("alice", "idle.ipynb")
    busy = await registry.acquire("alice", "busy.ipynb")
    busy.transition(KernelState.BUSY)
    await asyncio.sleep(0.1)
    assert await registry.cull_idle() == 1
    assert registry.get("alice", "idle.ipynb") is None and registry.get("alice", "busy.ipynb") is busy
    assert idle.state is KernelState.STOPPING and registry.count("alice") == 1


async def test_a_removed_users_kernels_are_dropped_at_the_next_reload(build: Build, users: UserService) -> None:
    registry, launcher = build()
    gone = await registry.acquire("alice", "n.ipynb")
    stays = await registry.acquire("bob", "n.ipynb")
    current = users.current()
    assert await registry.forget_removed(current) == 0
    del current["alice"]
    assert await registry.forget_removed(current) == 1
    assert gone in launcher.stopped and registry.of_user("alice") == [] and registry.of_user("bob") == [stays]
    current["bob"] += 1  # removed and added again under the same name: another uid
    assert await registry.forget_removed(current) == 1 and registry.count() == 0


async def test_close_stops_every_kernel(build: Build) -> None:
    registry, launcher = build(pool_size=1)
    kernels: list[Kernel] = [await registry.acquire(u, "n.ipynb") for u in ("alice", "bob")]
    await until(lambda: len(registry.pooled()) == 2)
    await registry.close()
    assert set(kernels + registry.pooled()) <= set(launcher.stopped) and not launcher.running
    assert registry.all() == [] and registry.count() == 0
