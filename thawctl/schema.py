"""The --json documents of thawctl, built from thaw.client's records.

This module is the schema: docs/THAWCTL.md lists these keys and tests/thawctl checks them.
Keys are only ever added. A value thawd did not know (the client's `NA`) is JSON null; sizes
are integer bytes; times are float unix seconds; tiers and states are lowercase words.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1


def known(value: Any) -> Any:
    """None for the client's `NA` (a value thawd did not know), the value otherwise.

    NA is falsy but not None: `known()` turns it into JSON null and into "-" in tables, and
    keeps a real 0 a 0.
    """
    from thaw.daemon import records

    return records.known(value)


def snapshot(r: Any) -> dict[str, Any]:
    """A thaw.daemon.records.SnapshotRecord."""
    fingerprint = known(r.fingerprint)
    return {
        "name": r.name,
        "path": r.path,
        "labels": dict(r.labels),
        "tier": r.tier,
        "wanted_tier": r.wanted_tier,
        "size_bytes": r.size_bytes,
        "file_bytes": known(r.file_bytes),
        "resident_bytes": r.resident_bytes,
        "resident_fraction": round(r.resident_fraction, 6),
        "clients": r.clients,
        "restores": r.restores,
        "last_restore_unix": known(r.last_used),
        "registered_unix": r.registered or None,
        "checksum_state": r.checksum_state,
        "tensor_count": r.tensor_count,
        "fingerprint": fingerprint.to_json() if fingerprint is not None else None,
        "error": r.error or None,
        "file_pending": r.file_pending,
        "owner_uid": r.owner_uid,
        "content_id": known(r.content_id),
    }


def gpu(g: Any) -> dict[str, Any]:
    return {
        "index": g.index,
        "name": g.name,
        "memory_total_bytes": g.memory_total,
        "memory_used_bytes": known(g.memory_used),
        "link": known(g.link),
    }


def session(s: Any) -> dict[str, Any]:
    """A thaw.daemon.records.SessionRecord."""
    return {
        "kind": s.kind,
        "snapshot": s.snapshot,
        "pid": s.pid,
        "uid": s.uid,
        "bytes": s.bytes,
        "started_unix": s.started,
        "seconds": s.seconds,
        "open": s.open,
        "ok": s.ok,
        "gbps": known(s.gbps),
        "delivery": known(s.delivery),
    }


def status(s: Any) -> dict[str, Any]:
    """A thaw.daemon.records.DaemonStatus."""
    return {
        "version": s.version,
        "api_version": s.api_version,
        "pid": s.pid,
        "started_unix": s.started,
        "uptime_s": s.uptime_s,
        "socket": s.socket,
        "pool_kind": s.pool_kind,
        "memory_locked": s.memory_locked,
        "share_pool": s.share_pool,
        "pinned": {"budget_bytes": s.pinned_budget, "used_bytes": s.pinned_used},
        "warm": {"budget_bytes": s.warm_budget, "used_bytes": s.warm_used},
        "host_memory": {
            "total_bytes": s.host_memory_total,
            "available_bytes": s.host_memory_available,
        },
        "gpus": [gpu(g) for g in s.gpus],
        "snapshots": s.snapshots,
        "active_restores": s.active_restores,
        "active_freezes": s.active_freezes,
        "restores_total": s.restores_total,
        "bytes_restored_total": s.bytes_restored_total,
    }


def pin_result(r: Any, seconds: float, moved: int) -> dict[str, Any]:
    return {"snapshot": snapshot(r), "seconds": round(seconds, 6), "bytes": moved}


def transfer(stats: Any) -> dict[str, Any]:
    """A thaw.copy.restore.TransferStats (freeze and restore timings)."""
    return {
        "bytes": stats.bytes,
        "seconds": round(stats.seconds, 6),
        "gbps": round(stats.gbps, 4) if stats.seconds > 0 else None,
        "source": stats.source,
    }
