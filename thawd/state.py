"""The daemon's domain: registered snapshots, their tiers and budgets, restore and freeze sessions.

Every method runs on the event loop thread (no locks); blocking work (reading files into the
pool, checksums, writing frozen snapshots) runs in worker threads and its results are applied
back on the loop. The servicers call exactly one method here per RPC; errors are thaw.errors.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from thaw import _native
from thaw._proto import thawd_pb2 as pb
from thaw.dtypes import DTYPES
from thaw.errors import (
    AlreadyExists,
    BudgetExceeded,
    ChecksumMismatch,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    SnapshotError,
)
from thaw.fingerprint import Fingerprint
from thaw.format import (
    PAYLOAD_OFFSET,
    Manifest,
    SnapshotWriter,
    TensorEntry,
    layout,
    open_snapshot,
    payload_fd,
    verify_tensor,
)
from thaw.pool import Mapping
from thawd import metrics
from thawd.buffers import PoolBuffer, VmmArena, WarmMapping, round_size
from thawd.config import Config
from thawd.events import Events
from thawd.registry import Registry, Row, new_row
from thawd.security import Peer, check_readable, check_writable_dir, validate_labels, validate_name

log = logging.getLogger("thawd.state")

TIERS = {"cold": pb.TIER_COLD, "warm": pb.TIER_WARM, "pinned": pb.TIER_PINNED}
CHECKSUM_STATES = {
    "unverified": pb.CHECKSUM_STATE_UNVERIFIED,
    "verified": pb.CHECKSUM_STATE_VERIFIED,
    "corrupt": pb.CHECKSUM_STATE_CORRUPT,
}
POOL_KINDS = {"memfd": pb.POOL_KIND_MEMFD, "vmm": pb.POOL_KIND_VMM, "file": pb.POOL_KIND_FILE}
# Reads into the pool go in 256 MiB chunks: large enough for full disk speed, small enough
# for a progress message about every 0.2 s at 1.4 GB/s.
PIN_CHUNK = 256 << 20


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclasses.dataclass
class Entry:
    """The live state of one registered snapshot."""

    row: Row
    manifest: Manifest | None = None
    payload_offset: int = PAYLOAD_OFFSET
    payload_length: int = 0
    file_length: int = 0
    tier: str = "cold"
    pool: PoolBuffer | None = None
    warm: WarmMapping | None = None
    clients: int = 0
    busy: str = ""  # "pinning", "warming", "verifying": one at a time
    copying: int = 0  # CUDA IPC copies from its pool buffer in flight (the buffer must stay)
    file_pending: bool = False
    # The manifest as an OpenRestoreResponse, built once per manifest: building 291 tensor
    # messages costs a restore milliseconds, copying a built message microseconds.
    _manifest_pb: tuple[Manifest, pb.OpenRestoreResponse] | None = None

    def load(self, path: str) -> None:
        snap = open_snapshot(path)
        self.manifest = snap.manifest
        self.payload_offset = snap.payload_offset
        self.payload_length = snap.payload_length
        self.file_length = snap.file_length

    @property
    def demotable(self) -> bool:
        """Held above the tier the operator asked for, and nobody is using it right now."""
        rank = {"cold": 0, "warm": 1, "pinned": 2}
        return rank[self.tier] > rank[self.row.wanted_tier] and not self.in_use()

    def manifest_pb(self) -> pb.OpenRestoreResponse:
        """A new response holding the manifest's tensors and fingerprint."""
        response = pb.OpenRestoreResponse()
        response.CopyFrom(self._manifest())
        return response

    def _manifest(self) -> pb.OpenRestoreResponse:
        """The manifest's response, built once per manifest (not to be modified)."""
        assert self.manifest is not None
        if self._manifest_pb is None or self._manifest_pb[0] is not self.manifest:
            built = pb.OpenRestoreResponse(
                tensors=[_entry_pb(t) for t in self.manifest.tensors],
                fingerprint_json=json.dumps(self.manifest.fingerprint.to_json()))  # fmt: skip
            self._manifest_pb = (self.manifest, built)
        return self._manifest_pb[1]

    def open_size(self) -> int:
        """At most the bytes of an OpenRestoreResponse for this entry: the manifest, the path
        and the session's fields (a session id and eight numbers, 256 bytes at most)."""
        manifest = self._manifest().ByteSize() if self.manifest is not None else 0
        return manifest + len(self.row.path.encode()) + 256

    def in_use(self) -> str:
        """What uses the entry's memory now ("" when nothing). Open restores count: a VMM
        pool buffer's chunks go back to the arena, and a pin or freeze may write them while a
        client still copies from them."""
        if self.busy:
            return self.busy
        if self.file_pending:
            return "writing"
        if self.copying:
            return "copying to a client"
        if self.clients:
            return f"{self.clients} restore(s) open"
        return ""

    def check_idle(self) -> None:
        """Refuse to drop the entry's memory while something uses it."""
        if doing := self.in_use():
            raise InvalidRequest(f"snapshot {self.row.name!r} is busy ({doing}); retry")


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
    path: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    pin: bool = True
    delivery: int = pb.DELIVERY_FDS
    copying: int = 0  # daemon copies into `buffer` running: the buffer must stay


