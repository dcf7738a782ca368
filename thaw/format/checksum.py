"""The one checksum path. A tensor's checksum is xxh3 over the xxh3 hashes of its 16 MiB
blocks ("xxh3-tree-16M", docs/FORMAT.md), so a tensor can be hashed whole, piece by piece as
it arrives, or chunk by chunk as a file is read, and the results agree. Every check of bytes
against a manifest goes through here: a tensor in memory (`verify_tensor`), one hashed as it
was read (`verify_hashes`), a tensor arriving in pieces (`Digests`), a file's payload read
with pread (`file_checksums`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from thaw import _native
from thaw.errors import ChecksumMismatch
from thaw.format.snapshot import TensorEntry

BLOCK = _native.BLOCK_HASH_SIZE  # 16 MiB


def checksum(addr: int, length: int, threads: int = 1) -> int:
    """The checksum of `length` bytes at `addr` (what a manifest records for a tensor)."""
    return int(_native.tree_hash(addr, length, threads))


def expect_checksum(path: object, entry: TensorEntry, found: int) -> None:
    """Raise ChecksumMismatch, naming the tensor, unless `found` is its recorded checksum."""
    if found != entry.checksum:
        raise ChecksumMismatch(path, entry.name, entry.checksum, found)


def verify_tensor(path: object, entry: TensorEntry, addr: int, threads: int = 1) -> None:
    """Check the bytes of one tensor at `addr` against its recorded checksum."""
    expect_checksum(path, entry, checksum(addr, entry.length, threads))


def verify_hashes(path: object, entry: TensorEntry, hashes: bytes) -> None:
    """Check one whole tensor's block hashes, taken as its bytes were read
    (`_native.pread_hashed`, `_native.read_to_device`), against its recorded checksum."""
    expect_checksum(path, entry, int(_native.xxh3(hashes)))


class Part(Protocol):
    """Bytes [tensor_offset, +length) of tensor `index` (a thaw.copy.pieces.Segment)."""

    @property
    def index(self) -> int: ...
    @property
    def tensor_offset(self) -> int: ...
    @property
    def length(self) -> int: ...


class Digests:
    """Accumulates block hashes per tensor, part by part, and checks each completed tensor.

    Thread-safe, and parts may arrive in any order: they are keyed by their tensor offset,
    which is a multiple of the 16 MiB block (or the part is the whole tensor).
    """

    def __init__(self, entries: Sequence[TensorEntry], path: object, threads: int) -> None:
        self.entries = entries
        self.path = path
        self.threads = threads
        self._lock = threading.Lock()
        self._parts: dict[int, dict[int, bytes]] = {}
        self._seen: dict[int, int] = {}

    def add(self, part: Part, addr: int) -> int | None:
        """Hash one part's bytes; return the tensor's checksum once all of it was seen."""
        digest = _native.block_hashes(addr, part.length, self.threads)
        with self._lock:
            parts = self._parts.setdefault(part.index, {})
            parts[part.tensor_offset] = digest
            seen = self._seen.get(part.index, 0) + part.length
            self._seen[part.index] = seen
            if seen < self.entries[part.index].length:
                return None
            del self._parts[part.index]
        return int(_native.xxh3(b"".join(parts[k] for k in sorted(parts))))

    def check(self, part: Part, addr: int) -> None:
        """Like add, raising ChecksumMismatch when a completed tensor's checksum differs."""
        found = self.add(part, addr)
        if found is not None:
            expect_checksum(self.path, self.entries[part.index], found)

    def check_whole(self, index: int, hashes: bytes) -> None:
        """Check tensor `index` from its block hashes, taken as it was read (`verify_hashes`)."""
        verify_hashes(self.path, self.entries[index], hashes)


def file_checksums(
    fd: int,
    payload_offset: int,
    tensors: Sequence[TensorEntry],
    buffer: tuple[int, int],
    threads: int,
    *,
    direct: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[tuple[TensorEntry, int]]:
    """(entry, the checksum of its bytes in the file) for each of `tensors`, read with pread
    through `buffer` ((address, size): a multiple of the 16 MiB block), never a mapping: a
    file truncated meanwhile is an error, not a SIGBUS. Each block is hashed as it lands
    (`_native.pread_hashed`): one pass over memory. `direct`: `fd` is O_DIRECT, so reads are
    whole 4 KiB blocks (tensors start on them and the payload ends on one, so a rounded read
    stays inside the payload). `on_bytes(n)` after each read of n tensor bytes."""
    addr, size = buffer
    assert size % BLOCK == 0
    for t in tensors:
        digests = []
        for at in range(0, t.length, size):
            n = min(size, t.length - at)
            digests += _native.pread_hashed(fd, [addr], [payload_offset + t.offset + at], [n],
                                            threads, 4096 if direct else 0)  # fmt: skip
            if on_bytes is not None:
                on_bytes(n)
        yield t, int(_native.xxh3(b"".join(digests)))
