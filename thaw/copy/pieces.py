"""Cutting a payload into pieces that fit one staging slot, and checking checksums piecewise.

A piece is one contiguous, 4 KiB aligned range of the payload: one O_DIRECT read or write,
one slot of pinned staging. Small tensors share a piece (one syscall for many norms); a large
tensor is cut at multiples of the slot size, itself a multiple of the 16 MiB hash block, so
each piece hashes independently and the digests concatenate into the tensor's tree hash.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from thaw import _native
from thaw.errors import ChecksumMismatch
from thaw.format import TensorEntry, align_up


@dataclasses.dataclass(frozen=True)
class Segment:
    """Bytes [tensor_offset, +length) of tensor `index`, at `piece_offset` within the piece."""

    index: int
    tensor_offset: int
    piece_offset: int
    length: int


@dataclasses.dataclass(frozen=True)
class Piece:
    payload_offset: int
    length: int  # rounded up to 4 KiB: what is read or written
    segments: tuple[Segment, ...]


def plan(entries: Sequence[TensorEntry], slot_size: int) -> list[Piece]:
    """Pieces covering `entries` (in payload order), none longer than `slot_size`."""
    assert slot_size % _native.BLOCK_HASH_SIZE == 0
    pieces: list[Piece] = []
    start = 0
    segments: list[Segment] = []

    def flush(end: int) -> None:
        nonlocal segments
        if segments:
            pieces.append(Piece(start, align_up(end - start), tuple(segments)))
            segments = []

    order = sorted(range(len(entries)), key=lambda i: entries[i].offset)
    end = 0
    for i in order:
        e = entries[i]
        # A piece is one contiguous run of these entries: never span bytes of tensors that are
        # not in `entries` (a freeze would overwrite them with this piece's gaps).
        if segments and (e.offset + e.length - start > slot_size or e.offset > align_up(end)):
            flush(end)
        if e.length > slot_size:
            for chunk in range(0, e.length, slot_size):
                start = e.offset + chunk
                n = min(slot_size, e.length - chunk)
                segments = [Segment(i, chunk, 0, n)]
                flush(start + n)
            continue
        if not segments:
            start = e.offset
        segments.append(Segment(i, 0, e.offset - start, e.length))
        end = e.offset + e.length
    flush(end)
    return pieces


class Digests:
    """Accumulates block hashes per tensor, piece by piece, and checks each completed tensor.

    Thread-safe, and pieces may arrive in any order: parts are keyed by their tensor offset.
    """

    def __init__(self, entries: Sequence[TensorEntry], path: object, threads: int) -> None:
        self.entries = entries
        self.path = path
        self.threads = threads
        self._lock = threading.Lock()
        self._parts: dict[int, dict[int, bytes]] = {}
        self._seen: dict[int, int] = {}

    def add(self, segment: Segment, addr: int) -> int | None:
        """Hash one segment's bytes; return the tensor's checksum once all of it was seen."""
        digest = _native.block_hashes(addr, segment.length, self.threads)
        with self._lock:
            parts = self._parts.setdefault(segment.index, {})
            parts[segment.tensor_offset] = digest
            seen = self._seen.get(segment.index, 0) + segment.length
            self._seen[segment.index] = seen
            if seen < self.entries[segment.index].length:
                return None
            del self._parts[segment.index]
        return int(_native.xxh3(b"".join(parts[k] for k in sorted(parts))))

    def check(self, segment: Segment, addr: int) -> None:
        """Like add, raising ChecksumMismatch when a completed tensor's checksum differs."""
        found = self.add(segment, addr)
        entry = self.entries[segment.index]
        if found is not None and found != entry.checksum:
            raise ChecksumMismatch(self.path, entry.name, entry.checksum, found)
