"""Restore sessions: how a client gets a snapshot's bytes, and the bookkeeping once it has.

A session is delivered one of four ways (docs/DAEMON.md, "Deliveries"): the pool buffer's
fds; nothing, when the client already maps that buffer or the whole pool; a CUDA IPC copy by
the daemon (`copy_into`); or, for a snapshot not pinned, a duplicate of the registered file's
fd, which the client reads with pread and verifies tensor by tensor as it copies. Until a
session ends, the memory it reads stays (Entry.check_idle).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import dataclasses
import os
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from thaw._proto import thawd_pb2 as pb
from thaw.daemon import fdsocket
from thaw.daemon.opened import as_json as opened_json
from thaw.errors import InvalidRequest, NotFound, PermissionDenied
from thaw.format import TensorEntry
from thaw.format.fingerprint import Fingerprint
from thawd.budgets import human
from thawd.buffers import PoolBuffer, VmmArena
from thawd.entries import POOL_KINDS, TIERS, Entry
from thawd.security import Peer

if TYPE_CHECKING:
    from thawd.freezes import Target
    from thawd.state import Daemon


@dataclasses.dataclass
class Session:
    id: str
    kind: str  # restore | freeze
    token: str
    uid: int
    name: str
    fds: list[int]  # the daemon's own fds for the client, closed once handed out
    sizes: list[int]  # bytes each fd maps, in address order
    buffer_id: int  # a pool buffer's identity (0: a file), for clients' mapping caches
    started: float
    buffer: PoolBuffer | None = None
    entries: list[TensorEntry] = dataclasses.field(default_factory=list)
    fingerprint: Fingerprint | None = None
    target: Target | None = None  # a freeze's directory and file name
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    pin: bool = True
    delivery: pb.Delivery = pb.DELIVERY_FDS
    copying: int = 0  # daemon copies into `buffer` running: the buffer must stay
    pid: int = 0  # the client process (SO_PEERCRED of its fd-socket connection)
    bytes: int = 0  # the snapshot's payload bytes

    def info(self, now: float, wall: float) -> pb.SessionInfo:
        """What ListSessions shows of an open session (`now` monotonic, `wall` unix)."""
        age = now - self.started
        return pb.SessionInfo(kind=self.kind, snapshot=self.name, pid=self.pid, uid=self.uid,
                              bytes=self.bytes, started_unix=wall - age, duration_s=age,
                              open=True, delivery=self.delivery)  # fmt: skip

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


# Sessions one fd-socket connection may hold open at once: each can hold fds (a file's, a
# pool buffer's), and thawd's fds are everyone's. A restore_many batch opens at most 64.
MAX_SESSIONS = 1024
# Ended restores ListSessions (and thawctl top's sessions view) shows, newest first.
RECENT = 64


class Restores:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.open_per_token: dict[str, int] = {}
        self.recent: collections.deque[pb.SessionInfo] = collections.deque(maxlen=RECENT)
        self.total = 0
        self.bytes_total = 0
        # Rows whose restore counters changed, written to the registry within a second.
        self._unsaved: set[str] = set()
        self._save_handle: asyncio.TimerHandle | None = None

    async def open(
        self, peer: Peer, token: str, request: pb.OpenRestoreRequest
    ) -> pb.OpenRestoreResponse:
        """A restore session for `request.name`, for anyone the allow-list admits (gRPC)."""
        entry, fields = await self._open(peer, token, request)
        # No await since _open's last: the manifest is the one the session was opened on.
        response = entry.manifest_pb()
        response.MergeFrom(fields)
        return response

    async def open_json(
        self, peer: Peer, token: str, request: pb.OpenRestoreRequest
    ) -> dict[str, Any]:
        """`open`, its response as the fd socket carries it (thaw/daemon/opened.py)."""
        entry, fields = await self._open(peer, token, request)
        reply = opened_json(fields)
        reply["tensors"], reply["fingerprint_json"] = entry.manifest_json()
        return reply

    async def _open(
        self, peer: Peer, token: str, request: pb.OpenRestoreRequest
    ) -> tuple[Entry, pb.OpenRestoreResponse]:
        """Open the session: the entry, and the response's fields that are the session's."""
        d = self.d
        name = request.name
        entry = d.get(name)
        self.admit(token)
        if entry.manifest is None:
            raise InvalidRequest(f"snapshot {name!r} is unusable: {entry.row.error}")
        pool = entry.pool
        fds: builtins.list[int] = []
        sizes: builtins.list[int] = []
        pool_offset = 0
        if (
            pool is not None
            and pool.kind == "vmm"
            and (request.daemon_copy or (not d.config.share_pool and request.can_daemon_copy))
        ):
            delivery = pb.DELIVERY_DAEMON_COPY
        elif (
            pool is not None
            and (pool.kind == "memfd" or d.config.share_pool)
            and (not request.daemon_copy)
        ):
            delivery = pb.DELIVERY_FDS
            if request.mapped_buffer == pool.id:
                delivery = pb.DELIVERY_MAPPED
            elif (
                (arena := self.shared_arena()) is not None
                and request.pool_id == arena.id
                and pool.pool_offset is not None
            ):
                delivery, pool_offset = pb.DELIVERY_POOL, pool.pool_offset
            else:
                fds, sizes = pool.export()
        else:
            pool, delivery = None, pb.DELIVERY_FDS
            # The file is checked (unchanged, the path still names it) on a thread: a stat
            # by name may wait on a slow filesystem, and nobody else should wait with it.
            await d.check_file(peer.uid, entry, entry.the_file())
            if d.entries.get(name) is not entry:
                raise NotFound(f"snapshot {name!r} was unregistered while opening it")
            fds, sizes = [entry.the_file().dup()], [entry.file_length]
        kind = pool.kind if pool is not None else "file"
        size = pool.size if pool is not None else entry.file_length
        offset = 0 if pool is not None else entry.payload_offset
        buffer_id = pool.id if pool is not None else 0
        session = Session(secrets.token_hex(16), "restore", token, peer.uid, name, fds, sizes,
                          buffer_id, time.monotonic(), delivery=delivery, pid=peer.pid,
                          bytes=entry.payload_length)  # fmt: skip
        self.add(session)
        entry.clients += 1
        entry.row.last_used = time.time()
        # After the reply: the event's log line is not the client's to wait for.
        asyncio.get_running_loop().call_soon(
            d.events.publish, "restore_started", name, f"pid {peer.pid} uid {peer.uid}"
        )
        return entry, pb.OpenRestoreResponse(
            session_id=session.id,
            tier=TIERS[entry.tier],
            pool_kind=POOL_KINDS[kind],
            pool_size=size,
            payload_offset=offset,
            payload_length=entry.payload_length,
            path=entry.row.path,
            delivery=delivery,
            buffer_id=buffer_id,
            pool_offset=pool_offset,
        )

    async def copy_into(
        self, peer: Peer, token: str, request: pb.DaemonCopyRequest
    ) -> pb.DaemonCopyResponse:
        """CUDA IPC mode: copy a restore session's pool bytes into the client's GPU memory."""
        d = self.d
        session = self.session(peer, request.session_id, "restore")
        entry = d.entries.get(session.name)
        pool = entry.pool if entry is not None else None
        if entry is None or pool is None or pool.kind != "vmm" or d.copier is None:
            raise InvalidRequest(
                f"snapshot {session.name!r} is not in this thawd's VMM pool: "
                "CUDA IPC copies need it pinned on a GPU host"
            )
        if pool.id != session.buffer_id:
            raise InvalidRequest(
                f"snapshot {session.name!r} was re-pinned since this restore opened; restore again"
            )
        # Any delivery may end here: a client whose import of the fds failed falls back to a
        # daemon copy on the same session.
        assert entry.manifest is not None
        entry.copying += 1
        try:
            nbytes, seconds = await daemon_copy(
                d, token, request, pool.addr, entry.manifest.tensors, to_host=False
            )
        finally:
            entry.copying -= 1
        return pb.DaemonCopyResponse(bytes=nbytes, duration_s=seconds)

    def shared_arena(self) -> VmmArena | None:
        """The VMM arena when clients may map it whole (share_pool), else None."""
        d = self.d
        return d.arena if d.arena is not None and d.config.share_pool else None

    def pool_fds(
        self,
        start: int,
        count: int,
    ) -> tuple[builtins.list[int], builtins.list[int], int]:
        """Fds of the whole VMM pool's chunks from `start`, their sizes and the pool's id, for
        a client that maps all of it (fd socket "pool"; the caller closes the fds). Only where
        pool fds are shared at all."""
        arena = self.shared_arena()
        if arena is None:
            raise InvalidRequest(
                "this thawd shares no VMM pool (no GPU pool, or share_pool = "
                "false): restore without mapping the pool"
            )
        if not 0 <= start < len(arena.chunks):
            raise InvalidRequest(f"pool chunk {start} out of range 0..{len(arena.chunks) - 1}")
        return (*arena.export_all(start, count), arena.id)

    def redeem(
        self,
        session_id: str,
        uid: int,
    ) -> tuple[builtins.list[int], builtins.list[int], str, int, int]:
        """The next fds of a session for the fd socket, at most fdsocket.MAX_FDS (one message
        carries no more: a buffer of more chunks, over 63 GiB, is redeemed in turns): only to
        the uid that opened it, each fd only once.

        Returns (fds, bytes each maps, session kind, buffer id, how many are left to redeem);
        the caller closes the fds."""
        session = self.d.sessions.get(session_id)
        if session is None or not session.fds:
            raise NotFound("no such session (closed, already redeemed, or the daemon restarted)")
        if session.uid != uid:
            raise PermissionDenied(f"session belongs to uid {session.uid}, not {uid}")
        done = len(session.sizes) - len(session.fds)
        fds, session.fds = session.fds[: fdsocket.MAX_FDS], session.fds[fdsocket.MAX_FDS :]
        sizes = session.sizes[done : done + len(fds)]
        return fds, sizes, session.kind, session.buffer_id, len(session.fds)

    def close(
        self, peer: Peer, session_id: str, ok: bool, nbytes: int, duration_s: float, error: str
    ) -> None:
        session = self.session(peer, session_id, "restore")
        self.end(session)
        # The counters, the event (a log line) and the record of it after the reply, the
        # registry row within a second (`_save_later`); the session itself ended above.
        asyncio.get_running_loop().call_soon(self._count, session, ok, nbytes, duration_s,
                                             error)  # fmt: skip

    def _count(self, session: Session, ok: bool, nbytes: int, duration_s: float,
               error: str) -> None:  # fmt: skip
        d = self.d
        name = session.name
        self.recent.appendleft(pb.SessionInfo(
            kind=session.kind, snapshot=name, pid=session.pid, uid=session.uid, bytes=nbytes,
            started_unix=time.time() - (time.monotonic() - session.started),
            duration_s=duration_s, open=False, ok=ok, delivery=session.delivery))  # fmt: skip
        entry = d.entries.get(name)
        if entry is None:
            return
        if ok:
            entry.row.restores += 1
            entry.row.last_used = time.time()
            self._save_later(name)
            self.total += 1
            self.bytes_total += nbytes
            rate = nbytes / duration_s / 1e9 if duration_s > 0 else 0.0
            d.events.publish(
                "restore_finished",
                name,
                f"{human(nbytes)} in {duration_s * 1e3:.1f} ms ({rate:.2f} GB/s)",
                nbytes,
                duration_s,
            )
        else:
            d.events.publish("restore_failed", name, error or "client reported failure")

    def sessions(self) -> builtins.list[pb.SessionInfo]:
        """Every open session, then the latest ended restores, newest first."""
        now, wall = time.monotonic(), time.time()
        opened = sorted(self.d.sessions.values(), key=lambda s: s.started, reverse=True)
        return [s.info(now, wall) for s in opened] + list(self.recent)

    def open_size(self, name: str) -> int:
        """At most the bytes of an OpenRestoreResponse for `name`; NotFound if unregistered."""
        return self.d.get(name).open_size()

    def _save_later(self, name: str) -> None:
        """Queue a row's restore counters within a second: one registry write per snapshot per
        second, however many restores. A killed thawd loses at most that second's."""
        self._unsaved.add(name)
        if self._save_handle is None:
            self._save_handle = asyncio.get_running_loop().call_later(1.0, self.flush_counters)

    def flush_counters(self) -> None:
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        for name in self._unsaved:
            entry = self.d.entries.get(name)
            if entry is not None:
                self.d.save(entry)
        self._unsaved.clear()

    def admit(self, token: str) -> None:
        """Refuse a new session to a connection that holds MAX_SESSIONS open already."""
        if self.open_per_token.get(token, 0) >= MAX_SESSIONS:
            raise InvalidRequest(f"this connection has {MAX_SESSIONS} restore and freeze "
                                 "sessions open; close some first")  # fmt: skip

    def add(self, session: Session) -> None:
        self.d.sessions[session.id] = session
        self.open_per_token[session.token] = self.open_per_token.get(session.token, 0) + 1

    def forget(self, session: Session) -> None:
        """Take a session out of the table and its connection's count (nothing is released)."""
        if self.d.sessions.pop(session.id, None) is None:
            return
        left = self.open_per_token.get(session.token, 1) - 1
        if left:
            self.open_per_token[session.token] = left
        else:
            self.open_per_token.pop(session.token, None)

    def session(self, peer: Peer, session_id: str, kind: str) -> Session:
        session = self.d.sessions.get(session_id)
        if session is None or session.kind != kind:
            raise NotFound(f"no open {kind} session {session_id!r}")
        if session.uid != peer.uid:
            raise PermissionDenied(f"{kind} session belongs to uid {session.uid}")
        return session

    def end(self, session: Session) -> None:
        """Forget a session and release what it held (a freeze's buffer once no daemon copy
        writes it, its directory)."""
        d = self.d
        self.forget(session)
        session.close_fds()
        if session.kind == "restore":
            entry = d.entries.get(session.name)
            if entry is not None:
                entry.clients = max(0, entry.clients - 1)
            return
        if session.buffer is not None and not session.copying:
            session.buffer.close()
            session.buffer = None
        if session.target is not None and not session.copying:
            session.target.close()

    def drop_token(self, token: str) -> None:
        """The client's fd-socket connection closed: end whatever it left open."""
        d = self.d
        if d.copier is not None:
            asyncio.get_running_loop().run_in_executor(None, d.copier.forget, token)
        for session in [s for s in d.sessions.values() if s.token == token]:
            self.end(session)
            kind = "restore_failed" if session.kind == "restore" else "freeze_failed"
            d.events.publish(kind, session.name, "client went away")


