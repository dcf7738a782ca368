"""Freezes: a client fills a pool buffer, thawd registers it and writes its file behind.

Where the file goes is settled at begin: the target directory is opened with the caller's
rights (thawd/paths.py) and held as an fd; the commit writes through that fd, into an unnamed
O_TMPFILE (or a hidden temporary name where the filesystem has none) that is linked under its
final name only when complete and durable, and never over an existing file. A directory
swapped for a symlink after begin changes nothing, and a thawd killed mid-write leaves no
partial file: an O_TMPFILE vanishes with the process, and the temporaries of its own state
directory are removed at the next start.
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
from collections.abc import Sequence
from typing import TYPE_CHECKING

from thaw._proto import thawd_pb2 as pb
from thaw.errors import AlreadyExists, DaemonError, InvalidRequest, NotFound
from thaw.format import (
    MAX_NAME,
    MAX_NDIM,
    MAX_TENSORS,
    PAYLOAD_OFFSET,
    TEMP_SUFFIX,
    Manifest,
    SnapshotWriter,
    TensorEntry,
    layout,
)
from thaw.format.checksum import checksum
from thaw.format.dtypes import DTYPES
from thaw.format.fingerprint import Fingerprint
from thawd import paths
from thawd.buffers import PoolBuffer
from thawd.entries import POOL_KINDS, Entry, entry_pb
from thawd.files import SnapshotFile
from thawd.registry import new_row
from thawd.restores import Session, daemon_copy
from thawd.s3.config import ObjectRef, is_uri
from thawd.s3.objects import SnapshotObject, upload
from thawd.security import Peer, validate_labels, validate_name

if TYPE_CHECKING:
    from thawd.state import Daemon

log = logging.getLogger("thawd.freezes")

# A BeginFreeze of more tensors than this is checked, laid out and answered on a worker
# thread: 262,144 tensors take about a second of Python, which no other client should wait for.
MANY_TENSORS = 4096
MAX_DIM = 1 << 48
# A fingerprint is parsed on the event loop: 1 MiB of JSON is far more than its bounded
# fields and labels fill (thaw/format/fingerprint.py), and a moment to parse.
MAX_FINGERPRINT_JSON = 1 << 20


@dataclasses.dataclass
class Target:
    """Where a freeze writes: a directory opened (and checked for the caller) at begin, and
    the file's name in it. `path` is for records and messages only."""

    dir_fd: int
    name: str
    path: str
    object: ObjectRef | None = None  # an object in S3 instead (dir_fd -1)

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


