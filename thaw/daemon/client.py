"""The client of thawd: `thaw.connect()` and the records it returns.

    import thaw
    c = thaw.connect()                 # $THAW_SOCKET, /run/thawd/thawd.sock, $XDG_RUNTIME_DIR/thawd
    c.pin("llama8b", progress=print)
    c.restore(model, "llama8b")        # checks names, dtypes, shapes before a byte moves

Control goes over gRPC; memory comes as an fd over the fd socket (thaw/daemon/fdsocket.py) and
is mapped here (thaw/mem/mapping.py); thaw.copy.datapath copies it into the model's tensors. A
Client is thread-safe. Everything it returns is an immutable record; values the daemon did not
know are the sentinel `NA`, never None.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from thaw import errors
from thaw._proto import thawd_pb2 as pb
from thaw._proto import thawd_pb2_grpc as pb_grpc
from thaw.daemon import fdsocket
from thaw.daemon.pool_map import PoolMap
from thaw.format import TensorEntry
from thaw.format.fingerprint import Fingerprint, check
from thaw.mem.mapping import Mapping as MemoryMapping

SYSTEM_SOCKET = "/run/thawd/thawd.sock"
RESTORE_MODES = ("auto", "ipc")
HOW_TO_START = (
    "start it with `systemctl start thawd` (or run `thawd --config FILE` by hand), or point "
    "$THAW_SOCKET at its socket"
)


class _NotAvailable:
    """The value of a field the daemon did not know. Falsy, prints as "NA"."""

    _instance: _NotAvailable | None = None

    def __new__(cls) -> _NotAvailable:
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


NA: Any = _NotAvailable()

log = logging.getLogger("thaw.daemon")

_TIERS = {pb.TIER_COLD: "cold", pb.TIER_WARM: "warm", pb.TIER_PINNED: "pinned"}
_CHECKSUM = {
    pb.CHECKSUM_STATE_UNVERIFIED: "unverified",
    pb.CHECKSUM_STATE_VERIFIED: "verified",
    pb.CHECKSUM_STATE_CORRUPT: "corrupt",
}
_POOLS = {pb.POOL_KIND_MEMFD: "memfd", pb.POOL_KIND_VMM: "vmm", pb.POOL_KIND_FILE: "file"}
_DELIVERIES = {pb.DELIVERY_POOL: "pool", pb.DELIVERY_MAPPED: "mapped", pb.DELIVERY_FDS: "fds"}


# --- records ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SnapshotRecord:
    """One registered snapshot as the daemon saw it when asked."""

    name: str
    path: str
    labels: Mapping[str, str]
    tier: str  # cold | warm | pinned: where the bytes are now
    wanted_tier: str  # where the operator asked them to be
    size_bytes: int
    file_bytes: int | Any  # NA while a frozen snapshot is still being written
    resident_bytes: int
    last_used: float | Any  # unix time, NA if never restored
    clients: int
    restores: int
    checksum_state: str  # unverified | verified | corrupt
    fingerprint: Fingerprint | Any
    tensor_count: int
    registered: float
    error: str  # "" when none
    file_pending: bool
    owner_uid: int = -1  # who registered or froze it (they, root or thawd's admins change it)
    content_id: str | Any = NA  # 16 hex digits naming the payload's bytes (NA while unknown)

    @property
    def resident_fraction(self) -> float:
        return self.resident_bytes / self.size_bytes if self.size_bytes else 1.0

    @classmethod
    def from_pb(cls, m: pb.Snapshot) -> SnapshotRecord:
        try:
            fingerprint = Fingerprint.from_json(json.loads(m.fingerprint_json))
        except (ValueError, TypeError):
            fingerprint = NA
        return cls(
            name=m.name, path=m.path, labels=dict(m.labels), tier=_TIERS.get(m.tier, "cold"),
            wanted_tier=_TIERS.get(m.wanted_tier, "cold"), size_bytes=m.size_bytes,
            file_bytes=m.file_bytes if m.file_bytes or not m.file_pending else NA,
            resident_bytes=m.resident_bytes, last_used=m.last_used_unix or NA,
            clients=m.clients, restores=m.restores,
            checksum_state=_CHECKSUM.get(m.checksum_state, "unverified"),
            fingerprint=fingerprint, tensor_count=m.tensor_count,
            registered=m.registered_unix, error=m.error, file_pending=m.file_pending,
            owner_uid=m.owner_uid, content_id=m.content_id or NA,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GpuRecord:
    index: int
    name: str
    memory_total: int
    memory_used: int | Any
    link: str | Any


@dataclasses.dataclass(frozen=True)
class DaemonStatus:
    version: str
    api_version: str
    pid: int
    started: float
    uptime_s: float
    pool_kind: str  # memfd | vmm
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
        gpus = tuple(GpuRecord(g.index, g.name, g.memory_total, g.memory_used or NA, g.link or NA)
                     for g in m.gpus)  # fmt: skip
        return cls(
            version=m.version, api_version=m.api_version, pid=m.pid, started=m.started_unix,
            uptime_s=m.uptime_s, pool_kind=_POOLS.get(m.pool_kind, "memfd"),
            pinned_budget=m.pinned_budget, pinned_used=m.pinned_used, warm_budget=m.warm_budget,
            warm_used=m.warm_used, host_memory_total=m.host_memory_total,
            host_memory_available=m.host_memory_available, gpus=gpus, snapshots=m.snapshots,
            active_restores=m.active_restores, active_freezes=m.active_freezes,
            restores_total=m.restores_total, bytes_restored_total=m.bytes_restored_total,
            memory_locked=m.memory_locked, socket=m.socket, share_pool=m.share_pool,
            registry_unsaved=m.registry_unsaved, registry_error=m.registry_error,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened in the daemon (see the kinds in proto/thaw/v1/thawd.proto)."""

    time: float
    kind: str
    snapshot: str | Any
    message: str
    bytes: int
    duration_s: float


