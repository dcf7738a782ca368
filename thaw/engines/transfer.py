"""Moving one rank's tensors to and from its snapshot (thawd or the file), and what moved."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from thaw.daemon.values import known
from thaw.engines.fingerprints import without
from thaw.engines.options import Options
from thaw.engines.ranks import RankRef
from thaw.engines.sources import (
    Source,
    SourceKind,
    check_before_copy,
    client_for,
    locate,
    missing_message,
)
from thaw.errors import SnapshotMissing
from thaw.format.fingerprint import Fingerprint

if TYPE_CHECKING:
    from thaw.daemon.client import Client


@dataclasses.dataclass(frozen=True)
class RankTransfer:
    """What one rank moved."""

    rank: int
    snapshot: str
    source: str  # thawd | file | checkpoint (freeze_on_miss) | engine
    tier: str  # pinned | warm | cold | file | ""
    bytes: int
    seconds: float
    content_id: str = ""  # what the rank holds now (thaw.engines.weights), "" when not known

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EngineTransfer:
    """A restore or freeze across all ranks of an engine."""

    snapshot: str
    ranks: tuple[RankTransfer, ...]
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.ranks)

    @property
    def tier(self) -> str:
        tiers = {r.tier for r in self.ranks}
        return tiers.pop() if len(tiers) == 1 else ",".join(sorted(tiers))

    @property
    def paths(self) -> list[str]:
        return [r.snapshot for r in self.ranks]

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def read_rank(
    named: Sequence[tuple[str, Any]],
    ref: RankRef,
    options: Options,
    expect: Fingerprint,
    rank: int,
    source: Source | None = None,
    client: Client | None = None,
) -> RankTransfer:
    """Restore `named` (this rank's tensors) from its snapshot; fingerprint checked first."""
    if source is None:
        source, client = locate(ref, options)
    if source.kind == SourceKind.MISSING:
        raise SnapshotMissing(missing_message(ref, options, daemon_running=client is not None))
    check_before_copy(source, expect, options)
    started = time.perf_counter()
    fp = without(expect, options.ignore)
    if source.kind == SourceKind.THAWD:
        assert client is not None
        result = client.restore_tensors(list(named), source.name, expect=fp)
        return RankTransfer(
            rank,
            source.name,
            "thawd",
            result.tier,
            result.bytes,
            time.perf_counter() - started,
            result.content_id,
        )
    from thaw.copy.restore import restore_file

    stats = restore_file(list(named), source.path, expect=fp, verify=options.verify)
    return RankTransfer(
        rank,
        source.path,
        "file",
        "file",
        stats.bytes,
        time.perf_counter() - started,
        stats.content_id,
    )


def write_rank(
    named: Sequence[tuple[str, Any]],
    ref: RankRef,
    options: Options,
    fingerprint: Fingerprint,
    rank: int,
    source_kind: str = "engine",
) -> RankTransfer:
    """Freeze `named` to the rank's snapshot: into thawd under its name (written behind to
    `path`, or the daemon's state directory) when a name is given and thawd runs, else to
    the file."""
    started = time.perf_counter()
    client = client_for(options) if ref.name else None
    if ref.name and client is not None:
        record = client.freeze_tensors(
            list(named), ref.name, ref.path or None, fingerprint, pin=options.pin, wait=True
        )
        content_id = known(record.content_id) or ""
        return RankTransfer(
            rank,
            ref.name,
            source_kind,
            record.tier,
            record.size_bytes,
            time.perf_counter() - started,
            content_id,
        )
    if not ref.path:
        raise SnapshotMissing(
            f"cannot freeze {ref.name!r}: thawd is not running and no file was given "
            '(pass "path": "/snapshots/NAME.thaw", or start thawd)'
        )
    from thaw.copy.freeze import freeze_file

    stats = freeze_file(list(named), ref.path, fingerprint=fingerprint)
    return RankTransfer(
        rank,
        ref.path,
        source_kind,
        "file",
        stats.bytes,
        time.perf_counter() - started,
        stats.content_id,
    )
