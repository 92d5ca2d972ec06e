from __future__ import annotations

import pytest

from sandbox import Limits, parse_memory


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("2G", 2 << 30),
        ("1.5GiB", 3 << 29),
        ("1073741824", 1073741824),
        ("64 MiB", 64 << 20),
        ("100MB", 100 << 20),
        ("1k", 1024),
        ("1T", 1 << 40),
        (" 8G ", 8 << 30),
        ("10B", 10),
    ],
)
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12X", "-1G", "0", "0M", "1.5.2G", "G", "iB", "5iB", "1 G B", "1e9"])
def test_parse_memory_rejects_junk_with_a_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_memory(text)


def test_limits_defaults_are_unlimited() -> None:
    limits = Limits()
    assert (limits.memory_bytes, limits.cpus, limits.pids) == (None, None, None)
    assert limits.cpu_quota_us() is None


def test_limits_cpu_quota() -> None:
    assert Limits(cpus=1.5).cpu_quota_us() == 150_000
    assert Limits(cpus=0.25).cpu_quota_us(period_us=50_000) == 12_500
    assert Limits(cpus=0.001).cpu_quota_us() == 1_000  # the kernel's minimum


@pytest.mark.parametrize("kwargs", [{"memory_bytes": 0}, {"cpus": 0}, {"cpus": float("inf")}, {"pids": -1}])
def test_limits_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)  # type: ignore[arg-type]
