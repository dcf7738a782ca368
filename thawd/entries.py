"""The live state of one registered snapshot, and its record as clients see it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from thaw._proto import thawd_pb2 as pb
from thaw.daemon import fdsocket
from thaw.daemon.opened import tensor_row
from thaw.errors import InvalidRequest, SnapshotChanged
from thaw.format import PAYLOAD_OFFSET, Manifest, TensorEntry
from thawd.buffers import PoolBuffer, WarmMapping
from thawd.files import Identity, SnapshotFile
from thawd.registry import Row
from thawd.s3.objects import SnapshotObject

TIERS = {"cold": pb.TIER_COLD, "warm": pb.TIER_WARM, "pinned": pb.TIER_PINNED}
TIER_RANK = {"cold": 0, "warm": 1, "pinned": 2}
CHECKSUM_STATES = {
    "unverified": pb.CHECKSUM_STATE_UNVERIFIED,
    "verified": pb.CHECKSUM_STATE_VERIFIED,
    "corrupt": pb.CHECKSUM_STATE_CORRUPT,
}
POOL_KINDS = {"memfd": pb.POOL_KIND_MEMFD, "vmm": pb.POOL_KIND_VMM, "file": pb.POOL_KIND_FILE}


@dataclasses.dataclass
class Entry:
    """One registered snapshot: its row, its file (the fd it was registered as) and where its
    bytes are held now."""

    row: Row
    file: SnapshotFile | None = None  # None: unusable (row.error says why) or being written
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
    file_pending: bool = False  # frozen; its file is being written
    object: SnapshotObject | None = None  # a snapshot in object storage (it has no file)
    # The manifest as an OpenRestoreResponse (gRPC) and as the fd socket's JSON, built once
    # per manifest: building 291 tensor messages costs a restore milliseconds, copying a
    # built message microseconds.
    _built: tuple[Manifest, Built] | None = None

    def attach(self, file: SnapshotFile) -> None:
        """Make `file` the snapshot's file: its manifest, sizes and identity become the
        entry's (the row records the identity for the next start)."""
        self.file = file
        snap = file.snapshot
        self.manifest = snap.manifest
        self.payload_offset = snap.payload_offset
        self.payload_length = snap.payload_length
        self.file_length = snap.file_length
        self.row.path = file.path
        ident = file.identity
        self.row.file_dev, self.row.file_ino, self.row.file_size = ident.dev, ident.ino, ident.size
        self.row.file_mtime_ns, self.row.file_ctime_ns = ident.mtime_ns, ident.ctime_ns

    def attach_object(self, obj: SnapshotObject) -> None:
        """Make `obj` the snapshot's source: as `attach`, its identity being size and ETag."""
        self.object = obj
        snap = obj.snapshot
        self.manifest = snap.manifest
        self.payload_offset = snap.payload_offset
        self.payload_length = snap.payload_length
        self.file_length = obj.size
        self.row.path, self.row.file_size = obj.ref.uri, obj.size
        self.row.object_etag, self.row.content_id = obj.etag, snap.manifest.content_id

    def identity(self) -> Identity | None:
        """The file's identity recorded in the row (None: a row from before identities)."""
        r = self.row
        if r.file_dev < 0:
            return None
        return Identity(r.file_dev, r.file_ino, r.file_size, r.file_mtime_ns, r.file_ctime_ns)

    def the_file(self) -> SnapshotFile:
        """The snapshot's file, or the reason there is none as an exception."""
        if self.file is None:
            if self.object is not None:
                raise InvalidRequest(
                    f"snapshot {self.row.name!r} is in object storage ({self.row.path}) and "
                    f"not pinned: pin it first (thawctl pin {self.row.name})"
                )
            if self.file_pending:
                raise InvalidRequest(
                    f"snapshot {self.row.name!r} is still being written to disk; retry"
                )
            raise SnapshotChanged(
                f"snapshot {self.row.name!r} has no usable file: {self.row.error or 'unknown'}"
            )
        return self.file

    def drop_file(self, why: str) -> None:
        """The file changed: stop using it. Bytes already pinned (verified) stay served."""
        if self.file is not None:
            self.file.close()
            self.file = None
        self.row.error = why

    @property
    def demotable(self) -> bool:
        """Held above the tier the operator asked for, and nobody is using it right now."""
        return TIER_RANK[self.tier] > TIER_RANK[self.row.wanted_tier] and not self.in_use()

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

    def release(self) -> None:
        """Drop the daemon's memory for the entry; clients that mapped it keep their mapping."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.warm is not None:
            self.warm.close()
            self.warm = None
        self.tier = "cold"

    def close(self) -> None:
        self.release()
        if self.file is not None:
            self.file.close()
            self.file = None

    # --- what clients see ---------------------------------------------------------------------

    def record(self) -> pb.Snapshot:
        if self.pool is not None:
            resident = self.payload_length
        elif self.warm is not None:
            resident = self.warm.resident_bytes()
        else:
            resident = 0
        m = self.manifest
        return pb.Snapshot(
            name=self.row.name,
            path=self.row.path,
            labels=self.row.labels,
            tier=TIERS[self.tier],
            wanted_tier=TIERS[self.row.wanted_tier],
            size_bytes=self.payload_length,
            file_bytes=self.file_length,
            resident_bytes=resident,
            last_used_unix=self.row.last_used,
            clients=self.clients,
            restores=self.row.restores,
            checksum_state=CHECKSUM_STATES[self.row.checksum_state],
            fingerprint_json=json.dumps(m.fingerprint.to_json()) if m else "",
            tensor_count=len(m.tensors) if m else 0,
            registered_unix=self.row.registered,
            error=self.row.error,
            file_pending=self.file_pending,
            owner_uid=self.row.owner_uid,
            # A frozen snapshot's checksums exist once its write began hashing: no id before.
            content_id=m.content_id if m and not self.file_pending else "",
        )

    def prepare(self) -> None:
        """Build the manifest's responses now (on a worker thread: 262,144 tensor messages
        take a second), so that no restore builds them on the event loop."""
        if self.manifest is not None:
            self._manifest()

    def manifest_pb(self) -> pb.OpenRestoreResponse:
        """A new response holding the manifest's tensors and fingerprint."""
        response = pb.OpenRestoreResponse()
        response.CopyFrom(self._manifest().response)
        return response

    def manifest_json(self) -> tuple[list[list[Any]], str]:
        """The manifest's tensors and fingerprint as the fd socket's "open" carries them (not
        to be modified); only for a manifest that fits one packet (`open_size`)."""
        built = self._manifest()
        assert built.rows is not None, "a manifest over fdsocket.MAX_MESSAGE opens over gRPC"
        return built.rows, built.response.fingerprint_json

    def _manifest(self) -> Built:
        assert self.manifest is not None
        if self._built is None or self._built[0] is not self.manifest:
            self._built = (self.manifest, Built.of(self.manifest))
        return self._built[1]

    def open_size(self) -> int:
        """At most the bytes of an OpenRestoreResponse for this entry as the fd socket carries
        it (thaw/daemon/opened.py): the manifest's part, measured when built, the path, and
        the session's own fields (names, an id, enum names, five numbers: 512 bytes at most)."""
        manifest = self._manifest().json_size if self.manifest is not None else 0
        return manifest + len(json.dumps(self.row.path)) + 512


@dataclasses.dataclass(frozen=True)
class Built:
    """A manifest's part of every OpenRestoreResponse: the message (gRPC), the tensors as the
    fd socket's rows, and the JSON size of those rows and the fingerprint. The rows are kept
    only where they fit one fd-socket packet: a larger manifest always opens over gRPC."""

    response: pb.OpenRestoreResponse
    rows: list[list[Any]] | None
    json_size: int

    @classmethod
    def of(cls, manifest: Manifest) -> Built:
        fingerprint = json.dumps(manifest.fingerprint.to_json())
        rows = [tensor_row(t) for t in manifest.tensors]
        size = len(json.dumps(rows, separators=(",", ":"))) + len(json.dumps(fingerprint))
        return cls(
            pb.OpenRestoreResponse(
                tensors=[entry_pb(t) for t in manifest.tensors], fingerprint_json=fingerprint
            ),
            rows if size <= fdsocket.MAX_MESSAGE else None,
            size,
        )


def entry_pb(t: TensorEntry) -> pb.TensorEntry:
    return pb.TensorEntry(
        name=t.name,
        dtype=t.dtype,
        shape=list(t.shape),
        offset=t.offset,
        length=t.length,
        checksum=t.checksum,
    )
