"""Resource limits for a cgroup, and the parser for human-written memory sizes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

# CFS period used for every cgroup we create (the kernel default); quotas are relative to it
CPU_PERIOD_US = 100_000
# the kernel refuses quotas below 1 ms
_MIN_QUOTA_US = 1_000


@dataclass(frozen=True)
class Limits:
    """Limits for one cgroup; None means "no limit" ("max" in v2, -1 in v1).

    Built by kernelpool from settings (per kernel and per user aggregate) and passed to
    `CgroupBackend.create`.
    """

    memory_bytes: int | None = None
    cpus: float | None = None  # 1.5 = one and a half cores (CFS quota/period)
    pids: int | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"memory limit must be positive, got {self.memory_bytes}")
        if self.cpus is not None and not (self.cpus > 0 and math.isfinite(self.cpus)):
            raise ValueError(f"cpu limit must be a positive number of cores, got {self.cpus}")
        if self.pids is not None and self.pids <= 0:
            raise ValueError(f"pids limit must be positive, got {self.pids}")

    def cpu_quota_us(self, *, period_us: int = CPU_PERIOD_US) -> int | None:
        """CFS quota in microseconds per `period_us`, or None for no limit."""
        if self.cpus is None:
            return None
        return max(_MIN_QUOTA_US, round(self.cpus * period_us))


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """Parse a memory size such as "512M", "2G", "1.5GiB" or "1073741824" into bytes.

    Units are binary whatever the spelling (M = MB = MiB = 2**20), as in Docker's --memory.
    Called by kernelpool's configuration and CLI. Raises ValueError on anything else.
    """
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid memory size {text!r}: expected a number with an optional unit "
            "K, M, G or T (binary; e.g. 512M, 2G, 1.5GiB, 1073741824)"
        )
    number, unit, suffix = match.groups()
    if suffix and suffix.lower() == "ib" and not unit:
        raise ValueError(f"invalid memory size {text!r}: 'iB' needs a unit before it (KiB, MiB, GiB, TiB)")
    # Decimal, not float: "1073741824" and "1.1G" must come out exact
    value = int(Decimal(number) * _UNITS[unit.lower()])
    if value <= 0:
        raise ValueError(f"invalid memory size {text!r}: must be more than 0 bytes")
    return value
