"""The server's side of a kernel's channels against a real ipykernel: routing by request, big
outputs, and a kernel that attacks through its own connections (kernels.channels, messages, wire)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psutil
import pytest

from kernelpool.kernels.channels import Inbox, KernelChannels
from kernelpool.kernels.manager import KernelpoolManager as AsyncKernelManager
from kernelpool.kernels.messages import ChannelLimits, Message, Misbehaviour, Pace
from tests.kernel_attacks import ATTACKS

MiB = 1 << 20
LIMITS = ChannelLimits(max_message=16 * MiB, max_parse=4 * MiB, flood_bytes=64 * MiB, flood_rate=MiB)


@dataclass
class Kernel:
    manager: AsyncKernelManager
    channels: KernelChannels
    told: list[Misbehaviour] = field(default_factory=list)


async def start(limits: ChannelLimits) -> Kernel:
    folder = tempfile.mkdtemp(prefix="kp-channels-")
    manager = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(folder, "k"))
    assert manager.kernel_spec is not None
    manager.kernel_spec.argv[0] = sys.executable  # this venv's ipykernel
    await manager.start_kernel()
    info = manager.get_connection_info()
    paths = {name: f"{info['ip']}-{info[name + '_port']}" for name in ("shell", "iopub", "control")}  # type: ignore[literal-required]
    for _ in range(600):
        if all(os.path.exists(p) for p in paths.values()):
            break
        await asyncio.sleep(0.05)
    told: list[Misbehaviour] = []
    channels = await KernelChannels.open(manager.session, paths, limits, Pace(256 * MiB), manager.is_alive, told.append)
    await channels.ready(60)
    return Kernel(manager, channels, told)


@pytest.fixture
async def kernels() -> AsyncIterator[list[Kernel]]:
    made: list[Kernel] = []
    try:
        yield made
    finally:
        for k in made:
            await k.channels.close()
            await k.manager.shutdown_kernel(now=True)


async def run(k: Kernel, code: str, wait: float = 60) -> tuple[list[tuple[str, Message]], Inbox]:
    """Execute `code`; its answers until the kernel is idle again or its channels are closed."""
    msg_id, inbox = await k.channels.execute(code)
    assert inbox is not None
    got: list[tuple[str, Message]] = []
    idle = reply = False
    try:
        while not (idle and reply):
            item = await inbox.get(wait)
            if item is None:
                assert inbox.closed, f"no answer within {wait} s; so far {got}"
                break
            got.append(item)
            channel, msg = item
            assert msg["parent_header"]["msg_id"] == msg_id
            idle = idle or (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle")
            reply = reply or (channel == "shell" and msg["msg_type"] == "execute_reply")
    finally:
        k.channels.done(msg_id)
    return got, inbox


def text(got: list[tuple[str, Message]]) -> str:
    return "".join(m["content"].get("text", "") for _, m in got if m["msg_type"] == "stream")


async def test_each_request_gets_its_own_answers(kernels: list[Kernel]) -> None:
    k = await start(LIMITS)
    kernels.append(k)
    silent, _ = await k.channels.execute("x = 1", silent=True, listen=False)  # nobody listens: passed through
    got, _ = await run(k, "print('hi'); 6*7")
    assert silent not in {m["parent_header"]["msg_id"] for _, m in got}
    kinds = [(c, m["msg_type"]) for c, m in got]
    assert ("iopub", "stream") in kinds and ("iopub", "execute_result") in kinds and ("shell", "execute_reply") in kinds
    result = next(m for _, m in got if m["msg_type"] == "execute_result")
    assert result["content"]["data"]["text/plain"] == "42"
    assert isinstance(result["header"]["date"], str), "header dates are left unparsed"
    again, _ = await run(k, "x + 1")
    assert next(m for _, m in again if m["msg_type"] == "execute_result")["content"]["data"]["text/plain"] == "2"
    assert not k.told


async def test_a_big_output_is_kept_as_head_and_tail_unparsed(kernels: list[Kernel]) -> None:
    k = await start(ChannelLimits(max_message=16 * MiB, max_parse=100_000, flood_bytes=64 * MiB, flood_rate=MiB))
    kernels.append(k)
    got, _ = await run(k, "import sys; sys.stdout.write('a' * 1_000_000 + 'END'); sys.stdout.flush()")
    out = text(got)
    assert len(out) < 100_000 and out.startswith("a") and out.endswith("END") and "dropped unread" in out
    assert not k.told


async def test_the_server_connects_to_shell_iopub_and_control_only(kernels: list[Kernel]) -> None:
    k = await start(LIMITS)
    kernels.append(k)
    got, _ = await run(k, ATTACKS + "print({c: connection(c) is not None for c in ('shell', 'iopub', 'control', 'stdin', 'hb')})")
    assert text(got).strip() == "{'shell': True, 'iopub': True, 'control': True, 'stdin': False, 'hb': False}", got


ATTACK_CASES = {
    # channel, code, metric label, words in the cause
    "1 GiB on shell": ("huge('shell', 1 << 30)", "too_large", "a message of more than 16 MiB on its shell channel"),
    "1 GiB on control": ("huge('control', 1 << 30)", "too_large", "on its control channel"),
    "1 GiB on IOPub": ("huge('iopub', 1 << 30)", "too_large", "on its iopub channel"),
    "a million frames": ("many_frames('shell', 1_000_000)", "malformed", "more than 256 frames"),
    "a 2 MiB header": ("raw('shell', encode([b'<IDS|MSG>', b'0' * 64, b'{' * (2 * MiB), b'{}', b'{}', b'{}']))",
                       "malformed", "whose header is 2 MiB"),
    "deep JSON": ("raw('shell', encode([b'<IDS|MSG>', b'0' * 64, b'[' * 500_000, b'{}', b'{}', b'{}']))",
                  "malformed", "whose header is not JSON"),
    "a wrong signature": ("raw('iopub', encode(signed('stream', {'name': 'stdout', 'text': 'forged'}, _k.get_parent(), key=1)))",
                          "malformed", "wrong signature"),
    "unsolicited messages": ("fresh('iopub', 100_000)", "flood", "flooded its iopub channel"),
    "output on shell": ("fresh('shell', 100_000, parent=_k.get_parent())", "flood", "flooded its shell channel"),
    "a message sent twice": ("repeated('iopub', signed('stream', {'name': 'stdout', 'text': 'x'}), 2)",
                             "replayed", "sent the same message twice on its iopub channel"),
    "its end of shell shut down": ("import socket as _s; _s.socket(fileno=os.dup(connection('shell'))).shutdown(_s.SHUT_RDWR); "
                                   "time.sleep(10)", "closed", "closed its shell channel's connection"),
    "medium messages zero-copy": ("iopub_send(signed('display_data', {'data': {'text/plain': 'm' * (8 * MiB)}, "
                                  "'metadata': {}}, _k.get_parent()), 100)", "replayed", "sent the same message twice"),
}


@pytest.mark.parametrize("case", list(ATTACK_CASES))
async def test_a_kernel_that_breaks_a_bound_is_stopped_reading(kernels: list[Kernel], case: str) -> None:
    code, reason, words = ATTACK_CASES[case]
    k = await start(LIMITS)
    kernels.append(k)
    me = psutil.Process()
    before = me.memory_info().rss
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, me.memory_info().rss)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        got, inbox = await asyncio.wait_for(run(k, ATTACKS + code), 120)
    finally:
        sampler.cancel()
    assert inbox.closed, f"the execution ended because the channels were closed: {got}"
    assert len(k.told) == 1 and k.told[0].reason == reason and words in str(k.told[0]), k.told
    assert k.channels.failure is k.told[0]
    # what the attack could make this process hold: one content kept for parsing, plus read buffers
    assert peak - before < LIMITS.max_parse + 16 * MiB, f"grew {(peak - before) / MiB:.0f} MiB"
    assert await k.manager.is_alive(), "the channels only stop reading; the registry stops the process"


async def test_an_inbox_nobody_reads_holds_its_reader_back_in_bytes(kernels: list[Kernel]) -> None:
    k = await start(LIMITS)
    kernels.append(k)
    me = psutil.Process()
    msg_id, inbox = await k.channels.execute(ATTACKS + "fresh('iopub', 800, json.dumps({'name': 'stdout', "
                                             "'text': 'y' * 60_000}).encode(), parent=_k.get_parent())")
    assert inbox is not None
    try:
        before = me.memory_info().rss
        await asyncio.sleep(5)  # nobody reads the inbox: 800 x 60 KB wait in the kernel, not here
        grown = me.memory_info().rss - before
        assert grown < LIMITS.max_parse + 8 * MiB, f"grew {grown / MiB:.0f} MiB"
        streams = 0
        while (item := await inbox.get(30)) is not None:
            _, msg = item
            streams += msg["msg_type"] == "stream"
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
    finally:
        k.channels.done(msg_id)
    assert streams == 800 and not k.told, (streams, k.told)


async def test_output_over_what_its_request_keeps_is_read_at_the_pace_not_stopped(kernels: list[Kernel]) -> None:
    k = await start(LIMITS)
    kernels.append(k)
    me = psutil.Process()
    before = me.memory_info().rss
    start_at = asyncio.get_running_loop().time()
    # 40 displays of 8 MiB, each signed anew: what a cell that displays 320 MiB sends
    got, inbox = await asyncio.wait_for(run(k, ATTACKS + "print(fresh('iopub', 40, display_bytes(8 * MiB), "
                                              "'display_data', _k.get_parent()))"), 120)
    took = asyncio.get_running_loop().time() - start_at
    assert not inbox.closed and not k.told, k.told
    notes = [m for _, m in got if m["msg_type"] == "display_data"]
    assert len(notes) == 40 and all("dropped unread" in m["content"]["data"]["text/plain"] for m in notes)
    assert text(got).strip() == "sent"
    assert me.memory_info().rss - before < LIMITS.max_parse + 16 * MiB
    assert took >= 320 / 256 * 0.9, f"320 MiB at the pace of 256 MiB/s took {took:.2f} s"


async def test_many_small_outputs_past_what_the_request_keeps_are_read_at_the_pace(kernels: list[Kernel]) -> None:
    k = await start(LIMITS)
    kernels.append(k)
    start_at = asyncio.get_running_loop().time()
    # 20,000 small outputs: the request's 4 MiB (at least 4 KiB a message) last 1,024 of them; the
    # rest come at the pace of 256 MiB/s, counted as 64 KiB each: 4,096 a second
    got, inbox = await asyncio.wait_for(run(k, ATTACKS + "print(fresh('iopub', 20_000, parent=_k.get_parent()))"), 120)
    took = asyncio.get_running_loop().time() - start_at
    assert not inbox.closed and not k.told, k.told
    assert sum(m["msg_type"] == "stream" for _, m in got) >= 20_000
    assert took >= 19_000 / 4096 * 0.9, f"took {took:.2f} s"
