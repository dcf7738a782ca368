"""The client of thawd: records, pins, and restores and freezes of tensors.

    from thaw.daemon.client import connect     # thaw.connect() adds engines on top
    c = connect()                      # $THAW_SOCKET, /run/thawd/thawd.sock, $XDG_RUNTIME_DIR/thawd
    c.pin("llama8b", progress=print)
    c.restore_tensors(model, "llama8b")   # checks names, dtypes, shapes before a byte moves

A Client is one Connection (gRPC and the fd socket, thaw/daemon/connection.py), its Restores
(restores.py) and freezes (freezes.py). Thread-safe. Everything it returns is an immutable
record (records.py).
"""

from __future__ import annotations

import builtins
import logging
import os
import sys
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from thaw.daemon.connection import Connection, default_socket
from thaw.daemon.restores import Restores
from thaw.daemon.values import NA, RestoreResult
from thaw.format.fingerprint import Fingerprint

# Each gRPC call imports protobuf's messages and the records it returns on first use: a
# restore (an engine's start) goes over the fd socket and pays for neither (18 and 14 ms of a
# new process's connect on the H200 host; thaw.daemon.opened, thaw.daemon.values).
if TYPE_CHECKING:
    from thaw.daemon.records import (
        DaemonStatus,
        Event,
        Metrics,
        PinProgress,
        SessionRecord,
        SnapshotRecord,
        VerifyResult,
    )

__all__ = ["NA", "Client", "connect", "default_socket"]

log = logging.getLogger("thaw.daemon")

_C = TypeVar("_C", bound="Client")


def connect(socket: str | None = None, *, timeout: float = 30.0) -> Client:
    """Connect to the local thawd; raises DaemonUnavailable (with how to start it) if none runs."""
    client = Client(socket or default_socket(), timeout=timeout)
    prepare(client)
    return client