class Daemon:
    def __init__(self, config: Config, pool_kind: str, events: Events,
                 gpus: list[pb.Gpu]) -> None:  # fmt: skip
        self.config = config
        self.pool_kind = pool_kind
        self.events = events
        self.gpus = gpus
        self.started = time.time()
        self.registry = Registry(config.registry_path)
        self.entries: dict[str, Entry] = {}
        self.sessions: dict[str, Session] = {}
        self.pinned_reserved = 0  # bytes promised to pins and freezes in progress
        self.warm_reserved = 0
        self.restores_total = 0
        self.bytes_restored_total = 0
        # Rows whose restore counters changed, written to the registry within a second.
        self._unsaved: set[str] = set()
        self._save_handle: asyncio.TimerHandle | None = None
        self.memory_locked = True
        self._writes: set[asyncio.Task[None]] = set()
        # VMM: the whole pinned budget is created now, at start (see VmmArena).
        self.arena = (
            VmmArena(config.pinned_budget, config.vmm_chunk) if pool_kind == "vmm" else None
        )
        self.copier: Any = None  # CUDA IPC copies into clients' GPUs (VMM pool only)
        if pool_kind == "vmm":
            from thaw.ipc import Copier

            self.copier = Copier()
        for row in self.registry.rows():
            entry = Entry(row)
            try:
                entry.load(row.path)
            except SnapshotError as e:
                entry.row.error = str(e)
                log.warning("registered snapshot %s is unusable: %s", row.name, e)
            self.entries[row.name] = entry

    # --- records ----------------------------------------------------------------------------

    def record(self, e: Entry) -> pb.Snapshot:
        if e.pool is not None:
            resident = e.payload_length
        elif e.warm is not None:
            resident = e.warm.resident_bytes()
        else:
            resident = 0
        fingerprint = json.dumps(e.manifest.fingerprint.to_json()) if e.manifest else ""
        return pb.Snapshot(
            name=e.row.name, path=e.row.path, labels=e.row.labels, tier=TIERS[e.tier],
            wanted_tier=TIERS[e.row.wanted_tier], size_bytes=e.payload_length,
            file_bytes=e.file_length, resident_bytes=resident, last_used_unix=e.row.last_used,
            clients=e.clients, restores=e.row.restores,
            checksum_state=CHECKSUM_STATES[e.row.checksum_state], fingerprint_json=fingerprint,
            tensor_count=len(e.manifest.tensors) if e.manifest else 0,
            registered_unix=e.row.registered, error=e.row.error, file_pending=e.file_pending,
        )  # fmt: skip

    def pinned_used(self) -> int:
        freezing = sum(s.buffer.size for s in self.sessions.values() if s.buffer is not None)
        held = sum(e.pool.size for e in self.entries.values() if e.pool)
        return self.pinned_reserved + freezing + held

    def warm_used(self) -> int:
        return self.warm_reserved + sum(e.warm.size for e in self.entries.values() if e.warm)

    def status(self) -> pb.DaemonStatus:
        from thawd import API_VERSION, __version__
        from thawd.hostinfo import host_memory

        total, available = host_memory()
        return pb.DaemonStatus(
            version=__version__, api_version=API_VERSION, pid=os.getpid(),
            started_unix=self.started, uptime_s=time.time() - self.started,
            pool_kind=POOL_KINDS[self.pool_kind], pinned_budget=self.config.pinned_budget,
            pinned_used=self.pinned_used(), warm_budget=self.config.warm_budget,
            warm_used=self.warm_used(), host_memory_total=total,
            host_memory_available=available, gpus=self.gpus, snapshots=len(self.entries),
            active_restores=sum(s.kind == "restore" for s in self.sessions.values()),
            active_freezes=sum(s.kind == "freeze" for s in self.sessions.values()),
            restores_total=self.restores_total, bytes_restored_total=self.bytes_restored_total,
            memory_locked=self.memory_locked, socket=self.config.socket,
            share_pool=self.config.share_pool,
        )  # fmt: skip

    def list(self) -> builtins.list[pb.Snapshot]:
        return [self.record(e) for e in self.entries.values()]

    def stat(self, name: str) -> pb.Snapshot:
        return self.record(self._get(name))

    def _get(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise NotFound(f"no snapshot named {name!r} is registered (see `thawctl ls`)") from None

    # --- registry ---------------------------------------------------------------------------

    async def register(self, peer: Peer, path: str, name: str,
                       labels: dict[str, str]) -> pb.Snapshot:  # fmt: skip
        resolved = check_readable(peer, path)
        if not name:
            name = resolved.name.removesuffix(".thaw")
        validate_name(name)
        validate_labels(labels)
        for e in self.entries.values():
            if e.row.name == name:
                raise AlreadyExists(
                    f"a snapshot named {name!r} is already registered ({e.row.path})"
                )
        if not os.access(resolved, os.R_OK):
            raise PermissionDenied(f"thawd (uid {os.getuid()}) cannot read {resolved}: make it "
                                   "readable by the thawd user or group")  # fmt: skip
        entry = Entry(new_row(name, str(resolved), labels, peer.uid))
        await asyncio.to_thread(entry.load, str(resolved))
        self.registry.add(entry.row)
        self.entries[name] = entry
        self.events.publish("registered", name, str(resolved), entry.payload_length)
        return self.record(entry)

    async def unregister(self, peer: Peer, name: str) -> None:
        entry = self._get(name)
        entry.check_idle()
        self._release(entry)
        del self.entries[name]
        self.registry.remove(name)
        self.events.publish("unregistered", name)

    def _release(self, entry: Entry) -> None:
        """Drop the daemon's memory for an entry; clients that mapped it keep their mapping."""
        if entry.pool is not None:
            entry.pool.close()
            entry.pool = None
        if entry.warm is not None:
            entry.warm.close()
            entry.warm = None
        entry.tier = "cold"

    # --- budgets ----------------------------------------------------------------------------

    def pool_size(self, n: int) -> int:
        """Bytes of the pinned budget a buffer of `n` bytes takes."""
        return self.arena.size_for(n) if self.arena is not None else round_size(n)

    def _make_room(self, tier: str, size: int, for_name: str) -> None:
        """Demote idle entries above their wanted tier, LRU first, until `size` fits."""
        budget = self.config.pinned_budget if tier == "pinned" else self.config.warm_budget
        used = self.pinned_used if tier == "pinned" else self.warm_used
        if size > budget:
            raise BudgetExceeded(
                f"{for_name!r} needs {human(size)} ({size} bytes) but the {tier} budget is "
                f"{human(budget)} ({budget} bytes): raise {tier}_budget in the thawd config"
            )
        while used() + size > budget:
            victims = [e for e in self.entries.values() if e.tier == tier and e.demotable]
            if not victims:
                in_use = used()
                raise BudgetExceeded(
                    f"{for_name!r} needs {human(size)} ({size} bytes); the {tier} budget is "
                    f"{human(budget)} ({budget} bytes) with {human(in_use)} ({in_use} bytes) in "
                    f"use and {human(budget - in_use)} free, and nothing idle to demote: unpin "
                    f"a snapshot or raise {tier}_budget"
                )
            victim = min(victims, key=lambda e: e.row.last_used)
            self._release(victim)
            self.events.publish("demoted", victim.row.name, f"{tier} -> cold for {for_name}")

    # --- tiers ------------------------------------------------------------------------------

    async def pin(self, peer: Peer, name: str, tier: str) -> AsyncIterator[pb.PinProgress]:
        entry = self._get(name)
        if entry.busy:
            raise InvalidRequest(f"snapshot {name!r} is already {entry.busy}")
        t0 = time.monotonic()
        if entry.tier == tier or (tier == "warm" and entry.tier == "pinned"):
            entry.row.wanted_tier = tier
            self.registry.update(entry.row)
            yield pb.PinProgress(done_bytes=entry.payload_length, total_bytes=entry.payload_length,
                                 done=True, snapshot=self.record(entry))  # fmt: skip
            return
        await asyncio.to_thread(entry.load, entry.row.path)  # the file may have been replaced
        size = (
            self.pool_size(entry.payload_length)
            if tier == "pinned"
            else round_size(entry.payload_length)
        )
        self._make_room(tier, size, name)
        entry.busy = "pinning" if tier == "pinned" else "warming"
        if tier == "pinned":
            self.pinned_reserved += size
        else:
            self.warm_reserved += size
        try:
            if tier == "pinned":
                async for done in self._fill(entry):
                    yield pb.PinProgress(done_bytes=done, total_bytes=entry.payload_length,
                                         elapsed_s=time.monotonic() - t0)  # fmt: skip
            else:
                snap = await asyncio.to_thread(open_snapshot, entry.row.path)
                entry.warm = await asyncio.to_thread(
                    WarmMapping, snap, self.config.io_threads, self.config.mlock
                )
                self.memory_locked &= entry.warm.locked or not self.config.mlock
                entry.tier = "warm"
        except ChecksumMismatch as e:
            self._mark_corrupt(entry, "pin_failed", e)
            raise
        finally:
            entry.busy = ""
            if tier == "pinned":
                self.pinned_reserved -= size
            else:
                self.warm_reserved -= size
        entry.row.wanted_tier = tier
        entry.row.error = ""
        self.registry.update(entry.row)
        elapsed = time.monotonic() - t0
        self.events.publish("pinned" if tier == "pinned" else "warmed", name,
                            f"{human(entry.payload_length)} in {elapsed:.2f} s",
                            entry.payload_length, elapsed)  # fmt: skip
        metrics.tier_changed(self)
        yield pb.PinProgress(done_bytes=entry.payload_length, total_bytes=entry.payload_length,
                             elapsed_s=elapsed, done=True, snapshot=self.record(entry))  # fmt: skip

    async def _fill(self, entry: Entry) -> AsyncIterator[int]:
        """Read the payload into a new pool buffer, verifying every tensor as it lands."""
        assert entry.manifest is not None
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[int | BaseException] = asyncio.Queue()
        snap = await asyncio.to_thread(open_snapshot, entry.row.path)
        buf = await asyncio.to_thread(
            PoolBuffer, self.pool_kind, entry.row.name, snap.payload_length, self.config.mlock,
            self.arena,
        )  # fmt: skip
        threads = self.config.io_threads

        def work() -> None:
            tensors = sorted(snap.tensors, key=lambda t: t.offset)
            nxt = 0
            with payload_fd(snap, direct=True) as fd:
                done = 0
                while done < snap.payload_length:
                    n = min(PIN_CHUNK, snap.payload_length - done)
                    _native.pread_into(fd, buf.addr + done, n, snap.payload_offset + done, threads)
                    done += n
                    while nxt < len(tensors) and tensors[nxt].offset + tensors[nxt].length <= done:
                        verify_tensor(snap.path, tensors[nxt], buf.addr + tensors[nxt].offset,
                                      threads)  # fmt: skip
                        nxt += 1
                    loop.call_soon_threadsafe(progress.put_nowait, done)
            buf.finish()

        def finished(fut: asyncio.Future[None]) -> None:
            progress.put_nowait(fut.exception() or -1)

        future = asyncio.ensure_future(asyncio.to_thread(work))
        future.add_done_callback(finished)
        try:
            while True:
                item = await progress.get()
                if isinstance(item, BaseException):
                    raise item
                if item < 0:
                    break
                yield item
        except BaseException:
            await asyncio.wait([future])  # never free memory a worker is still writing
            buf.close()
            raise
        self._release(entry)
        entry.pool, entry.tier = buf, "pinned"
        entry.row.checksum_state = "verified"
        self.memory_locked &= buf.locked or not self.config.mlock

    def _mark_corrupt(self, entry: Entry, event: str, error: ChecksumMismatch) -> None:
        """A tensor did not match its checksum: record it, durably, and tell the watchers."""
        entry.row.checksum_state, entry.row.error = "corrupt", str(error)
        self.registry.update(entry.row)
        self.events.publish(event, entry.row.name, str(error))

    async def verify(self, name: str) -> pb.VerifyResponse:
        """Re-check every tensor against its checksum where the bytes are now: the pool buffer
        when pinned (bit rot in memory), else the file. A mismatch marks the snapshot corrupt
        and raises ChecksumMismatch naming the tensor."""
        entry = self._get(name)
        if entry.manifest is None:
            raise InvalidRequest(f"snapshot {name!r} is unusable: {entry.row.error}")
        if entry.busy or entry.file_pending:
            raise InvalidRequest(f"snapshot {name!r} is busy ({entry.busy or 'writing'}); retry")
        manifest, pool, threads = entry.manifest, entry.pool, self.config.io_threads
        path = entry.row.path

        def work() -> str:
            if pool is not None:
                for t in manifest.tensors:
                    verify_tensor(f"thawd:{name}", t, pool.addr + t.offset, threads)
                return "pool"
            snap = open_snapshot(path)
            if snap.payload_length:
                with (
                    payload_fd(snap, direct=False) as fd,
                    Mapping(fd, snap.payload_length, snap.payload_offset) as mapping,
                ):
                    for t in snap.tensors:
                        verify_tensor(path, t, mapping.addr + t.offset, threads)
            return "file"

        t0 = time.monotonic()
        entry.busy = "verifying"
        try:
            source = await asyncio.to_thread(work)
        except ChecksumMismatch as e:
            self._mark_corrupt(entry, "verify_failed", e)
            raise
        finally:
            entry.busy = ""
        elapsed = time.monotonic() - t0
        entry.row.checksum_state, entry.row.error = "verified", ""
        self.registry.update(entry.row)
        self.events.publish("verified", name, f"{human(entry.payload_length)} from the {source}",
                            entry.payload_length, elapsed)  # fmt: skip
        return pb.VerifyResponse(snapshot=self.record(entry), bytes=entry.payload_length,
                                 duration_s=elapsed, source=source)  # fmt: skip

    async def unpin(self, peer: Peer, name: str) -> pb.Snapshot:
        entry = self._get(name)
        entry.check_idle()
        entry.row.wanted_tier = "cold"
        self.registry.update(entry.row)
        self._release(entry)
        self.events.publish("unpinned", name)
        metrics.tier_changed(self)
        return self.record(entry)

    # --- restore ----------------------------------------------------------------------------

    def open_restore(self, peer: Peer, token: str, request: pb.OpenRestoreRequest,
                     ) -> pb.OpenRestoreResponse:  # fmt: skip
        """A restore session, delivered one of three ways (docs/DAEMON.md, "Data path"):
        the pool buffer's fds (or none, when the client maps that buffer or the whole pool
        already), a CUDA IPC copy by the daemon (`copy_into`), or the file's fd (not pinned,
        or pool memory this daemon does not share and the client cannot take a daemon copy).
        Until the session ends, the entry's memory stays (`check_idle`)."""
        entry = self._get(request.name)
        name = request.name
        if entry.manifest is None:
            raise InvalidRequest(f"snapshot {name!r} is unusable: {entry.row.error}")
        pool = entry.pool
        fds: builtins.list[int] = []
        sizes: builtins.list[int] = []
        pool_offset = 0
        if (
            pool is not None
            and pool.kind == "vmm"
            and (request.daemon_copy or (not self.config.share_pool and request.can_daemon_copy))
        ):
            delivery = pb.DELIVERY_DAEMON_COPY
        elif (
            pool is not None
            and (pool.kind == "memfd" or self.config.share_pool)
            and not (request.daemon_copy)
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
            if entry.file_pending:
                raise InvalidRequest(f"snapshot {name!r} is still being written to disk; retry")
            try:
                fds = [os.open(entry.row.path, os.O_RDONLY | os.O_CLOEXEC)]
            except OSError as e:
                raise InvalidRequest(f"snapshot {name!r}: cannot open {entry.row.path}: "
                                     f"{e.strerror}") from e  # fmt: skip
            sizes = [entry.file_length]
        kind = pool.kind if pool is not None else "file"
        size = pool.size if pool is not None else entry.file_length
        offset = 0 if pool is not None else entry.payload_offset
        buffer_id = pool.id if pool is not None else 0
        session = Session(secrets.token_hex(16), "restore", token, peer.uid, name, fds, sizes,
                          buffer_id, time.monotonic(), delivery=delivery)  # fmt: skip
        self.sessions[session.id] = session
        entry.clients += 1
        entry.row.last_used = time.time()
        # After the reply: the event's log line is not the client's to wait for.
        asyncio.get_running_loop().call_soon(self.events.publish, "restore_started", name,
                                             f"pid {peer.pid} uid {peer.uid}")  # fmt: skip
        response = entry.manifest_pb()
        response.MergeFrom(pb.OpenRestoreResponse(
            session_id=session.id, tier=TIERS[entry.tier], pool_kind=POOL_KINDS[kind],
            pool_size=size, payload_offset=offset, payload_length=entry.payload_length,
            path=entry.row.path, delivery=delivery, buffer_id=buffer_id,
            pool_offset=pool_offset,
        ))  # fmt: skip
        return response

    async def copy_into(self, peer: Peer, token: str,
                        request: pb.DaemonCopyRequest) -> pb.DaemonCopyResponse:  # fmt: skip
        """CUDA IPC mode: copy a restore session's pool bytes into the client's GPU memory."""
        session = self._session(peer, request.session_id, "restore")
        entry = self.entries.get(session.name)
        pool = entry.pool if entry is not None else None
        if entry is None or pool is None or pool.kind != "vmm" or self.copier is None:
            raise InvalidRequest(f"snapshot {session.name!r} is not in this thawd's VMM pool: "
                                 "CUDA IPC copies need it pinned on a GPU host")  # fmt: skip
        if pool.id != session.buffer_id:
            raise InvalidRequest(f"snapshot {session.name!r} was re-pinned since this restore "
                                 "opened; restore again")  # fmt: skip
        # Any delivery may end here: a client whose import of the fds failed falls back to a
        # daemon copy on the same session.
        assert entry.manifest is not None
        entry.copying += 1
        try:
            tensors = entry.manifest.tensors
            nbytes, seconds = await self._daemon_copy(token, request, pool.addr, tensors,
                                                      to_host=False)  # fmt: skip
        finally:
            entry.copying -= 1
        return pb.DaemonCopyResponse(bytes=nbytes, duration_s=seconds)

    async def copy_out(self, peer: Peer, token: str,
                       request: pb.DaemonCopyRequest) -> pb.DaemonCopyResponse:  # fmt: skip
        """CUDA IPC mode of a freeze: copy the client's GPU tensors into the session's buffer."""
        session = self._session(peer, request.session_id, "freeze")
        buf = session.buffer
        if buf is None or buf.kind != "vmm" or self.copier is None:
            raise InvalidRequest("CUDA IPC copies need thawd's VMM pool (a GPU host)")
        session.copying += 1  # an abort or a disconnect leaves the buffer to the last copy
        try:
            nbytes, seconds = await self._daemon_copy(token, request, buf.addr, session.entries,
                                                      to_host=True)  # fmt: skip
        finally:
            session.copying -= 1
            ended = self.sessions.get(session.id) is not session
            if ended and not session.copying and session.buffer is not None:
                buf.close()
                session.buffer = None
        return pb.DaemonCopyResponse(bytes=nbytes, duration_s=seconds)

    async def _daemon_copy(self, token: str, request: pb.DaemonCopyRequest,
                           host: int, tensors: Sequence[TensorEntry],
                           to_host: bool) -> tuple[int, float]:  # fmt: skip
        from thaw.ipc import Job

        regions = [(r.ipc_handle, r.size) for r in request.regions]
        jobs = []
        for c in request.copies:
            if c.tensor >= len(tensors):
                raise InvalidRequest(f"no tensor {c.tensor} in this session's {len(tensors)}")
            t = tensors[c.tensor]
            jobs.append(Job(t.offset, c.region, c.offset, t.length))
        t0 = time.monotonic()
        await asyncio.to_thread(self.copier.copy, token, request.device_uuid, host, regions,
                                jobs, to_host)  # fmt: skip
        return sum(j.length for j in jobs), time.monotonic() - t0

    def shared_arena(self) -> VmmArena | None:
        """The VMM arena when clients may map it whole (share_pool), else None."""
        return self.arena if self.arena is not None and self.config.share_pool else None

    def pool_fds(self, start: int, count: int,
                 ) -> tuple[builtins.list[int], builtins.list[int], int]:  # fmt: skip
        """Fds of the whole VMM pool's chunks from `start`, their sizes and the pool's id, for
        a client that maps all of it (fd socket "pool"; the caller closes the fds). Only where
        pool fds are shared at all."""
        arena = self.shared_arena()
        if arena is None:
            raise InvalidRequest("this thawd shares no VMM pool (no GPU pool, or share_pool = "
                                 "false): restore without mapping the pool")  # fmt: skip
        if not 0 <= start < len(arena.chunks):
            raise InvalidRequest(f"pool chunk {start} out of range 0..{len(arena.chunks) - 1}")
        return (*arena.export_all(start, count), arena.id)

    def redeem(
        self, session_id: str, uid: int
    ) -> tuple[builtins.list[int], builtins.list[int], str, int]:
        """The fds of a session for the fd socket: only to the uid that opened it, only once.

        Returns (fds, bytes each maps, session kind, buffer id); the caller closes the fds."""
        session = self.sessions.get(session_id)
        if session is None or not session.fds:
            raise NotFound("no such session (closed, already redeemed, or the daemon restarted)")
        if session.uid != uid:
            raise PermissionDenied(f"session belongs to uid {session.uid}, not {uid}")
        fds, session.fds = session.fds, []
        return fds, session.sizes, session.kind, session.buffer_id

    def close_restore(self, peer: Peer, session_id: str, ok: bool, nbytes: int,
                      duration_s: float, error: str) -> None:  # fmt: skip
        session = self._session(peer, session_id, "restore")
        self._end_session(session)
        # The counters and the event (a log line) after the reply, the registry row within a
        # second (`_save_later`); the session itself ended above.
        asyncio.get_running_loop().call_soon(self._count_restore, session.name, ok, nbytes,
                                             duration_s, error)  # fmt: skip

    def _count_restore(self, name: str, ok: bool, nbytes: int, duration_s: float,
                       error: str) -> None:  # fmt: skip
        entry = self.entries.get(name)
        if entry is None:
            return
        if ok:
            entry.row.restores += 1
            entry.row.last_used = time.time()
            self._save_later(name)
            self.restores_total += 1
            self.bytes_restored_total += nbytes
            metrics.restored(nbytes, duration_s)
            rate = nbytes / duration_s / 1e9 if duration_s > 0 else 0.0
            self.events.publish("restore_finished", name,
                                f"{human(nbytes)} in {duration_s * 1e3:.1f} ms ({rate:.2f} GB/s)",
                                nbytes, duration_s)  # fmt: skip
        else:
            self.events.publish("restore_failed", name, error or "client reported failure")

    def open_size(self, name: str) -> int:
        """At most the bytes of an OpenRestoreResponse for `name`; NotFound if unregistered."""
        return self._get(name).open_size()

    def _save_later(self, name: str) -> None:
        """Write a row's restore counters within a second: one SQLite write per snapshot per
        second, however many restores (a write took as long as the confirmation itself, and
        the next request waited behind it). A killed thawd loses at most that second's."""
        self._unsaved.add(name)
        if self._save_handle is None:
            self._save_handle = asyncio.get_running_loop().call_later(1.0, self._save_rows)

    def _save_rows(self) -> None:
        self._save_handle = None
        for name in self._unsaved:
            entry = self.entries.get(name)
            if entry is not None:
                self.registry.update(entry.row)
        self._unsaved.clear()

    def _session(self, peer: Peer, session_id: str, kind: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.kind != kind:
            raise NotFound(f"no open {kind} session {session_id!r}")
        if session.uid != peer.uid:
            raise PermissionDenied(f"{kind} session belongs to uid {session.uid}")
        return session

    def _end_session(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        _close_all(session)
        if session.kind == "restore":
            entry = self.entries.get(session.name)
            if entry is not None:
                entry.clients = max(0, entry.clients - 1)
        elif session.buffer is not None and not session.copying:
            session.buffer.close()
            session.buffer = None

    def drop_token(self, token: str) -> None:
        """The client's fd-socket connection closed: end whatever it left open."""
        if self.copier is not None:
            asyncio.get_running_loop().run_in_executor(None, self.copier.forget, token)
        for session in [s for s in self.sessions.values() if s.token == token]:
            self._end_session(session)
            kind = "restore_failed" if session.kind == "restore" else "freeze_failed"
            self.events.publish(kind, session.name, "client went away")

    # --- freeze -----------------------------------------------------------------------------

    def begin_freeze(self, peer: Peer, token: str, name: str, path: str, fingerprint_json: str,
                     specs: builtins.list[tuple[str, str, tuple[int, ...]]], labels: dict[str, str],
                     pin: bool, daemon_copy: bool = False) -> pb.BeginFreezeResponse:  # fmt: skip
        validate_name(name)
        validate_labels(labels)
        if name in self.entries or any(s.name == name for s in self.sessions.values()
                                       if s.kind == "freeze"):  # fmt: skip
            raise AlreadyExists(f"a snapshot named {name!r} is already registered or being frozen")
        if not path:
            self.config.snapshot_dir.mkdir(parents=True, exist_ok=True)
            target = self.config.snapshot_dir / f"{name}.thaw"
        else:
            target = check_writable_dir(peer, path)
        if target.exists():
            raise AlreadyExists(f"{target} exists; remove it or choose another path")
        try:
            fingerprint = Fingerprint.from_json(json.loads(fingerprint_json or "{}"))
        except (ValueError, TypeError) as e:
            raise InvalidRequest(f"invalid fingerprint: {e}") from e
        if not specs:
            raise InvalidRequest("a freeze needs at least one tensor")
        seen: set[str] = set()
        for tname, dtype, shape in specs:
            if dtype not in DTYPES:
                raise InvalidRequest(f"tensor {tname!r}: unknown dtype {dtype!r}")
            if tname in seen or not tname:
                raise InvalidRequest(f"tensor name {tname!r} is empty or repeated")
            if any(d < 0 for d in shape):
                raise InvalidRequest(f"tensor {tname!r}: negative dimension in {shape}")
            seen.add(tname)
        entries = layout(specs)
        length = Manifest(fingerprint, tuple(entries)).payload_length
        self._make_room("pinned", self.pool_size(length), name)
        buf = PoolBuffer(self.pool_kind, name, length, self.config.mlock, self.arena)
        # A daemon copy (CopyOut) needs no fds; without one the client maps the buffer.
        fds, sizes = ([], []) if daemon_copy and buf.kind == "vmm" else buf.export()
        session = Session(secrets.token_hex(16), "freeze", token, peer.uid, name, fds, sizes,
                          buf.id, time.monotonic(), buf, entries, fingerprint, str(target),
                          labels, pin)  # fmt: skip
        self.sessions[session.id] = session
        self.events.publish("freeze_started", name, str(target), length)
        return pb.BeginFreezeResponse(
            session_id=session.id, pool_kind=POOL_KINDS[buf.kind], pool_size=buf.size,
            tensors=[_entry_pb(t) for t in entries], path=str(target),
        )  # fmt: skip

    async def commit_freeze(self, peer: Peer, session_id: str, wait: bool) -> pb.Snapshot:
        """The client's bytes are in the pool: register the snapshot and release the client.

        Checksums and the file come behind (`_write`), so the engine is free as soon as its
        device-to-host copy is done; `wait=True` returns once the file is durable instead."""
        session = self._session(peer, session_id, "freeze")
        if session.copying:
            raise InvalidRequest("a daemon copy into this freeze is still running; commit after it")
        buf = session.buffer
        assert buf is not None and session.fingerprint is not None
        # Out of the sessions table first: a commit cannot race an abort or a disconnect.
        del self.sessions[session.id]
        _close_all(session)
        try:
            await asyncio.to_thread(buf.finish)
        except BlockingIOError as e:
            buf.close()
            self.events.publish("freeze_failed", session.name, "the client kept it mapped")
            raise InvalidRequest("the freeze buffer is still mapped writable by the client: "
                                 "unmap it before CommitFreeze") from e  # fmt: skip
        manifest = Manifest(session.fingerprint, tuple(session.entries))  # checksums to come
        row = new_row(session.name, session.path, session.labels, peer.uid)
        row.wanted_tier = "pinned" if session.pin else "cold"
        row.checksum_state = "unverified"
        entry = Entry(row, manifest, PAYLOAD_OFFSET, manifest.payload_length, 0, "pinned", buf,
                      file_pending=True)  # fmt: skip
        self.entries[entry.row.name] = entry
        self.registry.add(row)
        elapsed = time.monotonic() - session.started
        self.events.publish("freeze_committed", entry.row.name, session.path,
                            entry.payload_length, elapsed)  # fmt: skip
        task = asyncio.ensure_future(self._write(entry))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        if wait:
            await asyncio.shield(task)
            if entry.row.error:
                raise InvalidRequest(f"snapshot {entry.row.name!r} could not be written: "
                                     f"{entry.row.error}")  # fmt: skip
        return self.record(entry)

    async def _write(self, entry: Entry) -> None:
        """Checksum a frozen snapshot's pool buffer, then write it to disk atomically."""
        assert entry.manifest is not None and entry.pool is not None
        buf, manifest, path = entry.pool, entry.manifest, entry.row.path
        threads = self.config.io_threads
        t0 = time.monotonic()

        def work() -> None:
            checksums = [_native.tree_hash(buf.addr + t.offset, t.length, threads)
                         for t in manifest.tensors]  # fmt: skip
            pairs = zip(manifest.tensors, checksums, strict=True)
            tensors = tuple(dataclasses.replace(t, checksum=c) for t, c in pairs)
            entry.manifest = Manifest(manifest.fingerprint, tensors)
            entry.row.checksum_state = "verified"
            with SnapshotWriter(path, manifest.tensors) as w:
                if w.payload_length:
                    w.write_at(0, buf.addr, w.payload_length, threads)
                w.commit(manifest.fingerprint, checksums)

        try:
            await asyncio.to_thread(work)
            await asyncio.to_thread(entry.load, path)
            self.registry.update(entry.row)
        except Exception as e:
            entry.row.error = f"writing {path} failed: {e}"
            self.registry.remove(entry.row.name)
            self.events.publish("freeze_failed", entry.row.name, entry.row.error)
            log.error("freeze of %s: %s", entry.row.name, entry.row.error)
        else:
            self.events.publish("freeze_written", entry.row.name, path, entry.file_length,
                                time.monotonic() - t0)  # fmt: skip
        finally:
            entry.file_pending = False

    def abort_freeze(self, peer: Peer, session_id: str) -> None:
        session = self._session(peer, session_id, "freeze")
        self._end_session(session)
        self.events.publish("freeze_failed", session.name, "aborted by the client")

    # --- start and stop ---------------------------------------------------------------------

    async def repin(self, on_progress: Callable[[str], object]) -> None:
        wanted = [e for e in self.entries.values() if e.row.wanted_tier != "cold"]
        for i, entry in enumerate(wanted):
            on_progress(f"re-pinning {entry.row.name} ({i + 1}/{len(wanted)})")
            try:
                async for _ in self.pin(Peer(os.getpid(), os.getuid(), os.getgid(), frozenset()),
                                        entry.row.name, entry.row.wanted_tier):  # fmt: skip
                    pass
            except Exception as e:
                entry.row.error = str(e)
                log.error("re-pinning %s failed: %s", entry.row.name, e)

    async def drain(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while (self.sessions or self._writes) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._writes:
            log.warning("waiting for %d snapshot writes to finish", len(self._writes))
            await asyncio.gather(*self._writes, return_exceptions=True)

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self._end_session(session)
        for entry in self.entries.values():
            self._release(entry)
        if self.copier is not None:
            self.copier.close()
        if self.arena is not None:
            self.arena.close()
        if self._save_handle is not None:
            self._save_handle.cancel()
        self._save_rows()
        self.registry.close()


def _close_all(session: Session) -> None:
    for fd in session.fds:
        os.close(fd)
    session.fds = []


def _entry_pb(t: TensorEntry) -> pb.TensorEntry:
    return pb.TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape), offset=t.offset,
                          length=t.length, checksum=t.checksum)  # fmt: skip
