"""A snapshot object: what thawd knows of it once registered, how that is read, and how a
frozen snapshot is written as one.

An object's identity is its size and ETag, read once (HEAD) and named in every later request
(If-Match): bytes of another version of the object are never read into a snapshot. Its
header and manifest are checked with the same code and the same bounds as a file's
(thaw.format.snapshot.parse_header: a manifest of at most 64 MiB, at most 262,144 tensors,
its JSON structure counted before it is parsed).
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

from thaw.errors import DaemonError
from thaw.format import PAYLOAD_OFFSET, Manifest, Snapshot
from thaw.format.snapshot import HEADER_SIZE, Header, encode, parse_header
from thawd.s3.config import ObjectRef
from thawd.s3.store import Store


@dataclasses.dataclass(frozen=True)
class SnapshotObject:
    ref: ObjectRef
    size: int
    etag: str
    snapshot: Snapshot

    @classmethod
    def read(cls, store: Store, ref: ObjectRef, etag: str = "") -> SnapshotObject:
        """Read the object's header and manifest (`fetch`) and check them (`Fetched.parse`)."""
        return cls.fetch(store, ref, etag).parse()

    @classmethod
    def fetch(cls, store: Store, ref: ObjectRef, etag: str = "") -> Fetched:
        """The object's identity, header and manifest bytes (a HEAD and two ranged GETs).
        `etag`: the identity it was registered with (SnapshotChanged if the object is now
        another); "" takes the object as it is now."""
        size, now = store.head(ref)
        if etag and now != etag:
            from thaw.errors import SnapshotChanged

            raise SnapshotChanged(f"{ref.uri}: the object was replaced since it was registered "
                                  f"(ETag {etag}, now {now}); register it again")  # fmt: skip
        raw = store.read(ref, now, 0, min(HEADER_SIZE, size))
        header = parse_header(Path(ref.uri), raw, size)  # bounds the manifest read next
        blob = store.read(ref, now, header.manifest_offset, header.manifest_length)
        return Fetched(ref, size, now, header, blob)

    def bytes_at(self, store: Store, start: int, length: int) -> bytes:
        """A range of this version of the object (the header and the manifest, for a cache
        file: the same bytes the object holds, so the file checks as the object did)."""
        return store.read(self.ref, self.etag, start, length)


@dataclasses.dataclass(frozen=True)
class Fetched:
    """An object's header and manifest as read, not yet parsed: the network is done, so the
    parse can take one of thawd's few parse slots without holding it through a slow store."""

    ref: ObjectRef
    size: int
    etag: str
    header: Header
    blob: bytes

    def parse(self) -> SnapshotObject:
        snapshot = self.header.snapshot(Path(self.ref.uri), self.blob)
        return SnapshotObject(self.ref, self.size, self.etag, snapshot)


def upload(store: Store, ref: ObjectRef, manifest: Manifest, addr: int,
           payload_length: int) -> SnapshotObject:  # fmt: skip
    """Write a snapshot whose verified payload is in memory at `addr` as the object `ref`:
    laid out as a file is (header, payload at PAYLOAD_OFFSET, manifest), sent as one
    multipart upload (each part's MD5 checked by the store; nothing appears under the key
    until all parts are in), then read back: its header and manifest must check as any
    snapshot's and hold these tensors' checksums."""
    header, blob = encode(manifest, payload_length)
    tail = PAYLOAD_OFFSET + payload_length
    size = tail + len(blob)

    def part(offset: int, length: int) -> bytes:
        out = bytearray(length)  # zeros: the gap between the header and the payload
        view = (ctypes.c_char * length).from_buffer(out)
        for start, data, span in ((0, header, len(header)), (PAYLOAD_OFFSET, None, payload_length),
                                  (tail, blob, len(blob))):  # fmt: skip
            lo, hi = max(offset, start), min(offset + length, start + span)
            if lo >= hi:
                continue
            if data is None:
                ctypes.memmove(ctypes.addressof(view) + lo - offset, addr + lo - start, hi - lo)
            else:
                out[lo - offset : hi - offset] = data[lo - start : hi - start]
        del view
        return bytes(out)

    etag = store.upload(ref, size, part)
    written = SnapshotObject.read(store, ref, etag)
    if written.snapshot.manifest.content_id != manifest.content_id:
        raise DaemonError(f"{ref.uri}: the object read back does not hold the frozen tensors")
    return written
