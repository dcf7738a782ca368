"""Where one rank's bytes come from: thawd (a registered name, and its tier) or the file, and
the thawd client that serves them; checked in the engine's own process before its workers
start, and again by each worker."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING

from thaw.daemon.values import StrEnum
from thaw.engines.fingerprints import without
from thaw.engines.options import Options
from thaw.engines.ranks import RankRef, absolute, resolve
from thaw.errors import DaemonUnavailable, NotFound, SnapshotMissing
from thaw.format.fingerprint import Fingerprint, check

if TYPE_CHECKING:
    from thaw.daemon.client import Client


class SourceKind(StrEnum):
    THAWD = "thawd"  # thawd holds it (by name, or a registered file by path)
    FILE = "file"  # the snapshot file, read here
    MISSING = "missing"  # neither


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one rank's bytes come from: thawd (a name, and its tier) or a file."""

    kind: SourceKind
    name: str = ""
    path: str = ""
    tier: str = ""
    fingerprint: Fingerprint | None = None


def connect_daemon(options: Options) -> Client | None:
    """A thawd client, or None where the daemon is not running and daemon != "require"."""
    if options.daemon == "never":
        return None
    from thaw.daemon.client import connect

    try:
        return connect(options.socket or None)
    except DaemonUnavailable:
        if options.daemon == "require":
            raise
        return None


# One thawd client per socket and process: its pool mappings are reused by later restores.
_CLIENTS: dict[str, Client] = {}


def client_for(options: Options) -> Client | None:
    """This process's thawd client for `options.socket` (None: daemon="never", or no thawd
    runs and daemon="auto")."""
    if options.daemon == "never":
        return None
    key = options.socket or ""
    client = _CLIENTS.get(key)
    if client is None:
        client = connect_daemon(options)
        if client is not None:
            _CLIENTS[key] = client
    return client


def locate(
    ref: RankRef, options: Options, client: Client | None = None
) -> tuple[Source, Client | None]:
    """The source of a rank's snapshot and the client to use for it (None: the file).

    Without `client`, this process's own (client_for): a thawd that went away since this
    process connected is forgotten and asked for again, so with daemon="auto" and no thawd
    running a file given is read instead (daemon="require" raises DaemonUnavailable)."""
    if client is not None:
        return find_source(ref, client), client
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


def find_source(ref: RankRef, client: Client | None) -> Source:
    """thawd when it holds the snapshot (by name, or a registered file by path), else the file."""
    from thaw.format import open_snapshot

    if client is not None:
        record = None
        if ref.name:
            try:
                record = client.stat(ref.name)
            except NotFound:
                record = None
        elif ref.path:
            record = next((r for r in client.list() if absolute(r.path) == ref.path), None)
        if record is not None and not record.error:
            fp = record.fingerprint if isinstance(record.fingerprint, Fingerprint) else None
            return Source(SourceKind.THAWD, record.name, record.path, record.tier, fp)
    if ref.path and os.path.exists(ref.path):
        fp = open_snapshot(ref.path).fingerprint
        return Source(SourceKind.FILE, "", ref.path, "file", fp)
    return Source(SourceKind.MISSING, ref.name, ref.path)


def check_before_copy(source: Source, expect: Fingerprint, options: Options) -> None:
    """FingerprintMismatch naming each difference, raised before a byte moves."""
    if source.fingerprint is not None:
        check(without(expect, options.ignore), source.fingerprint)


def missing_message(ref: RankRef, options: Options, daemon_running: bool) -> str:
    """Why a rank's snapshot was not found, and how to make it."""
    where = []
    if ref.name:
        if options.daemon == "never":
            where.append(f"{ref.name!r} is a thawd name but daemon='never'")
        elif daemon_running:
            where.append(f"thawd has no snapshot {ref.name!r}")
        else:
            from thaw.daemon.client import default_socket

            where.append(f"thawd is not running at {options.socket or default_socket()}")
    if ref.path:
        where.append(f"{ref.path} does not exist")
    elif ref.name:
        where.append('no "path" to fall back to')
    return (
        f"snapshot {ref.label!r} not found ({'; '.join(where)}): create it with "
        '"freeze_on_miss": true, `thawctl freeze --engine vllm`, or thaw.vllm.freeze(llm, ...)'
    )


# A parent process asks thawd once, before any engine process starts: a healthy thawd answers
# in milliseconds; a stuck one should not hold the engine's start for the client's 30 s.
PREFLIGHT_TIMEOUT_S = 5.0


def preflight(options: Options, tp_size: int) -> None:
    """Check that every rank's snapshot exists, in the process that creates the engine,
    before the engine starts its workers: there a failure would surface only as the engine's
    own start-up error. Raises SnapshotMissing or DaemonUnavailable (daemon="require").
    Fingerprints are checked later, by each worker, against its model."""
    if options.freeze_on_miss:
        return  # a missing snapshot is made, not refused
    client = None
    if options.daemon != "never":
        from thaw.daemon.client import Client, default_socket

        try:
            # Client, not connect(): this process restores nothing and maps no pool.
            client = Client(options.socket or default_socket(), timeout=PREFLIGHT_TIMEOUT_S)
        except DaemonUnavailable:
            if options.daemon == "require":
                raise
    try:
        for rank in range(tp_size):
            ref = resolve(options, rank, tp_size)
            if find_source(ref, client).kind == SourceKind.MISSING:
                raise SnapshotMissing(
                    (f"rank {rank}: " if tp_size > 1 else "")
                    + missing_message(ref, options, daemon_running=client is not None)
                )
    finally:
        if client is not None:
            client.close()