@dataclasses.dataclass(frozen=True)
class Metrics:
    """The periodic picture of the daemon on the watch stream."""

    time: float
    status: DaemonStatus
    snapshots: tuple[SnapshotRecord, ...]
    restore_bytes_per_s: float


@dataclasses.dataclass(frozen=True)
class PinProgress:
    done_bytes: int
    total_bytes: int
    elapsed_s: float
    done: bool
    snapshot: SnapshotRecord | Any  # set on the last message

    @property
    def gbps(self) -> float:
        return self.done_bytes / self.elapsed_s / 1e9 if self.elapsed_s > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    snapshot: SnapshotRecord
    bytes: int
    seconds: float
    source: str  # "pool" or "file": where the daemon read the bytes it hashed


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    name: str
    tier: str
    bytes: int
    seconds: float
    # How the bytes came (docs/DAEMON.md, "Deliveries"): "pool" (this process maps thawd's
    # whole pool), "mapped" (an earlier restore mapped the buffer), "fds" (the buffer's fds
    # were handed over now), "file" (not pinned: the snapshot file), "daemon_copy" (CUDA IPC).
    delivery: str = ""
    content_id: str = ""  # the restored payload's identity (thaw.format.Manifest.content_id)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


# --- errors -------------------------------------------------------------------------------------

_BY_NAME: dict[str, type[errors.DaemonError]] = {
    c.__name__: c
    for c in (
        errors.NotFound,
        errors.AlreadyExists,
        errors.PermissionDenied,
        errors.BudgetExceeded,
        errors.InvalidRequest,
        errors.DaemonUnavailable,
        errors.SnapshotChanged,
    )
}
_BY_CODE: dict[grpc.StatusCode, type[errors.DaemonError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.BudgetExceeded,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest,
    grpc.StatusCode.UNAVAILABLE: errors.DaemonUnavailable,
}


def _error(e: grpc.RpcError, socket: str) -> errors.DaemonError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else "") or str(code)
    trailers = dict(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else {}
    cls_name = trailers.get("thaw-error", "")
    snapshot_error = getattr(errors, cls_name, None) if cls_name else None
    if code is grpc.StatusCode.DATA_LOSS or (
        isinstance(snapshot_error, type) and issubclass(snapshot_error, errors.SnapshotError)
    ):
        checksums = trailers.get("thaw-checksums", "").split()
        return errors.SnapshotCorrupt(details, trailers.get("thaw-tensor", ""),
                                      *(int(c, 16) for c in checksums[:2]))  # fmt: skip
    if code is grpc.StatusCode.UNAVAILABLE and not cls_name:
        return errors.DaemonUnavailable(f"thawd at {socket} is not answering ({details}); "
                                        + HOW_TO_START)  # fmt: skip
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and not cls_name:
        return errors.DaemonUnavailable(f"thawd at {socket} did not answer in time: stopped "
                                        "or stuck? check `systemctl status thawd`")  # fmt: skip
    cls = _BY_NAME.get(cls_name) or _BY_CODE.get(code, errors.DaemonError)
    return cls(details)


def _refused(reply: Mapping[str, Any]) -> errors.DaemonError:
    """The exception for an fd-socket reply that is not ok: the class thawd names."""
    return _BY_NAME.get(reply.get("error", ""), errors.DaemonError)(reply.get("message", ""))


# --- the client ---------------------------------------------------------------------------------


def default_socket() -> str:
    """$THAW_SOCKET, else /run/thawd/thawd.sock if present, else $XDG_RUNTIME_DIR/thawd/..."""
    env = os.environ.get("THAW_SOCKET")
    if env:
        return env
    candidates = [SYSTEM_SOCKET]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "thawd", "thawd.sock"))
    for path in candidates:
        if os.path.exists(path):
            return path
    return SYSTEM_SOCKET


def connect(socket: str | None = None, *, timeout: float = 30.0) -> Client:
    """Connect to the local thawd; raises DaemonUnavailable (with how to start it) if none runs."""
    client = Client(socket or default_socket(), timeout=timeout)
    prepare(client)
    return client