async def daemon_copy(
    d: Daemon,
    token: str,
    request: pb.DaemonCopyRequest,
    host: int,
    tensors: Sequence[TensorEntry],
    to_host: bool,
) -> tuple[int, float]:
    """Copy between pool memory at `host` (laid out like the payload) and the client's GPU
    allocations named in `request`, on a worker thread. Returns (bytes, seconds)."""
    from thawd.daemon_copy import Job

    # Built on the event loop: no more copies than the session has tensors, no more regions
    # than copies (a 64 MiB request could otherwise hold millions).
    if len(request.copies) > len(tensors) or len(request.regions) > max(1, len(request.copies)):
        raise InvalidRequest(f"{len(request.copies)} copies and {len(request.regions)} regions "
                             f"for {len(tensors)} tensors")  # fmt: skip
    regions = [(r.ipc_handle, r.size) for r in request.regions]
    jobs = []
    for c in request.copies:
        if c.tensor >= len(tensors):
            raise InvalidRequest(f"no tensor {c.tensor} in this session's {len(tensors)}")
        t = tensors[c.tensor]
        jobs.append(Job(t.offset, c.region, c.offset, t.length))
    t0 = time.monotonic()
    await asyncio.to_thread(d.copier.copy, token, request.device_uuid, host, regions, jobs, to_host)
    return sum(j.length for j in jobs), time.monotonic() - t0
