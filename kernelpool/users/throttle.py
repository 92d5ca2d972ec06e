"""Failed authentication, throttled per client address, and logged at a bounded rate.

After `limit` failures from one address within `window` seconds, that address is answered 429
with `Retry-After` for `backoff` seconds, unless a request carries a valid token: the app checks
the token before refusing, so a legitimate client behind the same address is never held up.
The client address is the peer's, or, when the peer is one of `trusted_proxies`, the right-most
`X-Forwarded-For` entry that is not itself a trusted proxy. Callers: the app's auth guard.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

_MAX_ADDRESSES = 100_000  # addresses tracked at once; the least recently failed are forgotten first
_LOG_LINES_PER_WINDOW = 20  # failure log lines per window, all addresses together


class AuthThrottle:
    def __init__(self, limit: int, window: float, backoff: float, trusted_proxies: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._window = window
        self._backoff = backoff
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: dict[str, float] = {}
        self._log_window_start = clock()
        self._log_lines = 0
        self._log_suppressed = 0

    def client_address(self, scope: Mapping[str, Any]) -> str:
        peer = (scope.get("client") or ("unknown", 0))[0]
        if not self._is_trusted(peer):
            return str(peer)
        forwarded: list[str] = []
        for name, value in scope.get("headers", []):
            if name == b"x-forwarded-for":
                forwarded += [part.strip() for part in value.decode("latin-1").split(",") if part.strip()]
        for hop in reversed(forwarded):
            if not self._is_trusted(hop):
                return hop
        return forwarded[0] if forwarded else str(peer)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def retry_after(self, address: str) -> float:
        """Seconds this address is still held back (0 = not held back)."""
        until = self._blocked_until.get(address)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._blocked_until[address]
            return 0.0
        return left

    def failed(self, address: str, reason: str) -> None:
        """Count one failed authentication from `address` (and log it, within the log budget)."""
        now = self._clock()
        times = self._failures.pop(address, None) or deque()
        self._failures[address] = times  # most recent failure last
        times.append(now)
        while times and times[0] < now - self._window:
            times.popleft()
        if len(times) >= self._limit and address not in self._blocked_until:
            self._blocked_until[address] = now + self._backoff
            self._log(now, f"authentication failed {len(times)} times from {address} within {self._window:g} s: "
                           f"answering 429 for {self._backoff:g} s (a valid token still passes)")
        else:
            self._log(now, f"authentication failed from {address} ({reason})")
        while len(self._failures) > _MAX_ADDRESSES:
            old, _ = self._failures.popitem(last=False)
            self._blocked_until.pop(old, None)

    def refused(self, address: str) -> None:
        """A request refused with 429: counted for the log only."""
        self._log(self._clock(), f"authentication refused from {address}: backing off")

    def _log(self, now: float, line: str) -> None:
        if now - self._log_window_start >= self._window:
            if self._log_suppressed:
                log.warning("%d authentication failure log lines suppressed in the last %g s",
                            self._log_suppressed, now - self._log_window_start)
            self._log_window_start, self._log_lines, self._log_suppressed = now, 0, 0
        if self._log_lines < _LOG_LINES_PER_WINDOW:
            self._log_lines += 1
            log.info("%s", line)
        else:
            self._log_suppressed += 1
