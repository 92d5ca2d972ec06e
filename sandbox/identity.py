"""Who a sandboxed process runs as."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """A Unix account a kernel runs as.

    Built by kernelpool's user service from its store; consumed by `accounts.ensure_account`
    (to create the passwd entry) and by `launcher.spawn` (to drop to it).
    """

    name: str  # account name, e.g. "kp-alice"
    uid: int
    gid: int
    home: str  # absolute path

    def __post_init__(self) -> None:
        # uid/gid 0 would make the "sandbox" a no-op; refuse it here rather than in every caller
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError(f"identity {self.name!r}: uid and gid must be positive (got {self.uid}/{self.gid})")
        if not self.home.startswith("/"):
            raise ValueError(f"identity {self.name!r}: home must be an absolute path (got {self.home!r})")