def prepare(client: Client) -> None:
    """In a process with torch, import the data path now rather than inside the first
    restore (milliseconds that an engine's first restore would pay); in one that already
    uses CUDA, also import thawd's pool for its GPU (mapped in the background) and make the
    driver calls a restore makes once, so that their bindings are resolved."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    from thaw.copy import datapath

    if torch.cuda.is_initialized():
        from thaw.mem import vmm

        t0 = time.perf_counter()
        device = torch.cuda.current_device()
        # The warm-up first: once the pool's map thread runs, its maps (milliseconds each)
        # delay other driver calls: the warm-up took 4-21 ms after it on the H200 host, 0.5
        # before.
        vmm.warm_up()
        datapath.warm_up(device)
        t1 = time.perf_counter()
        client.map_pool(device)
        log.debug(
            "prepared: CUDA warm-up in %.1f ms, pool imported in %.1f ms",
            (t1 - t0) * 1e3,
            (time.perf_counter() - t1) * 1e3,
        )


class Client:
    """A connection to thawd. Thread-safe; close() (or `with`) releases sockets and mappings."""

    def __init__(self, socket: str, *, timeout: float = 30.0) -> None:
        self._conn = Connection(socket, timeout=timeout)
        self._restores = Restores(self._conn)

    @property
    def socket(self) -> str:
        return self._conn.socket

    @property
    def timeout(self) -> float:
        return self._conn.timeout

    def map_pool(self, device: int) -> bool:
        """Map thawd's whole pinned pool for CUDA device `device` (imported now, mapped in the
        background), so that no restore to that GPU maps memory or takes fds (docs/DAEMON.md).
        `connect()` does this in a process that uses CUDA. False where thawd shares no pool."""
        return self._conn.map_pool(device)

    # --- snapshots ----------------------------------------------------------------------------

    def register(
        self, path: str | os.PathLike[str], name: str = "", labels: Mapping[str, str] | None = None
    ) -> SnapshotRecord:
        """Register a snapshot file (cold) under `name` (default: the file name), or a
        snapshot object (`s3://bucket/key`, which thawd reads where its operator allows)."""
        from thaw._proto import thawd_pb2 as pb
        from thaw.daemon.records import SnapshotRecord

        where = os.fspath(path)
        where = where if where.startswith("s3://") else os.path.abspath(where)
        request = pb.RegisterRequest(path=where, name=name, labels=dict(labels or {}))
        return SnapshotRecord.from_pb(self._conn.call("Register", request).snapshot)

    def unregister(self, name: str) -> None:
        from thaw._proto import thawd_pb2 as pb

        self._conn.call("Unregister", pb.UnregisterRequest(name=name))
        self.forget(name)

    def pin_progress(self, name: str, *, warm: bool = False) -> Iterator[PinProgress]:
        """Pin (or warm) a snapshot, yielding progress; the last item has done=True."""
        from thaw._proto import thawd_pb2 as pb
        from thaw.daemon.records import PinProgress, SnapshotRecord

        tier = pb.TIER_WARM if warm else pb.TIER_PINNED
        for p in self._conn.stream("Pin", pb.PinRequest(name=name, tier=tier), None):
            yield PinProgress(
                p.done_bytes,
                p.total_bytes,
                p.elapsed_s,
                p.done,
                SnapshotRecord.from_pb(p.snapshot) if p.done else NA,
            )

    def pin(
        self,
        name: str,
        *,
        warm: bool = False,
        progress: Callable[[PinProgress], None] | None = None,
    ) -> SnapshotRecord:
        """Pin a snapshot into the daemon's page-locked pool (warm=True: page cache only).

        Every tensor's checksum is verified while reading; a damaged file raises
        SnapshotCorrupt naming the tensor. BudgetExceeded carries the numbers.
        """
        from thaw.daemon.records import SnapshotRecord

        last: PinProgress | None = None
        for p in self.pin_progress(name, warm=warm):
            last = p
            if progress is not None:
                progress(p)
        assert last is not None and last.done and isinstance(last.snapshot, SnapshotRecord)
        return last.snapshot

    def unpin(self, name: str) -> SnapshotRecord:
        from thaw._proto import thawd_pb2 as pb
        from thaw.daemon.records import SnapshotRecord

        reply = self._conn.call("Unpin", pb.UnpinRequest(name=name))
        record = SnapshotRecord.from_pb(reply.snapshot)
        self.forget(name)
        return record

    def list(self) -> list[SnapshotRecord]:
        from thaw._proto import thawd_pb2 as pb
        from thaw.daemon.records import SnapshotRecord

        reply = self._conn.call("List", pb.ListRequest())
        return [SnapshotRecord.from_pb(s) for s in reply.snapshots]

    def stat(self, name: str) -> SnapshotRecord:
        from thaw._proto import thawd_pb2 as pb
        from thaw.daemon.records import SnapshotRecord

        return SnapshotRecord.from_pb(self._conn.call("Stat", pb.StatRequest(name=name)).snapshot)

    def verify(self, name: str) -> VerifyResult:
        """Have thawd re-check `name`'s checksums where its bytes are (pool, else file).

        Raises SnapshotCorrupt naming the tensor when one does not match; the snapshot is then
        marked corrupt. Takes as long as hashing the payload: no deadline."""
        from thaw._proto import thawd_pb2 as pb
        from thaw.daemon.records import SnapshotRecord, VerifyResult

        reply = self._conn.call("Verify", pb.VerifyRequest(name=name), timeout=None)
        return VerifyResult(
            SnapshotRecord.from_pb(reply.snapshot), reply.bytes, reply.duration_s, reply.source
        )

    def sessions(self) -> builtins.list[SessionRecord]:
        """Every open restore and freeze session (any uid's), then the latest ended restores,
        newest first: who is restoring what, how fast."""
        from thaw._proto import thawd_pb2 as pb
        from thaw.daemon.records import SessionRecord

        reply = self._conn.call("ListSessions", pb.ListSessionsRequest())
        return [SessionRecord.from_pb(s) for s in reply.sessions]

    def status(self) -> DaemonStatus:
        from thaw._proto import thawd_pb2 as pb
        from thaw.daemon.records import DaemonStatus

        return DaemonStatus.from_pb(self._conn.call("Status", pb.StatusRequest()))

    def watch(self, interval_s: float = 1.0) -> Generator[Event | Metrics, None, None]:
        """Events as they happen and Metrics every `interval_s`, until the iterator is closed.

        Raises DaemonUnavailable when the daemon goes away; reconnecting is the caller's loop.
        """
        from thaw._proto import thawd_pb2 as pb
        from thaw.daemon.records import DaemonStatus, Event, Metrics, SessionRecord, SnapshotRecord

        for u in self._conn.stream("Watch", pb.WatchRequest(interval_s=interval_s), None):
            if u.HasField("event"):
                e = u.event
                yield Event(u.time_unix, e.kind, e.snapshot or NA, e.message, e.bytes, e.duration_s)
            else:
                m = u.metrics
                yield Metrics(
                    u.time_unix,
                    DaemonStatus.from_pb(m.status),
                    tuple(SnapshotRecord.from_pb(s) for s in m.snapshots),
                    m.restore_bytes_per_s,
                    tuple(SessionRecord.from_pb(s) for s in m.sessions),
                )

    # --- restore and freeze -------------------------------------------------------------------

    def restore_tensors(
        self,
        target: Any,
        name: str,
        *,
        strict: bool = True,
        expect: Fingerprint | None = None,
        progress: Callable[[int, int], None] | None = None,
        mode: str | None = None,
    ) -> RestoreResult:
        """Restore `target` (torch module, state dict or (name, tensor) pairs) from snapshot `name`.

        Names, dtypes and shapes (and the fingerprint, with `expect`) are checked before a byte
        moves. The restore counts only once the daemon confirms it: if thawd dies on the way,
        DaemonUnavailable is raised and the model must be restored again before use.
        `progress(done_bytes, total_bytes)` is called before and after the copy.

        `mode` (default $THAW_RESTORE_MODE, else "auto"): "auto" maps the daemon's pool memory
        and copies with this process's streams, falling back to a daemon copy when this process
        cannot import it; "daemon_copy" (its older name "ipc" is accepted) never maps pool
        memory: thawd copies into this process's CUDA tensors over CUDA IPC (the file is read
        instead for unpinned snapshots).
        """
        return self._restores.restore([(target, name)], strict, expect, progress, mode)[0]

    def restore_many(
        self, items: Sequence[tuple[Any, str]], *, strict: bool = True, mode: str | None = None
    ) -> builtins.list[RestoreResult]:
        """Restore several snapshots, each `(target, name)` as `restore_tensors` would, with the
        control calls of all of them overlapped: one round trip to thawd to open them all and
        one to confirm them all, instead of two per snapshot (KV prefixes of many requests, a
        model's parts). The copies run one after the other. When one fails, the ones before
        it are restored and confirmed, the rest are not, and the error names them."""
        return self._restores.restore(list(items), strict, None, None, mode)

    def forget(self, name: str) -> None:
        """Drop this process's cached mapping of `name`'s pool buffer (if any)."""
        self._restores.forget(name)

    def freeze_tensors(
        self,
        model: Any,
        name: str,
        path: str | None = None,
        fingerprint: Fingerprint | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        pin: bool = True,
        wait: bool = False,
    ) -> SnapshotRecord:
        """Freeze `model`'s tensors into a new snapshot held by the daemon and written behind.

        Returns once the bytes are in the daemon's pool and checksummed (wait=True: once the
        file is durable). `path` defaults to the daemon's state directory. pin=False leaves it
        demotable once written.
        """
        from thaw.daemon import freezes

        return freezes.freeze(
            self._conn, model, name, path, fingerprint, labels=labels, pin=pin, wait=wait
        )

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        # The pool map first: its release waits for copies still in flight, which may also
        # read the buffers mapped below.
        self._conn.close_pool_map()
        self._restores.close()
        self._conn.close_transport()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
