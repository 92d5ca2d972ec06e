"""Free space of the data folder, and the floor below which the server stops writing there.

The server's own writes (notebooks, new kernels' files) are refused while free space is under
`disk_free_floor`, with an error that says so, rather than started and left half-written.
Kernels write to the same filesystem on their own and can still fill it; a write of the
server's that fails anyway leaves the previous file in place (writes are atomic). Callers: the
notebook service and the kernel registry (before each write or start), `/healthz` and `doctor`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernelpool.errors import DiskLow


@dataclass(frozen=True)
class DiskSpace:
    path: Path
    floor: int  # bytes; 0 = no floor

    def free(self) -> tuple[int, int]:
        """(bytes free to an unprivileged writer, total bytes) of the filesystem holding `path`."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def check(self, what: str) -> None:
        """Raise DiskLow when free space is under the floor; `what` names the refused action."""
        if self.floor <= 0:
            return
        free, _ = self.free()
        if free < self.floor:
            raise DiskLow(what, free, self.floor)

    def report(self) -> dict[str, Any]:
        free, total = self.free()
        return {"path": str(self.path), "free_bytes": free, "total_bytes": total, "floor_bytes": self.floor,
                "low": self.floor > 0 and free < self.floor}
