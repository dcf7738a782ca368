"""A snapshot object: what thawd knows of it once registered, and how that is read.

An object's identity is its size and ETag, read once (HEAD) and named in every later request
(If-Match): bytes of another version of the object are never read into a snapshot. Its
header and manifest are checked with the same code and the same bounds as a file's
(thaw.format.snapshot.parse_header: a manifest of at most 64 MiB, at most 262,144 tensors,
its JSON structure counted before it is parsed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from thaw.format import Snapshot
from thaw.format.snapshot import HEADER_SIZE, parse_header
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
        """Read the object's header and manifest (two ranged GETs). `etag`: the identity it
        was registered with (SnapshotChanged if the object is now another); "" takes the
        object as it is now."""
        size, now = store.head(ref)
        if etag and now != etag:
            from thaw.errors import SnapshotChanged

            raise SnapshotChanged(f"{ref.uri}: the object was replaced since it was registered "
                                  f"(ETag {etag}, now {now}); register it again")  # fmt: skip
        path = Path(ref.uri)
        raw = store.read(ref, now, 0, min(HEADER_SIZE, size))
        header = parse_header(path, raw, size)
        blob = store.read(ref, now, header.manifest_offset, header.manifest_length)
        return cls(ref, size, now, header.snapshot(path, blob))

    def bytes_at(self, store: Store, start: int, length: int) -> bytes:
        """A range of this version of the object (the header and the manifest, for a cache
        file: the same bytes the object holds, so the file checks as the object did)."""
        return store.read(self.ref, self.etag, start, length)
