"""One user working against everyone else: floods of sessions, output, results and bad tokens,
kernels at the cap, and (when asked) a kernel that fills the data folder's disk.

    python -m benchmarks.misbehave --url URL --token TOKEN [--duration 60] [--fill] [--bad-address IP]

Used by tests/test_starve.py (as a separate process, paused and resumed with SIGSTOP/SIGCONT to
interleave loaded and idle samples of another user's latency) and by `benchmarks/soak.py
--misbehave`. It prints a JSON summary of what the server answered; it never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections import Counter
from typing import Any

import httpx2

from testkit.client import mcp_client

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "misbehave", "version": "0"}}}

FILL = """
import os, time
fd = os.open('fill.bin', os.O_WRONLY | os.O_CREAT, 0o600)
for size in (1 << 20, 1 << 12):
    try:
        while True:
            os.write(fd, b'x' * size)
    except OSError:
        pass
os.close(fd)
time.sleep(%(hold)s)
os.unlink('fill.bin')
print('filled and freed')
"""


class Misbehaver:
    def __init__(self, url: str, token: str, bad_address: str | None = None, *, fill: bool = False,
                 fill_hold: float = 5.0) -> None:
        self.url = url
        self.token = token
        self.bad_address = bad_address
        self.fill = fill
        self.fill_hold = fill_hold
        self.counts: Counter[str] = Counter()
        self.held_sessions: list[str] = []
        self._stopped = False

    def stop(self) -> None:
        """End every loop after its current call (a SIGTERM handler calls this)."""
        self._stopped = True

    def _going(self, stop_at: float) -> bool:
        return not self._stopped and time.monotonic() < stop_at

    def _headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}", "Accept": "application/json, text/event-stream",
                "Content-Type": "application/json"}

    async def setup(self, kernels: int = 3) -> None:
        """Take `kernels` kernels (the per-user cap when it is that), with notebooks k0..k{n-1}."""
        async with mcp_client(self.url, self.token, mode="auto") as c:
            for i in range(kernels):
                r = await c.call_tool("use_notebook", {"notebook": f"k{i}.ipynb", "mode": "create"})
                self.counts["setup_kernel_" + ("refused" if r.is_error else "ok")] += 1

    async def run(self, duration: float) -> dict[str, Any]:
        stop_at = time.monotonic() + duration
        loops = [self._sessions(stop_at), self._output(stop_at, "k0.ipynb", "print('y' * 3_000_000)"),
                 self._output(stop_at, "k1.ipynb", "display({'text/plain': 'z' * 20_000_000, "
                                                   "'text/html': 'h' * 5_000_000}, raw=True)"),
                 self._results(stop_at), self._kernels(stop_at)]
        if self.bad_address:
            loops.append(self._bad_tokens(stop_at))
        if self.fill:
            loops.append(self._fill(stop_at))
        await asyncio.gather(*loops)
        return dict(self.counts)

    async def _sessions(self, stop_at: float) -> None:
        # open sessions and never close them: past the per-user cap each attempt is refused
        async with httpx2.AsyncClient(timeout=60) as http:
            while self._going(stop_at):
                with contextlib.suppress(httpx2.HTTPError):
                    r = await http.post(self.url, json=INIT, headers=self._headers())
                    self.counts[f"session_{r.status_code}"] += 1
                    if r.status_code == 200:
                        self.held_sessions.append(r.headers["mcp-session-id"])
                await asyncio.sleep(0.05)

    async def _output(self, stop_at: float, notebook: str, code: str) -> None:
        async with mcp_client(self.url, self.token, mode="auto") as c:
            while self._going(stop_at):
                with contextlib.suppress(Exception):
                    r = await c.call_tool("execute_code", {"notebook": notebook, "code": code, "timeout": 60})
                    self.counts["output_" + ("error" if r.is_error else "ok")] += 1
                await asyncio.sleep(0.1)

    async def _results(self, stop_at: float) -> None:
        # background results never fetched: past max_result_bytes_per_user the oldest are dropped
        async with mcp_client(self.url, self.token, mode="auto") as c:
            while self._going(stop_at):
                with contextlib.suppress(Exception):
                    r = await c.call_tool("execute_code", {"notebook": "k2.ipynb", "background": True,
                                                           "code": "print('r' * 2_000_000)"})
                    self.counts["background_" + ("refused" if r.is_error else "started")] += 1
                await asyncio.sleep(0.2)

    async def _kernels(self, stop_at: float) -> None:
        async with mcp_client(self.url, self.token, mode="auto") as c:
            n = 0
            while self._going(stop_at):
                with contextlib.suppress(Exception):
                    r = await c.call_tool("use_notebook", {"notebook": f"extra{n % 3}.ipynb",
                                                           "mode": "create" if n < 3 else "connect"})
                    self.counts["kernel_" + ("refused" if r.is_error else "ok")] += 1
                n += 1
                await asyncio.sleep(0.3)

    async def _bad_tokens(self, stop_at: float) -> None:
        assert self.bad_address is not None
        headers = self._headers(f"kp_bad_{random.randrange(10**9)}") | {"X-Forwarded-For": self.bad_address}
        async with httpx2.AsyncClient(timeout=60) as http:
            while self._going(stop_at):
                with contextlib.suppress(httpx2.HTTPError):
                    r = await http.post(self.url, json=INIT, headers=headers)
                    self.counts[f"bad_token_{r.status_code}"] += 1
                await asyncio.sleep(0.02)

    async def _fill(self, stop_at: float) -> None:
        async with mcp_client(self.url, self.token, mode="auto") as c:
            await c.call_tool("use_notebook", {"notebook": "k0.ipynb"})
            while self._going(stop_at):
                with contextlib.suppress(Exception):
                    r = await c.call_tool("execute_code", {"notebook": "k0.ipynb", "timeout": 300,
                                                           "code": FILL % {"hold": self.fill_hold}})
                    self.counts["fill_" + ("error" if r.is_error else "ok")] += 1
                await asyncio.sleep(self.fill_hold)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--kernels", type=int, default=3, help="kernels to take first (notebooks k0..)")
    p.add_argument("--bad-address", help="X-Forwarded-For of the bad-token flood (the server must trust us as a proxy)")
    p.add_argument("--fill", action="store_true", help="a kernel fills the data folder's disk, holds, frees; repeat")
    args = p.parse_args()
    logging.getLogger("mcp").setLevel(logging.CRITICAL)
    m = Misbehaver(args.url, args.token, args.bad_address, fill=args.fill)

    async def go() -> None:
        # SIGTERM ends the loops after their current call, and the summary is still printed
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, m.stop)
        await m.setup(args.kernels)
        print("ready", flush=True)
        await m.run(args.duration)

    try:
        asyncio.run(go())
    finally:
        print(json.dumps(dict(m.counts)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
