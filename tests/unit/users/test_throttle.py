"""Failed logins back off per client address; a proxy's forwarded address counts only from a trusted proxy."""

from __future__ import annotations

from kernelpool.users.throttle import AuthThrottle


def test_auth_throttle_backs_off_per_address_and_honours_trusted_proxies() -> None:
    now = [0.0]
    t = AuthThrottle(limit=3, window=10, backoff=5, trusted_proxies=["10.0.0.0/8"], clock=lambda: now[0])
    direct = {"client": ("203.0.113.5", 1), "headers": [(b"x-forwarded-for", b"1.2.3.4")]}
    assert t.client_address(direct) == "203.0.113.5", "X-Forwarded-For from an untrusted peer is ignored"
    proxied = {"client": ("10.1.1.1", 1), "headers": [(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4, 10.2.2.2")]}
    assert t.client_address(proxied) == "1.2.3.4", "the right-most hop that is not a trusted proxy"
    for _ in range(2):
        t.failed("1.2.3.4", "bad")
    assert t.retry_after("1.2.3.4") == 0
    t.failed("1.2.3.4", "bad")
    assert t.retry_after("1.2.3.4") == 5 and t.retry_after("203.0.113.5") == 0
    now[0] = 5.1
    assert t.retry_after("1.2.3.4") == 0
    now[0] = 30
    t.failed("1.2.3.4", "bad")
    assert t.retry_after("1.2.3.4") == 0, "old failures fall out of the window"