def prepare(client: Client) -> None:
    """In a process with torch, import the data path now rather than inside the first
    restore (milliseconds that an engine's first restore would pay); in one that already
    uses CUDA, also map thawd's pool for its GPU (in the background) and make the driver
    calls a restore makes once, so that their bindings are resolved."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    from thaw.copy import datapath

    if torch.cuda.is_initialized():
        from thaw.mem import vmm

        device = torch.cuda.current_device()
        client.map_pool(device)
        vmm.warm_up()
        datapath.warm_up(device)


class Client:
    """A connection to thawd. Thread-safe; close() (or `with`) releases sockets and mappings."""

    def __init__(self, socket: str, *, timeout: float = 30.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self._lock = threading.Lock()  # the fd socket (one request/reply at a time), the pool map
        self._maps_lock = threading.Lock()
        self._fd_sock: Any = None
        self._token = ""
        self._pid = os.getpid()
        self._mappings: dict[str, tuple[int, Any]] = {}  # name -> (buffer id, mapping)
        self._pool: dict[str, int] | None = None  # the VMM pool thawd lets clients map whole
        self._pool_map: PoolMap | None = None
        self._authenticate()
        self._channel = grpc.insecure_channel(
            f"unix:{socket}", options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self._stub = pb_grpc.ThawdStub(self._channel)
        # Connect now, not in the first call: an engine's first restore should not pay it.
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self.close()
            raise errors.DaemonUnavailable(
                f"thawd at {socket} accepted the fd socket but not gRPC in {timeout} s"
            ) from None

    # --- plumbing -----------------------------------------------------------------------------

    def _authenticate(self) -> None:
        path = fdsocket.fd_socket_path(self.socket)
        with self._lock:
            self._drop_fd_sock()
            try:
                sock = fdsocket.connect(path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise errors.DaemonUnavailable(
                    f"no thawd is running at {self.socket} ({e.strerror}): {HOW_TO_START}"
                ) from None
            except PermissionError:
                raise errors.PermissionDenied(
                    f"uid {os.getuid()} may not connect to {path}: join the thawd socket group "
                    "(socket_group in the thawd config) or ask for allow_uids"
                ) from None
            # A thawd that is stopped or stuck accepts connections but never answers: a call
            # on the fd socket waits `timeout` seconds at most, never forever.
            sock.settimeout(self.timeout)
            try:
                reply, fds = self._exchange(sock, {"op": "auth"}, " on its fd socket")
            except errors.DaemonUnavailable:
                sock.close()
                raise
            except (ConnectionError, OSError) as e:
                sock.close()
                raise errors.DaemonUnavailable(
                    f"thawd at {self.socket} closed the fd socket: {e}"
                ) from None
            for fd in fds:
                os.close(fd)
            if not reply.get("ok"):
                sock.close()
                raise _refused(reply)
            self._fd_sock, self._token = sock, reply["token"]
            self._pool = reply.get("pool")
            old = self._pool_map
            if old is None or (self._pool is not None and self._pool["id"] == old.pool_id):
                return
            self._pool_map = None
        # thawd restarted: its old pool goes and its new one comes. The old map goes once the
        # restores holding it end, on its own thread: this thread may be one of them (its
        # open found the restart), and waiting here would wait for itself.
        old.close(wait=False)
        self.map_pool(old.device)

    def map_pool(self, device: int) -> bool:
        """Map thawd's whole pinned pool for CUDA device `device` (imported now, mapped in the
        background), so that no restore to that GPU maps memory or takes fds (docs/DAEMON.md).
        `connect()` does this in a process that uses CUDA. False where thawd shares no pool."""
        with self._lock:
            return self._map_pool(device)

    def _map_pool(self, device: int) -> bool:
        if self._pool is None:
            return False
        if self._pool_map is None:
            try:
                self._pool_map = PoolMap(fdsocket.fd_socket_path(self.socket), self._pool, device)
            except (OSError, errors.ThawError) as e:
                log.info("not mapping thawd's pool (%s): restores map their own buffers", e)
                return False
        return True

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((fdsocket.TOKEN_METADATA_KEY, self._token), ("x-request-id", uuid.uuid4().hex[:16]))

    def _call(self, method: str, request: Any, timeout: float | str | None = "default") -> Any:
        """A unary call; re-authenticates once if the daemon restarted and forgot our token.

        `timeout`: seconds, None for no deadline (long work: verify, a waited-for freeze)."""
        deadline = self.timeout if timeout == "default" else timeout
        for attempt in (0, 1):
            try:
                return getattr(self._stub, method)(request, metadata=self._metadata(),
                                                   timeout=deadline)  # fmt: skip
            except grpc.RpcError as e:
                if attempt == 0 and e.code() is grpc.StatusCode.UNAUTHENTICATED:
                    self._authenticate()
                    continue
                raise _error(e, self.socket) from None
        raise AssertionError("unreachable")

    def _stream(self, method: str, request: Any, timeout: float | None) -> Iterator[Any]:
        for attempt in (0, 1):
            call = getattr(self._stub, method)(request, metadata=self._metadata(), timeout=timeout)
            first = True
            try:
                for item in call:
                    first = False
                    yield item
                return
            except grpc.RpcError as e:
                if first and attempt == 0 and e.code() is grpc.StatusCode.UNAUTHENTICATED:
                    self._authenticate()
                    continue
                raise _error(e, self.socket) from None
            finally:
                call.cancel()

    def _redeem(self, session_id: str) -> tuple[list[int], list[int], int]:
        """The fds of an open session, over the fd socket (checked against our SO_PEERCRED):
        (fds, bytes each maps, the daemon's buffer id). The caller closes the fds."""
        reply, fds = self._fd_call({"op": "fd", "session": session_id},
                                   "while handing over memory")  # fmt: skip
        sizes = [int(n) for n in reply.get("sizes", [])]
        if not reply.get("ok") or not fds or len(fds) != len(sizes):
            for fd in fds:
                os.close(fd)
            raise _refused(reply)
        return fds, sizes, int(reply.get("buffer", 0))

    # --- snapshots ----------------------------------------------------------------------------

    def register(self, path: str | os.PathLike[str], name: str = "",
                 labels: Mapping[str, str] | None = None) -> SnapshotRecord:  # fmt: skip
        """Register a snapshot file (cold) under `name` (default: the file name)."""
        request = pb.RegisterRequest(path=os.path.abspath(os.fspath(path)), name=name,
                                     labels=dict(labels or {}))  # fmt: skip
        return SnapshotRecord.from_pb(self._call("Register", request).snapshot)

    def unregister(self, name: str) -> None:
        self._call("Unregister", pb.UnregisterRequest(name=name))
        self.forget(name)

    def pin_progress(self, name: str, *, warm: bool = False) -> Iterator[PinProgress]:
        """Pin (or warm) a snapshot, yielding progress; the last item has done=True."""
        tier = pb.TIER_WARM if warm else pb.TIER_PINNED
        for p in self._stream("Pin", pb.PinRequest(name=name, tier=tier), None):
            yield PinProgress(p.done_bytes, p.total_bytes, p.elapsed_s, p.done,
                              SnapshotRecord.from_pb(p.snapshot) if p.done else NA)  # fmt: skip

    def pin(self, name: str, *, warm: bool = False,
            progress: Callable[[PinProgress], None] | None = None) -> SnapshotRecord:  # fmt: skip
        """Pin a snapshot into the daemon's page-locked pool (warm=True: page cache only).

        Every tensor's checksum is verified while reading; a damaged file raises
        SnapshotCorrupt naming the tensor. BudgetExceeded carries the numbers.
        """
        last: PinProgress | None = None
        for p in self.pin_progress(name, warm=warm):
            last = p
            if progress is not None:
                progress(p)
        assert last is not None and last.done
        return last.snapshot

    def unpin(self, name: str) -> SnapshotRecord:
        record = SnapshotRecord.from_pb(self._call("Unpin", pb.UnpinRequest(name=name)).snapshot)
        self.forget(name)
        return record

    def list(self) -> list[SnapshotRecord]:
        return [SnapshotRecord.from_pb(s) for s in self._call("List", pb.ListRequest()).snapshots]

    def stat(self, name: str) -> SnapshotRecord:
        return SnapshotRecord.from_pb(self._call("Stat", pb.StatRequest(name=name)).snapshot)

    def verify(self, name: str) -> VerifyResult:
        """Have thawd re-check `name`'s checksums where its bytes are (pool, else file).

        Raises SnapshotCorrupt naming the tensor when one does not match; the snapshot is then
        marked corrupt. Takes as long as hashing the payload: no deadline."""
        reply = self._call("Verify", pb.VerifyRequest(name=name), timeout=None)
        return VerifyResult(SnapshotRecord.from_pb(reply.snapshot), reply.bytes, reply.duration_s,
                            reply.source)  # fmt: skip

    def status(self) -> DaemonStatus:
        return DaemonStatus.from_pb(self._call("Status", pb.StatusRequest()))

    def watch(self, interval_s: float = 1.0) -> Iterator[Event | Metrics]:
        """Events as they happen and Metrics every `interval_s`, until the iterator is closed.

        Raises DaemonUnavailable when the daemon goes away; reconnecting is the caller's loop.
        """
        for u in self._stream("Watch", pb.WatchRequest(interval_s=interval_s), None):
            if u.HasField("event"):
                e = u.event
                yield Event(u.time_unix, e.kind, e.snapshot or NA, e.message, e.bytes, e.duration_s)
            else:
                m = u.metrics
                yield Metrics(u.time_unix, DaemonStatus.from_pb(m.status),
                              tuple(SnapshotRecord.from_pb(s) for s in m.snapshots),
                              m.restore_bytes_per_s)  # fmt: skip

    # --- restore and freeze -------------------------------------------------------------------

    def restore_tensors(self, target: Any, name: str, *, strict: bool = True,
                expect: Fingerprint | None = None,
                progress: Callable[[int, int], None] | None = None,
                mode: str | None = None) -> RestoreResult:  # fmt: skip
        """Restore `target` (torch module, state dict or (name, tensor) pairs) from snapshot `name`.

        Names, dtypes and shapes (and the fingerprint, with `expect`) are checked before a byte
        moves. The restore counts only once the daemon confirms it: if thawd dies on the way,
        DaemonUnavailable is raised and the model must be restored again before use.
        `progress(done_bytes, total_bytes)` is called before and after the copy.

        `mode` (default $THAW_RESTORE_MODE, else "auto"): "auto" maps the daemon's pool memory
        and copies with this process's streams, falling back to a daemon copy when this process
        cannot import it; "ipc" never maps pool memory: thawd copies into this process's CUDA
        tensors over CUDA IPC (the file is mapped instead for unpinned snapshots).
        """
        return self._restore([(target, name)], strict, expect, progress, mode)[0]

    def restore_many(self, items: Sequence[tuple[Any, str]], *, strict: bool = True,
                     mode: str | None = None) -> builtins.list[RestoreResult]:  # fmt: skip
        """Restore several snapshots, each `(target, name)` as `restore_tensors` would, with the
        control calls of all of them overlapped: one round trip to thawd to open them all and
        one to confirm them all, instead of two per snapshot (KV prefixes of many requests, a
        model's parts). The copies run one after the other. When one fails, the ones before
        it are restored and confirmed, the rest are not, and the error names them."""
        return self._restore(list(items), strict, None, None, mode)

    def _restore(self, items: builtins.list[tuple[Any, str]], strict: bool,
                 expect: Fingerprint | None, progress: Callable[[int, int], None] | None,
                 mode: str | None) -> builtins.list[RestoreResult]:  # fmt: skip
        mode = mode or os.environ.get("THAW_RESTORE_MODE") or "auto"
        if mode not in RESTORE_MODES:
            raise errors.InvalidRequest(f"restore mode {mode!r}: use one of {RESTORE_MODES}")
        held = self._hold_pool()
        try:
            return self._restore_held(items, strict, expect, progress, mode, held)
        finally:
            if held is not None:
                held.release()

    def _restore_held(self, items: builtins.list[tuple[Any, str]], strict: bool,
                      expect: Fingerprint | None, progress: Callable[[int, int], None] | None,
                      mode: str, held: Any) -> builtins.list[RestoreResult]:  # fmt: skip
        from thaw.copy import datapath

        t0 = time.perf_counter()
        plans, requests = [], []
        for target, name in items:
            named = datapath.model_tensors(target)
            cuda_only = bool(named) and all(t.device.type == "cuda" for _, t in named)
            if mode == "ipc" and not cuda_only:
                raise errors.InvalidRequest("restore mode 'ipc' copies into CUDA tensors only; "
                                            "use mode 'auto' for CPU tensors")  # fmt: skip
            with self._maps_lock:
                cached = self._mappings.get(name)
            devices = {t.device.index or 0 for _, t in named}
            mirror = held if cuda_only and held is not None and devices == {held.device} else None
            plans.append((name, named, mirror))
            requests.append(pb.OpenRestoreRequest(
                name=name, mapped_buffer=cached[0] if cached else 0, daemon_copy=mode == "ipc",
                can_daemon_copy=cuda_only, pool_id=mirror.id if mirror else 0))  # fmt: skip
        infos = self._open_many(requests)
        t_open = time.perf_counter()
        closes: builtins.list[pb.CloseRestoreRequest] = []
        results = []
        # A batch leaves each snapshot's GPU copies in flight and waits once, at the end: no
        # idle link between one snapshot's copies and the next one's.
        in_flight = len(items) > 1
        devices = {t.device.index or 0 for _, named, _ in plans for _, t in named
                   if t.device.type == "cuda"}  # fmt: skip
        try:
            for (name, named, mirror), info in zip(plans, infos, strict=True):
                started = time.perf_counter()
                copied, delivery = self._copy_session(name, info, named, strict, expect,
                                                      progress, in_flight, mirror)  # fmt: skip
                seconds = time.perf_counter() - started
                closes.append(pb.CloseRestoreRequest(session_id=info.session_id, ok=True,
                                                     bytes=copied, duration_s=seconds))  # fmt: skip
                results.append(RestoreResult(name, _TIERS.get(info.tier, "cold"), copied, seconds,
                                             delivery, _content_id(info)))  # fmt: skip
            for device in devices if in_flight else ():
                datapath.finish_copies(device)
        except BaseException as e:
            for device in devices if in_flight else ():
                with contextlib.suppress(errors.ThawError):
                    datapath.finish_copies(device)
            failure = f"{type(e).__name__}: {e}"[:1000]
            done = {c.session_id for c in closes}
            closes += [pb.CloseRestoreRequest(session_id=i.session_id, ok=False, error=failure)
                       for i in infos if i.session_id not in done]  # fmt: skip
            with contextlib.suppress(errors.DaemonError):  # the original error says more
                self._close_sessions(closes)
            if len(items) > 1:
                restored = ", ".join(repr(r.name) for r in results) or "none"
                e.add_note(f"restored and confirmed before it: {restored}; the rest are not")
            raise
        t_copy = time.perf_counter()
        try:
            self._close_sessions(closes)
        except errors.DaemonError as e:
            names = ", ".join(repr(r.name) for r in results)
            raise errors.DaemonUnavailable(
                f"thawd went away during the restore of {names} ({e}); the restore is not "
                "confirmed: restore again (or reload the model) before serving"
            ) from e
        seconds = time.perf_counter() - t0
        total = sum(r.bytes for r in results)
        log.debug("restore %s: open %.1f ms, copy %.1f ms (%.2f GB/s), close %.1f ms",
                  ", ".join(r.name for r in results), (t_open - t0) * 1e3,
                  (t_copy - t_open) * 1e3, total / max(t_copy - t_open, 1e-9) / 1e9,
                  (seconds - (t_copy - t0)) * 1e3)  # fmt: skip
        if len(results) == 1:  # the whole call, control path included
            results[0] = dataclasses.replace(results[0], seconds=seconds)
        return results

    def _open_many(self, requests: builtins.list[pb.OpenRestoreRequest],
                   ) -> builtins.list[pb.OpenRestoreResponse]:  # fmt: skip
        """Open a restore session for each request: in one packet on the fd socket (a tenth of
        a gRPC call's latency), or, where their manifests do not fit one, with OpenRestore
        calls all in flight at once. On any failure no session stays open and the first
        error is raised."""
        if len(requests) <= fdsocket.MAX_OPENS:
            reply = self._fd_request(
                {"op": "open",
                 "restores": [base64.b64encode(r.SerializeToString()).decode() for r in requests]},
                "while opening a restore", reconnect=True)  # fmt: skip
            if reply.get("ok"):
                return [pb.OpenRestoreResponse.FromString(base64.b64decode(o))
                        for o in reply["opened"]]  # fmt: skip
            if reply.get("error") != fdsocket.TOO_LARGE:
                raise _refused(reply)
        if len(requests) == 1:
            return [self._call("OpenRestore", requests[0])]
        for attempt in (0, 1):
            infos, failures = self._in_flight("OpenRestore", requests)
            if not failures:
                return infos
            with contextlib.suppress(errors.DaemonError):
                self._close_sessions([pb.CloseRestoreRequest(
                    session_id=i.session_id, ok=False, error="not restored: another of the "
                    "batch failed to open") for i in infos])  # fmt: skip
            if attempt == 0 and not infos and failures[0].code() is grpc.StatusCode.UNAUTHENTICATED:
                self._authenticate()  # the daemon restarted and forgot our token
                continue
            raise _error(failures[0], self.socket) from None
        raise AssertionError("unreachable")

    def _close_sessions(self, closes: builtins.list[pb.CloseRestoreRequest]) -> None:
        """End restore sessions, confirming or failing each, on the fd socket: one packet
        for a whole batch, at a tenth of a gRPC call's latency (every restore waits for its
        confirmation). Raises the daemon's first refusal, DaemonUnavailable if it is gone."""
        for at in range(0, len(closes), fdsocket.MAX_CLOSES):
            sessions = [{"id": c.session_id, "ok": c.ok, "bytes": c.bytes,
                         "seconds": c.duration_s, "error": c.error}
                        for c in closes[at : at + fdsocket.MAX_CLOSES]]  # fmt: skip
            reply = self._fd_request({"op": "close", "sessions": sessions},
                                     "while confirming a restore")  # fmt: skip
            if not reply.get("ok"):
                raise _refused(reply)

    def _fd_request(self, message: dict[str, Any], doing: str, reconnect: bool = False,
                    ) -> dict[str, Any]:  # fmt: skip
        """`_fd_call` for a request whose reply carries no fds (any that come are closed)."""
        reply, fds = self._fd_call(message, doing, reconnect)
        for fd in fds:
            os.close(fd)
        return reply

    def _fd_call(self, message: dict[str, Any], doing: str = "", reconnect: bool = False,
                 ) -> tuple[dict[str, Any], builtins.list[int]]:  # fmt: skip
        """One request and its reply on the fd socket: (reply, the fds attached, which the
        caller closes). DaemonUnavailable when thawd is gone (`doing` says when).
        `reconnect`: connect anew when the connection is gone or broke (thawd restarted) and
        send the request again, once; only for requests that change nothing when lost."""
        when = f" {doing}" if doing else ""
        for attempt in (0, 1):
            if reconnect and self._fd_sock is None:
                self._authenticate()
            with self._lock:
                sock = self._fd_sock
                if sock is None:
                    raise errors.DaemonUnavailable("not connected to thawd")
                try:
                    return self._exchange(sock, message, when)
                except errors.DaemonUnavailable:
                    self._drop_fd_sock()
                    raise
                except (ConnectionError, OSError) as e:
                    # A reply may still come on this connection: never read it as another's.
                    self._drop_fd_sock()
                    if not reconnect or attempt:
                        raise errors.DaemonUnavailable(
                            f"thawd at {self.socket} went away{when} ({e})"
                        ) from None
        raise AssertionError("unreachable")

    def _exchange(self, sock: Any, message: dict[str, Any], when: str,
                  ) -> tuple[dict[str, Any], builtins.list[int]]:  # fmt: skip
        """Send `message` on an fd-socket connection and receive the reply: DaemonUnavailable
        when thawd does not answer within the timeout (`when`: " while ...", or "");
        a broken connection raises as it is."""
        try:
            fdsocket.send(sock, message)
            return fdsocket.recv(sock)
        except TimeoutError:
            raise errors.DaemonUnavailable(
                f"thawd at {self.socket} did not answer{when} in {self.timeout} s "
                "(stopped or stuck?): check `systemctl status thawd`"
            ) from None

    def _drop_fd_sock(self) -> None:
        """Close the fd socket (thawd revokes its token with it: the next gRPC call is refused
        and re-authenticates). Called with the lock held."""
        if self._fd_sock is not None:
            self._fd_sock.close()
            self._fd_sock = None

    def _in_flight(self, method: str, requests: builtins.list[Any],
                   ) -> tuple[builtins.list[Any], builtins.list[grpc.RpcError]]:  # fmt: skip
        """Send every request at once; (the replies that came, the failures), once all ended."""
        call = getattr(self._stub, method)
        futures = [call.future(r, metadata=self._metadata(), timeout=self.timeout)
                   for r in requests]  # fmt: skip
        replies, failures = [], []
        for future in futures:
            try:
                replies.append(future.result())
            except grpc.RpcError as e:
                failures.append(e)
        return replies, failures

    def _copy_session(self, name: str, info: pb.OpenRestoreResponse, named: Any, strict: bool,
                      expect: Fingerprint | None, progress: Callable[[int, int], None] | None,
                      in_flight: bool = False, mirror: Any = None) -> tuple[int, str]:  # fmt: skip
        """Check and copy one opened restore into its tensors; returns (bytes copied, how they
        came: RestoreResult.delivery).
        `in_flight`: direct GPU copies may still run on return (datapath.finish_copies).
        `mirror`: our map of the whole pool, when the request offered it."""
        from thaw.copy import datapath

        total = sum(t.length for t in info.tensors)
        entries = [TensorEntry(t.name, t.dtype, tuple(t.shape), t.offset, t.length, t.checksum)
                   for t in info.tensors]  # fmt: skip
        if expect is not None:
            check(expect, Fingerprint.from_json(json.loads(info.fingerprint_json)))
        bindings = datapath.bind(entries, named, strict=strict)
        if info.pool_kind == pb.POOL_KIND_FILE:
            return self._copy_file(name, info, bindings, total, progress), "file"
        source = None if info.delivery == pb.DELIVERY_DAEMON_COPY else self._map(
            name, info, bindings, mirror)  # fmt: skip
        if source is None:  # the daemon copies: export our allocations to it
            index = {t.name: i for i, t in enumerate(info.tensors)}
            batches = datapath.batches_for_daemon(bindings, index)
            first = next(batches, None)  # a refusal here is before any byte moved
        if progress is not None:
            progress(0, total)
        try:
            if source is None:
                rest = itertools.chain([first] if first else [], batches)
                copied = self._daemon_copy("CopyInto", info.session_id, rest)
            else:
                base, gpu_accessible, ensure_mapped, release = source
                try:
                    copied = datapath.copy_to_tensors(
                        bindings, base, gpu_accessible=gpu_accessible, path=f"thawd:{name}",
                        ensure_mapped=ensure_mapped, in_flight=in_flight)  # fmt: skip
                finally:
                    release()
        except errors.ThawError as e:
            raise errors.RestoreIncomplete(
                f"restore of {name!r} failed part way: {e}; the model holds mixed "
                "weights: restore again or reload it before use"
            ) from e
        if progress is not None:
            progress(copied, total)
        if source is None:
            return copied, "daemon_copy"
        return copied, _DELIVERIES.get(info.delivery, "fds")

    def _copy_file(self, name: str, info: pb.OpenRestoreResponse, bindings: builtins.list[Any],
                   total: int, progress: Callable[[int, int], None] | None) -> int:  # fmt: skip
        """A snapshot that is not pinned: thawd hands over the registered file's fd, which is
        read with pread and verified against the manifest thawd registered, tensor by tensor,
        as the bytes land (the file is the one part of the path thawd does not hold)."""
        from thaw.copy import restore

        fds, _, _ = self._redeem(info.session_id)
        if progress is not None:
            progress(0, total)
        try:
            copied, _ = restore.read_payload(bindings, fds[0], info.payload_offset,
                                             info.payload_length, f"{info.path} (thawd:{name})")
        finally:
            for fd in fds:
                os.close(fd)
        if progress is not None:
            progress(copied, total)
        return copied

    def _daemon_copy(self, method: str, session_id: str,
                     batches: Iterator[tuple[Any, Callable[[], int]]]) -> int:  # fmt: skip
        """Have thawd copy between its pool and our exported GPU allocations (`CopyInto` for a
        restore, `CopyOut` for a freeze), one call per batch: each batch is sent before the
        next is exported, so exporting overlaps the daemon's copies. Returns bytes moved."""
        calls, finishes = [], []
        try:
            for exported, finish in batches:
                calls.append(getattr(self._stub, method).future(pb.DaemonCopyRequest(
                    session_id=session_id, device_uuid=exported.device_uuid,
                    regions=[pb.GpuRegion(ipc_handle=h, size=n) for h, n in exported.regions],
                    copies=[pb.GpuCopy(tensor=t, region=r, offset=o)
                            for t, r, o in exported.copies],
                ), metadata=self._metadata()))  # fmt: skip
                finishes.append(finish)
            for call in calls:
                call.result()
        except grpc.RpcError as e:
            raise _error(e, self.socket) from None
        finally:
            for call in calls:  # after a failure, the batches still in flight
                call.cancel()
        return sum(finish() for finish in finishes)

    def _map(self, name: str, info: pb.OpenRestoreResponse, bindings: builtins.list[Any],
             mirror: Any = None) -> _Source | None:  # fmt: skip
        """Map what the session delivers: (payload address, whether CUDA can DMA from it, for
        a pool buffer still being mapped the function that maps it up to a payload offset, and
        the function to call after the copy). None: this process cannot import the pool
        memory, a daemon copy must do."""
        from thaw.copy import datapath

        cuda = datapath.cuda_device(bindings) is not None
        cuda_only = all(b.tensor.device.type == "cuda" for b in bindings)
        if info.delivery == pb.DELIVERY_POOL:
            return _from_pool(name, info, mirror)
        kind = _POOLS.get(info.pool_kind, "file")
        if info.delivery == pb.DELIVERY_MAPPED:
            with self._maps_lock:
                cached = self._mappings.get(name)
            if cached is None or cached[0] != info.buffer_id:
                # Forgotten by another thread since we asked: the daemon copies instead.
                if kind == "vmm" and cuda_only:
                    return None
                raise errors.DaemonError(f"the mapping of {name!r} was dropped during the "
                                         "restore; restore again")  # fmt: skip
            return self._use(cached[1], kind, cuda, cuda_only, info.pool_size)
        t0 = time.perf_counter()
        fds, sizes, buffer_id = self._redeem(info.session_id)
        t_redeem = time.perf_counter()
        try:
            # Pool buffers stay mapped (and CUDA-registered) for this process's next restore
            # of the same buffer: mapping and registration are paid once per process.
            if kind == "vmm":
                from thaw.mem import vmm

                device = datapath.cuda_device(bindings) or 0
                # Lazy: the copy imports and maps chunk by chunk, overlapping it with DMA.
                holder: Any = vmm.HostBuffer.import_fds(fds, sizes, device, lazy=True,
                                                        host_access=not cuda_only)  # fmt: skip
                t_import = time.perf_counter()
                try:
                    holder.map_until(1)  # the first chunk: proves this process can import
                    log.debug("pool %s: redeem %.1f ms, import %.1f ms, first chunk %.1f ms",
                              name, (t_redeem - t0) * 1e3, (t_import - t_redeem) * 1e3,
                              (time.perf_counter() - t_import) * 1e3)  # fmt: skip
                except errors.CudaError as e:
                    holder.close()
                    if not cuda_only:
                        raise
                    log.warning("cannot import thawd's pool memory (%s): daemon copy", e)
                    return None
            else:
                holder = MemoryMapping(fds[0], sizes[0], populate=True)
            with self._maps_lock:
                self._replace(name, (buffer_id, holder))
            return self._use(holder, kind, cuda, cuda_only, sizes[0] if kind == "memfd" else 0)
        finally:
            for fd in fds:
                os.close(fd)

    def _hold_pool(self) -> Any:
        """Our map of thawd's whole pool (vmm.PoolMirror), held for one restore or freeze:
        its background mapping pauses meanwhile (mapping beside a copy slows the copy). None
        when this process maps no pool."""
        pool_map = self._pool_map
        mirror = pool_map.get(pool_map.device) if pool_map is not None else None
        if mirror is None:
            return None
        try:
            mirror.acquire()
        except errors.CudaError:  # released: thawd went away
            return None
        return mirror

    def _replace(self, name: str, cached: tuple[int, Any]) -> None:
        """Cache `name`'s mapping, closing the one it replaces (call with _maps_lock held)."""
        old = self._mappings.get(name)
        if old is not None and old[1] is not cached[1]:
            _close_mapping(old[1])
        self._mappings[name] = cached

    @staticmethod
    def _use(holder: Any, kind: str, cuda: bool, cuda_only: bool, register: int) -> _Source:
        if kind == "vmm" and not cuda_only:
            holder.enable_host_access()
        if kind == "memfd" and cuda:
            from thaw.mem import cuda as cuda_mod

            cuda_mod.register_host(holder.addr, register, read_only=True)
        ensure = holder.map_until if kind == "vmm" and holder.mapped < holder.size else None
        return holder.addr, kind == "vmm" or cuda, ensure, _nothing

    def forget(self, name: str) -> None:
        """Drop this process's cached mapping of `name`'s pool buffer (if any)."""
        with self._maps_lock:
            cached = self._mappings.pop(name, None)
        if cached is not None:
            _close_mapping(cached[1])

    def freeze_tensors(self, model: Any, name: str, path: str | None = None,
               fingerprint: Fingerprint | None = None, *,
               labels: Mapping[str, str] | None = None, pin: bool = True,
               wait: bool = False) -> SnapshotRecord:  # fmt: skip
        """Freeze `model`'s tensors into a new snapshot held by the daemon and written behind.

        Returns once the bytes are in the daemon's pool and checksummed (wait=True: once the
        file is durable). `path` defaults to the daemon's state directory. pin=False leaves it
        demotable once written.
        """
        import torch

        from thaw.copy import datapath
        from thaw.format.dtypes import dtype_name

        named = datapath.model_tensors(model)
        if fingerprint is None:
            fingerprint = (
                datapath.describe(model) if isinstance(model, torch.nn.Module) else Fingerprint()
            )
        specs = [pb.TensorSpec(name=n, dtype=dtype_name(t.dtype), shape=list(t.shape))
                 for n, t in named]  # fmt: skip
        cuda_only = bool(named) and all(t.device.type == "cuda" for _, t in named)
        held = self._hold_pool()  # no background mapping beside the copy
        try:
            begin = self._freeze_copy(name, path, specs, fingerprint, labels, pin, named,
                                      cuda_only)  # fmt: skip
        finally:
            if held is not None:
                held.release()
        reply = self._call("CommitFreeze",
                           pb.CommitFreezeRequest(session_id=begin.session_id, wait=wait),
                           timeout=None if wait else self.timeout)  # fmt: skip
        return SnapshotRecord.from_pb(reply.snapshot)

    def _freeze_copy(self, name: str, path: str | None, specs: builtins.list[Any],
                     fingerprint: Fingerprint, labels: Mapping[str, str] | None, pin: bool,
                     named: Any, cuda_only: bool) -> pb.BeginFreezeResponse:  # fmt: skip
        """Open a freeze session and copy the tensors into it: by daemon copy for CUDA
        tensors on a VMM pool, else into the pool buffer mapped here. Returns the session."""
        from thaw.copy import datapath

        # CUDA tensors: the daemon copies them into pool memory it mapped at start (CopyOut);
        # a process mapping a fresh pool buffer pays for it during the copy.
        for daemon_copy in (True, False) if cuda_only else (False,):
            t0 = time.perf_counter()
            begin = self._call("BeginFreeze", pb.BeginFreezeRequest(
                name=name, path=os.path.abspath(path) if path else "", tensors=specs, pin=pin,
                fingerprint_json=json.dumps(fingerprint.to_json()),
                labels=dict(labels or {}), daemon_copy=daemon_copy))  # fmt: skip
            try:
                entries = [TensorEntry(t.name, t.dtype, tuple(t.shape), t.offset, t.length)
                           for t in begin.tensors]  # fmt: skip
                bindings = datapath.bind(entries, named, strict=True)
                if daemon_copy and begin.pool_kind == pb.POOL_KIND_VMM:
                    t_begin = time.perf_counter()
                    index = {t.name: i for i, t in enumerate(begin.tensors)}
                    batches = datapath.batches_for_daemon(bindings, index, freeze=True)
                    try:
                        first = next(batches, None)
                    except errors.CudaError as e:  # e.g. expandable segments: map instead
                        log.info("freeze %s: no daemon copy (%s); mapping the pool", name, e)
                        self._call("AbortFreeze", pb.AbortFreezeRequest(
                            session_id=begin.session_id))  # fmt: skip
                        continue
                    t_export = time.perf_counter()
                    rest = itertools.chain([first] if first else [], batches)
                    self._daemon_copy("CopyOut", begin.session_id, rest)
                    log.debug("freeze %s: begin %.1f ms, first export %.1f ms, daemon copy "
                              "%.1f ms", name, (t_begin - t0) * 1e3, (t_export - t_begin) * 1e3,
                              (time.perf_counter() - t_export) * 1e3)  # fmt: skip
                else:
                    self._freeze_mapped(name, begin, bindings)
            except BaseException:
                with contextlib.suppress(errors.DaemonError):
                    self._call("AbortFreeze", pb.AbortFreezeRequest(session_id=begin.session_id))
                raise
            break
        return begin

    def _freeze_mapped(self, name: str, begin: pb.BeginFreezeResponse,
                       bindings: builtins.list[Any]) -> None:  # fmt: skip
        """Copy the tensors into the freeze session's pool buffer, mapped here."""
        from thaw.copy import datapath

        t0 = time.perf_counter()
        fds, sizes, _ = self._redeem(begin.session_id)
        try:
            if begin.pool_kind == pb.POOL_KIND_VMM:
                from thaw.mem import vmm

                device = datapath.cuda_device(bindings) or 0
                t_redeem = time.perf_counter()
                cuda_only = all(b.tensor.device.type == "cuda" for b in bindings)
                buf = vmm.HostBuffer.import_fds(fds, sizes, device, lazy=True,
                                                host_access=not cuda_only)  # fmt: skip
                t_map = time.perf_counter()
                try:
                    datapath.copy_from_tensors(bindings, buf.addr, gpu_accessible=True,
                                               ensure_mapped=buf.map_until)  # fmt: skip
                finally:
                    buf.close()
                marks = (t0, t_redeem, t_map, time.perf_counter())
                ms = [(b - a) * 1e3 for a, b in itertools.pairwise(marks)]
                log.debug("freeze %s: redeem %.1f ms, map %.1f ms, copy %.1f ms", name, *ms)
            else:
                with MemoryMapping(fds[0], sizes[0], writable=True) as m:
                    datapath.copy_from_tensors(bindings, m.addr)
        finally:
            for fd in fds:
                os.close(fd)

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            pool_map, self._pool_map = self._pool_map, None
        if pool_map is not None:
            pool_map.close()
        with self._maps_lock:
            mappings, self._mappings = list(self._mappings.values()), {}
        for _, holder in mappings:
            _close_mapping(holder)
        with self._lock:
            self._drop_fd_sock()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What a restore copies from: (payload address, whether CUDA can DMA from it, the function
# that maps a lazily mapped pool buffer up to a payload offset, the function to call after).
_Source = tuple[int, bool, Callable[[int], None] | None, Callable[[], None]]


def _nothing() -> None:
    pass


def _content_id(info: pb.OpenRestoreResponse) -> str:
    """The restored payload's content id, from the manifest thawd sent."""
    from thaw.format import Manifest

    entries = tuple(TensorEntry(t.name, t.dtype, tuple(t.shape), t.offset, t.length, t.checksum)
                    for t in info.tensors)  # fmt: skip
    return Manifest(Fingerprint(), entries).content_id


def _from_pool(name: str, info: pb.OpenRestoreResponse, mirror: Any) -> _Source:
    """DELIVERY_POOL: the buffer lies at info.pool_offset in our map of thawd's whole pool
    (the vmm.PoolMirror whose id the request carried, held by this restore)."""
    if mirror is None:  # the daemon answered a pool id this request did not carry
        raise errors.DaemonError(f"restore of {name!r}: DELIVERY_POOL without a pool map")
    start = info.pool_offset
    return mirror.addr + start, True, mirror.mapper(start), _nothing


def _close_mapping(holder: Any) -> None:
    cuda_mod = sys.modules.get("thaw.mem.cuda")  # only a process that registered imported it
    if cuda_mod is not None and isinstance(holder, MemoryMapping) and holder.addr:
        cuda_mod.unregister_host(holder.addr)
    holder.close()
