"""What thawd answers, as immutable records: snapshots, the daemon's status, events, metrics,
pin progress, verify and restore results. Values the daemon did not know are the sentinel
`NA`, never None. The small values (NA, tiers, deliveries, RestoreResult) live in
thaw.daemon.values, and are re-exported here."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Final

from thaw._proto import thawd_pb2 as pb
from thaw.daemon.values import (
    NA,
    ChecksumState,
    Delivery,
    NotAvailable,
    PoolKind,
    RestoreResult,
    StrEnum,
    Tier,
    known,
)
from thaw.format.fingerprint import Fingerprint

__all__ = [
    "NA",
    "ChecksumState",
    "DaemonStatus",
    "Delivery",
    "Event",
    "GpuRecord",
    "Metrics",
    "NotAvailable",
    "PinProgress",
    "PoolKind",
    "RestoreResult",
    "SessionRecord",
    "SnapshotRecord",
    "StrEnum",
    "Tier",
    "VerifyResult",
    "known",
]


# thawd's enum values (wire API) as the records' values.
TIERS: Final = {pb.TIER_COLD: Tier.COLD, pb.TIER_WARM: Tier.WARM, pb.TIER_PINNED: Tier.PINNED}
CHECKSUM_STATES: Final = {
    pb.CHECKSUM_STATE_UNVERIFIED: ChecksumState.UNVERIFIED,
    pb.CHECKSUM_STATE_VERIFIED: ChecksumState.VERIFIED,
    pb.CHECKSUM_STATE_CORRUPT: ChecksumState.CORRUPT,
}
POOL_KINDS: Final = {
    pb.POOL_KIND_MEMFD: PoolKind.MEMFD,
    pb.POOL_KIND_VMM: PoolKind.VMM,
    pb.POOL_KIND_FILE: PoolKind.FILE,
}
DELIVERIES: Final = {
    pb.DELIVERY_POOL: Delivery.POOL,
    pb.DELIVERY_MAPPED: Delivery.MAPPED,
    pb.DELIVERY_FDS: Delivery.FDS,
}


@dataclasses.dataclass(frozen=True)
class SnapshotRecord:
    """One registered snapshot as the daemon saw it when asked."""

    name: str
    path: str
    labels: Mapping[str, str]
    tier: Tier  # where the bytes are now
    wanted_tier: Tier  # where the operator asked them to be
    size_bytes: int
    file_bytes: int | NotAvailable  # NA while a frozen snapshot is still being written
    resident_bytes: int
    last_used: float | NotAvailable  # unix time, NA if never restored
    clients: int
    restores: int
    checksum_state: ChecksumState
    fingerprint: Fingerprint | NotAvailable
    tensor_count: int
    registered: float
    error: str  # "" when none
    file_pending: bool
    owner_uid: int = -1  # who registered or froze it (they, root or thawd's admins change it)
    # 16 hex digits naming the payload's bytes (NA while unknown)
    content_id: str | NotAvailable = NA

    @property
    def resident_fraction(self) -> float:
        return self.resident_bytes / self.size_bytes if self.size_bytes else 1.0

    @classmethod
    def from_pb(cls, m: pb.Snapshot) -> SnapshotRecord:
        fingerprint: Fingerprint | NotAvailable
        try:
            fingerprint = Fingerprint.from_json(json.loads(m.fingerprint_json))
        except (ValueError, TypeError):
            fingerprint = NA
        return cls(
            name=m.name,
            path=m.path,
            labels=dict(m.labels),
            tier=TIERS.get(m.tier, Tier.COLD),
            wanted_tier=TIERS.get(m.wanted_tier, Tier.COLD),
            size_bytes=m.size_bytes,
            file_bytes=m.file_bytes if m.file_bytes or not m.file_pending else NA,
            resident_bytes=m.resident_bytes,
            last_used=m.last_used_unix or NA,
            clients=m.clients,
            restores=m.restores,
            checksum_state=CHECKSUM_STATES.get(m.checksum_state, ChecksumState.UNVERIFIED),
            fingerprint=fingerprint,
            tensor_count=m.tensor_count,
            registered=m.registered_unix,
            error=m.error,
            file_pending=m.file_pending,
            owner_uid=m.owner_uid,
            content_id=m.content_id or NA,
        )


@dataclasses.dataclass(frozen=True)
class GpuRecord:
    index: int
    name: str
    memory_total: int
    memory_used: int | NotAvailable
    link: str | NotAvailable


@dataclasses.dataclass(frozen=True)
class DaemonStatus:
    version: str
    api_version: str
    pid: int
    started: float
    uptime_s: float
    pool_kind: PoolKind  # memfd | vmm
    pinned_budget: int
    pinned_used: int
    warm_budget: int
    warm_used: int
    host_memory_total: int
    host_memory_available: int
    gpus: tuple[GpuRecord, ...]
    snapshots: int
    active_restores: int
    active_freezes: int
    restores_total: int
    bytes_restored_total: int
    memory_locked: bool
    socket: str
    share_pool: bool  # pool memory is handed to clients (false: CUDA IPC copies only)
    registry_unsaved: int = 0  # snapshots whose newest state is not on disk yet (retried)
    registry_error: str = ""  # the registry's write error while writes fail

    @classmethod
    def from_pb(cls, m: pb.DaemonStatus) -> DaemonStatus:
        gpus = tuple(
            GpuRecord(g.index, g.name, g.memory_total, g.memory_used or NA, g.link or NA)
            for g in m.gpus
        )
        return cls(
            version=m.version,
            api_version=m.api_version,
            pid=m.pid,
            started=m.started_unix,
            uptime_s=m.uptime_s,
            pool_kind=POOL_KINDS.get(m.pool_kind, PoolKind.MEMFD),
            pinned_budget=m.pinned_budget,
            pinned_used=m.pinned_used,
            warm_budget=m.warm_budget,
            warm_used=m.warm_used,
            host_memory_total=m.host_memory_total,
            host_memory_available=m.host_memory_available,
            gpus=gpus,
            snapshots=m.snapshots,
            active_restores=m.active_restores,
            active_freezes=m.active_freezes,
            restores_total=m.restores_total,
            bytes_restored_total=m.bytes_restored_total,
            memory_locked=m.memory_locked,
            socket=m.socket,
            share_pool=m.share_pool,
            registry_unsaved=m.registry_unsaved,
            registry_error=m.registry_error,
        )


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened in the daemon (see the kinds in proto/thaw/v1/thawd.proto)."""

    time: float
    kind: str
    snapshot: str | NotAvailable
    message: str
    bytes: int
    duration_s: float


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    """A restore or freeze session: open now, or one of the latest ended (thawd keeps 64)."""

    kind: str  # restore | freeze
    snapshot: str
    pid: int
    uid: int
    bytes: int  # open: the snapshot's payload; ended: what the client copied
    started: float  # unix time
    seconds: float  # open: so far; ended: as the client reported it
    open: bool
    ok: bool  # ended: confirmed (False: failed); always False while open
    delivery: Delivery | NotAvailable

    @property
    def gbps(self) -> float | NotAvailable:
        """The rate of an ended session; NA while open (thawd sees no progress)."""
        if self.open or self.seconds <= 0:
            return NA
        return self.bytes / self.seconds / 1e9

    @classmethod
    def from_pb(cls, m: pb.SessionInfo) -> SessionRecord:
        delivery = DELIVERIES.get(m.delivery, NA)
        if m.delivery == pb.DELIVERY_DAEMON_COPY:
            delivery = Delivery.DAEMON_COPY
        return cls(m.kind, m.snapshot, m.pid, m.uid, m.bytes, m.started_unix, m.duration_s,
                   m.open, m.ok, delivery)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Metrics:
    """The periodic picture of the daemon on the watch stream."""

    time: float
    status: DaemonStatus
    snapshots: tuple[SnapshotRecord, ...]
    restore_bytes_per_s: float
    sessions: tuple[SessionRecord, ...] = ()  # as Client.sessions()


@dataclasses.dataclass(frozen=True)
class PinProgress:
    done_bytes: int
    total_bytes: int
    elapsed_s: float
    done: bool
    snapshot: SnapshotRecord | NotAvailable  # set on the last message

    @property
    def gbps(self) -> float:
        return self.done_bytes / self.elapsed_s / 1e9 if self.elapsed_s > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    snapshot: SnapshotRecord
    bytes: int
    seconds: float
    source: str  # "pool" or "file": where the daemon read the bytes it hashed
