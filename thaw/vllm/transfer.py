"""Moving one rank's tensors to and from its snapshot (thawd or file). No vllm import."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from thaw.errors import DaemonUnavailable
from thaw.format.fingerprint import Fingerprint, check
from thaw.vllm.common import (
    Options,
    RankRef,
    RankTransfer,
    SnapshotMissing,
    Source,
    connect_daemon,
    find_source,
    missing_message,
    without,
)

_CLIENTS: dict[str, Any] = {}


def client_for(options: Options) -> Any:
    """One thawd client per socket and process: its pool mappings are reused by later restores."""
    if options.daemon == "never":
        return None
    key = options.socket or ""
    client = _CLIENTS.get(key)
    if client is None:
        client = connect_daemon(options)
        if client is not None:
            _CLIENTS[key] = client
    return client


def locate(ref: RankRef, options: Options) -> tuple[Source, Any]:
    """The source of a rank's snapshot and the client to use for it (None: the file).

    A thawd that went away since this process connected is forgotten and asked for again:
    with daemon="auto" and no thawd running, a file given is read instead (daemon="require"
    raises DaemonUnavailable)."""
    client = client_for(options)
    try:
        source = find_source(ref, client)
    except DaemonUnavailable:
        stale = _CLIENTS.pop(options.socket or "", None)
        if stale is not None:
            with contextlib.suppress(Exception):  # its sockets are dead already
                stale.close()
        client = client_for(options)
        source = find_source(ref, client)
    return source, client


def check_before_copy(source: Source, expect: Fingerprint, options: Options) -> None:
    """FingerprintMismatch naming each difference, raised before a byte moves."""
    if source.fingerprint is not None:
        check(without(expect, options.ignore), source.fingerprint)


def read_rank(
    named: Sequence[tuple[str, Any]],
    ref: RankRef,
    options: Options,
    expect: Fingerprint,
    rank: int,
    source: Source | None = None,
    client: Any = None,
) -> RankTransfer:
    """Restore `named` (this rank's tensors) from its snapshot; fingerprint checked first."""
    if source is None:
        source, client = locate(ref, options)
    if source.kind == "missing":
        raise SnapshotMissing(missing_message(ref, options, daemon_running=client is not None))
    check_before_copy(source, expect, options)
    started = time.perf_counter()
    fp = without(expect, options.ignore)
    if source.kind == "thawd":
        result = client.restore(list(named), source.name, expect=fp)
        return RankTransfer(rank, source.name, "thawd", result.tier, result.bytes,
                            time.perf_counter() - started, result.content_id)  # fmt: skip
    from thaw.copy.restore import restore_file

    stats = restore_file(list(named), source.path, expect=fp, verify=options.verify)
    return RankTransfer(rank, source.path, "file", "file", stats.bytes,
                        time.perf_counter() - started, stats.content_id)  # fmt: skip


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
        record = client.freeze(
            list(named), ref.name, ref.path or None, fingerprint, pin=options.pin, wait=True
        )
        return RankTransfer(rank, ref.name, source_kind, record.tier, record.size_bytes,
                            time.perf_counter() - started, record.content_id or "")  # fmt: skip
    if not ref.path:
        raise SnapshotMissing(
            f"cannot freeze {ref.name!r}: thawd is not running and no file was given "
            '(pass "path": "/snapshots/NAME.thaw", or start thawd)'
        )
    from thaw.copy.freeze import freeze_file

    stats = freeze_file(list(named), ref.path, fingerprint=fingerprint)
    return RankTransfer(rank, ref.path, source_kind, "file", stats.bytes,
                        time.perf_counter() - started, stats.content_id)  # fmt: skip

