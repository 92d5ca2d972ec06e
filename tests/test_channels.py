"""The per-channel readers against a real ipykernel: routing by request, signatures, big outputs."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator

import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import DELIM, Session

from kernelpool.kernels.channels import KernelChannels, parse


@pytest.fixture
async def kernel() -> AsyncIterator[tuple[AsyncKernelManager, object]]:
    manager = AsyncKernelManager(kernel_name="python3")
    manager.kernel_spec.argv[0] = sys.executable  # this venv's ipykernel
    await manager.start_kernel()
    client = manager.client()
    client.start_channels(hb=False)
    try:
        await client.wait_for_ready(timeout=60)
        yield manager, client
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(now=True)


async def _answers(channels: KernelChannels, client: object, code: str) -> list[tuple[str, dict]]:
    msg_id = client.execute(code)  # type: ignore[attr-defined]
    inbox = channels.listen(msg_id)
    got = []
    idle = reply = False
    while not (idle and reply):
        item = await inbox.get(10)
        assert item is not None, f"no answer within 10 s; so far {got}"
        got.append(item)
        channel, msg = item
        assert msg["parent_header"]["msg_id"] == msg_id
        idle = idle or (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle")
        reply = reply or (channel == "shell" and msg["msg_type"] == "execute_reply")
    channels.done(msg_id)
    return got


async def test_each_request_gets_its_own_answers(kernel: tuple[AsyncKernelManager, object]) -> None:
    _, client = kernel
    channels = KernelChannels(client.session, client.iopub_channel.socket, client.shell_channel.socket)  # type: ignore[attr-defined]
    try:
        silent = client.execute("x = 1", silent=True)  # type: ignore[attr-defined]  # nobody listens: dropped
        got = await _answers(channels, client, "print('hi'); 6*7")
        assert silent not in {m["parent_header"]["msg_id"] for _, m in got}
        kinds = [(c, m["msg_type"]) for c, m in got]
        assert ("iopub", "stream") in kinds and ("iopub", "execute_result") in kinds and ("shell", "execute_reply") in kinds
        result = next(m for _, m in got if m["msg_type"] == "execute_result")
        assert result["content"]["data"]["text/plain"] == "42"
        assert isinstance(result["header"]["date"], str), "header dates are left unparsed"
        again = await _answers(channels, client, "x + 1")
        assert next(m for _, m in again if m["msg_type"] == "execute_result")["content"]["data"]["text/plain"] == "2"
    finally:
        await channels.close()


async def test_a_big_output_is_replaced_unparsed(kernel: tuple[AsyncKernelManager, object]) -> None:
    _, client = kernel
    channels = KernelChannels(client.session, client.iopub_channel.socket, client.shell_channel.socket,  # type: ignore[attr-defined]
                              max_bytes=100_000)
    try:
        got = await _answers(channels, client, "import sys; sys.stdout.write('a' * 1_000_000 + 'END'); sys.stdout.flush()")
        text = "".join(m["content"]["text"] for _, m in got if m["msg_type"] == "stream")
        assert len(text) < 100_000 and text.startswith("a") and text.endswith("END") and "dropped unread" in text
    finally:
        await channels.close()


def test_unsigned_and_forged_messages_are_refused() -> None:
    session = Session(key=b"secret")
    msg = session.msg("stream", {"name": "stdout", "text": "x"})
    frames = session.serialize(msg)
    assert parse(session, frames)["content"] == {"name": "stdout", "text": "x"}
    forged = list(frames)
    forged[frames.index(DELIM) + 5] = json.dumps({"name": "stdout", "text": "forged"}).encode()
    with pytest.raises(ValueError, match="signature"):
        parse(session, forged)
    other = Session(key=b"other").serialize(msg)
    with pytest.raises(ValueError, match="signature"):
        parse(session, other)
    with pytest.raises(ValueError):
        parse(session, frames[:3])