class Freezes:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.writing: set[asyncio.Task[None]] = set()

    async def begin(
        self, peer: Peer, token: str, request: pb.BeginFreezeRequest
    ) -> pb.BeginFreezeResponse:
        d = self.d
        name = validate_name(request.name)
        labels = validate_labels(dict(request.labels))
        self._check_free(name)
        d.restores.admit(token)
        if len(request.fingerprint_json) > MAX_FINGERPRINT_JSON:
            raise InvalidRequest(f"fingerprint_json of {len(request.fingerprint_json)} characters; "
                                 f"at most {MAX_FINGERPRINT_JSON}")  # fmt: skip
        try:
            fingerprint = Fingerprint.from_json(json.loads(request.fingerprint_json or "{}"))
        except (ValueError, TypeError, RecursionError) as e:
            raise InvalidRequest(f"invalid fingerprint: {e}") from e
        if len(request.tensors) > MANY_TENSORS:
            entries = await asyncio.to_thread(_layout, request.tensors)
        else:
            entries = _layout(request.tensors)
        target = await d.on_thread(peer.uid, self._target, peer, name, request.path)
        try:
            self._check_free(name)  # again: the awaits above let others in
            length = Manifest(fingerprint, tuple(entries)).payload_length
            d.budgets.make_room("pinned", d.budgets.size("pinned", length), name)
            buf = PoolBuffer(d.pool_kind, name, length, d.config.mlock, d.arena)
        except BaseException:
            target.close()
            raise
        # A daemon copy (CopyOut) needs no fds; without one the client maps the buffer.
        fds, sizes = ([], []) if request.daemon_copy and buf.kind == "vmm" else buf.export()
        session = Session(secrets.token_hex(16), "freeze", token, peer.uid, name, fds, sizes,
                          buf.id, time.monotonic(), buf, entries, fingerprint, target, labels,
                          request.pin, pid=peer.pid, bytes=length)  # fmt: skip
        d.restores.add(session)
        d.events.publish("freeze_started", name, target.path, length)

        def response() -> pb.BeginFreezeResponse:
            return pb.BeginFreezeResponse(
                session_id=session.id,
                pool_kind=POOL_KINDS[buf.kind],
                pool_size=buf.size,
                tensors=[entry_pb(t) for t in entries],
                path=target.path,
            )

        if len(entries) > MANY_TENSORS:
            return await asyncio.to_thread(response)
        return response()

    def _check_free(self, name: str) -> None:
        d = self.d
        if name in d.entries or any(
            s.kind == "freeze" and s.name == name for s in d.sessions.values()
        ):
            raise AlreadyExists(f"a snapshot named {name!r} is already registered or being frozen")

    def _target(self, peer: Peer, name: str, path: str) -> Target:
        """The freeze's directory, opened for `peer` (blocking: runs on a thread). No path:
        thawd's own snapshot directory."""
        if is_uri(path):
            return self._object_target(path)
        if not path:
            d = self.d
            d.config.snapshot_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(d.config.snapshot_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            target = Target(fd, f"{name}.thaw", str(d.config.snapshot_dir / f"{name}.thaw"))
        else:
            directory, file_name = os.path.split(path)
            if not file_name or file_name in (".", "..") or len(file_name.encode()) > 255:
                raise InvalidRequest(f"snapshot path {path!r} must end in a file name")
            opened = paths.open_directory(peer, directory or "/")
            target = Target(opened.fd, file_name, os.path.join(opened.path, file_name))
        try:
            os.stat(target.name, dir_fd=target.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return target
        target.close()
        raise AlreadyExists(f"{target.path} exists; remove it or choose another path")

    def _object_target(self, uri: str) -> Target:
        """An object the operator's allow list admits and that does not exist yet (blocking)."""
        ref = ObjectRef.parse(uri)
        store = self.d.objects.writable(ref)
        try:
            store.head(ref)
        except NotFound:
            return Target(-1, ref.basename, ref.uri, ref)
        raise AlreadyExists(f"{ref.uri} exists; remove it or choose another key")

    async def copy_out(
        self, peer: Peer, token: str, request: pb.DaemonCopyRequest
    ) -> pb.DaemonCopyResponse:
        """CUDA IPC mode of a freeze: copy the client's GPU tensors into the session's buffer."""
        d = self.d
        session = d.restores.session(peer, request.session_id, "freeze")
        buf = session.buffer
        if buf is None or buf.kind != "vmm" or d.copier is None:
            raise InvalidRequest("CUDA IPC copies need thawd's VMM pool (a GPU host)")
        session.copying += 1  # an abort or a disconnect leaves the buffer to the last copy
        try:
            nbytes, seconds = await daemon_copy(
                d, token, request, buf.addr, session.entries, to_host=True
            )
        finally:
            session.copying -= 1
            if d.sessions.get(session.id) is not session and not session.copying:
                d.restores.end(session)  # ended meanwhile: release what it left to us
        return pb.DaemonCopyResponse(bytes=nbytes, duration_s=seconds)

    async def commit(self, peer: Peer, session_id: str, wait: bool) -> pb.Snapshot:
        """The client's bytes are in the pool: register the snapshot and release the client.

        Checksums and the file come behind (`_write`), so the engine is free as soon as its
        device-to-host copy is done; `wait=True` returns once the file is durable instead."""
        d = self.d
        session = d.restores.session(peer, session_id, "freeze")
        if session.copying:
            raise InvalidRequest("a daemon copy into this freeze is still running; commit after it")
        buf, target = session.buffer, session.target
        assert buf is not None and target is not None and session.fingerprint is not None
        # Out of the sessions table first: a commit cannot race an abort or a disconnect.
        d.restores.forget(session)
        session.close_fds()
        try:
            await asyncio.to_thread(buf.finish)
        except BlockingIOError as e:
            buf.close()
            target.close()
            d.events.publish("freeze_failed", session.name, "the client kept it mapped")
            raise InvalidRequest(
                "the freeze buffer is still mapped writable by the client: "
                "unmap it before CommitFreeze"
            ) from e
        manifest = Manifest(session.fingerprint, tuple(session.entries))  # checksums to come
        row = new_row(session.name, target.path, session.labels, peer.uid)
        row.wanted_tier = "pinned" if session.pin else "cold"
        row.state = "writing"  # until the file is durable: a restart forgets such a row
        entry = Entry(
            row,
            None,
            manifest,
            PAYLOAD_OFFSET,
            manifest.payload_length,
            0,
            "pinned",
            buf,
            file_pending=True,
        )
        d.entries[row.name] = entry
        await d.save(entry)
        d.events.publish(
            "freeze_committed",
            row.name,
            target.path,
            entry.payload_length,
            time.monotonic() - session.started,
        )
        task = asyncio.ensure_future(self._write(entry, target))
        self.writing.add(task)
        task.add_done_callback(self.writing.discard)
        if wait:
            await asyncio.shield(task)
            if entry.file is None and entry.object is None:
                raise DaemonError(f"snapshot {row.name!r}: {entry.row.error}")
        return entry.record()

    async def _write(self, entry: Entry, target: Target) -> None:
        """Checksum a frozen snapshot's pool buffer, then write it through the target's
        directory fd, atomically and without replacing anything."""
        d = self.d
        assert entry.manifest is not None and entry.pool is not None
        buf, manifest = entry.pool, entry.manifest
        threads = d.config.io_threads
        t0 = time.monotonic()

        def work() -> SnapshotFile | SnapshotObject:
            checksums = [checksum(buf.addr + t.offset, t.length, threads) for t in manifest.tensors]
            pairs = zip(manifest.tensors, checksums, strict=True)
            tensors = tuple(dataclasses.replace(t, checksum=c) for t, c in pairs)
            entry.manifest = Manifest(manifest.fingerprint, tensors)
            entry.row.checksum_state = "verified"
            if target.object is not None:
                store = d.objects.writable(target.object)
                written = upload(store, target.object, entry.manifest, buf.addr,
                                 entry.payload_length)  # fmt: skip
                entry.manifest = written.snapshot.manifest
                entry.prepare()
                return written
            with SnapshotWriter(
                target.name, manifest.tensors, dir_fd=target.dir_fd, replace=False
            ) as w:
                if w.payload_length:
                    w.write_at(0, buf.addr, w.payload_length, threads)
                w.commit(manifest.fingerprint, checksums)
                # The file just written, read-only: the same inode, not whatever the name
                # holds by now in a directory its caller controls.
                fd = os.open(f"/proc/self/fd/{w.fd}", os.O_RDONLY | os.O_CLOEXEC)
            file = SnapshotFile.adopt(fd, target.path)
            entry.manifest = file.snapshot.manifest
            entry.prepare()
            return file

        try:
            file = await asyncio.to_thread(work)
        except Exception as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            entry.row.error = (
                f"its file {target.path} could not be written ({why}): it is held "
                "in memory only, until thawd stops; free space and freeze it "
                "again, or unregister it"
            )
            d.registry.remove(entry.row.name)  # nothing of it outlives this daemon
            d.events.publish("freeze_failed", entry.row.name, entry.row.error)
            log.error("freeze of %s: %s", entry.row.name, entry.row.error)
        else:
            if isinstance(file, SnapshotObject):
                entry.attach_object(file)
            else:
                entry.attach(file)
            entry.row.state = "ready"
            d.save(entry)
            d.events.publish(
                "freeze_written",
                entry.row.name,
                target.path,
                entry.file_length,
                time.monotonic() - t0,
            )
        finally:
            entry.file_pending = False
            target.close()

    def abort(self, peer: Peer, session_id: str) -> None:
        session = self.d.restores.session(peer, session_id, "freeze")
        self.d.restores.end(session)
        self.d.events.publish("freeze_failed", session.name, "aborted by the client")

    def remove_stale_temporaries(self) -> None:
        """Temporary files of writes a killed thawd left in its own snapshot directory (where
        the filesystem had no O_TMPFILE). Blocking: runs on a thread at start."""
        directory = self.d.config.snapshot_dir
        directory.mkdir(parents=True, exist_ok=True)
        for path in directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX):
                log.info("removing %s, left by a write that did not finish", path)
                path.unlink(missing_ok=True)


def _layout(specs: Sequence[pb.TensorSpec]) -> builtins.list[TensorEntry]:
    """Check a freeze's tensor specs as the snapshot reader will (thaw/format/), then lay
    them out: every refusal is InvalidRequest naming the tensor."""
    if not specs:
        raise InvalidRequest("a freeze needs at least one tensor")
    if len(specs) > MAX_TENSORS:
        raise InvalidRequest(f"{len(specs)} tensors; a snapshot holds at most {MAX_TENSORS}")
    seen: set[str] = set()
    for t in specs:
        shown = repr(t.name[:64]) + ("..." if len(t.name) > 64 else "")
        if not t.name or len(t.name) > MAX_NAME or "\0" in t.name:
            raise InvalidRequest(f"tensor name {shown} must be 1 to {MAX_NAME} characters")
        if t.name in seen:
            raise InvalidRequest(f"tensor {shown} appears twice")
        if t.dtype not in DTYPES:
            raise InvalidRequest(f"tensor {shown}: unknown dtype {t.dtype[:32]!r}")
        if len(t.shape) > MAX_NDIM:
            raise InvalidRequest(f"tensor {shown} has {len(t.shape)} dims; at most {MAX_NDIM}")
        if any(d >= MAX_DIM for d in t.shape):
            raise InvalidRequest(f"tensor {shown}: a dimension of 2^48 or more")
        seen.add(t.name)
    entries = layout([(t.name, t.dtype, tuple(t.shape)) for t in specs])
    if entries and entries[-1].offset + entries[-1].length >= 1 << 56:
        raise InvalidRequest("the tensors add up to more than 2^56 bytes")
    return entries
