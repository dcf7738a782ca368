"""The small values in thawd's answers: `NA`, tiers, checksum states, pool kinds, deliveries,
and a restore's result. thaw.daemon.records re-exports them beside the bigger records.

Apart from those records so that a restore, the one call of an engine's start, imports no
record it does not return: their dataclasses cost a new process 14 ms to define (H200 host).
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from typing import Final, TypeVar

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)


class NotAvailable:
    """The type of `NA`: the value of a field the daemon did not know. Falsy, prints as "NA"."""

    _instance: NotAvailable | None = None

    def __new__(cls) -> NotAvailable:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NA"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "NA"


NA: Final = NotAvailable()

T = TypeVar("T")


def known(value: T | NotAvailable) -> T | None:
    """None for NA, the value otherwise (a real 0 stays 0)."""
    return None if isinstance(value, NotAvailable) else value


class Tier(StrEnum):
    """Where a snapshot's bytes are: on disk only, in the page cache, in the pinned pool."""

    COLD = "cold"
    WARM = "warm"
    PINNED = "pinned"


class ChecksumState(StrEnum):
    UNVERIFIED = "unverified"
    VERIFIED = "verified"
    CORRUPT = "corrupt"


class PoolKind(StrEnum):
    """What memory a restore reads: thawd's pool (memfd or VMM host memory), or the
    registered file (a snapshot that is not pinned)."""

    MEMFD = "memfd"
    VMM = "vmm"
    FILE = "file"


class Delivery(StrEnum):
    """How a restore's bytes came (docs/DAEMON.md, "Deliveries")."""

    POOL = "pool"  # this process maps thawd's whole pool
    MAPPED = "mapped"  # an earlier restore mapped the buffer
    FDS = "fds"  # the buffer's fds were handed over now
    FILE = "file"  # not pinned: the snapshot file, read with pread and verified here
    DAEMON_COPY = "daemon_copy"  # thawd copied into our GPU memory (CUDA IPC)


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    name: str
    tier: Tier
    bytes: int
    seconds: float
    delivery: Delivery | None = None  # how the bytes came
    content_id: str = ""  # the restored payload's identity (thaw.format.Manifest.content_id)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")
