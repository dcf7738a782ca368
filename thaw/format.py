"""Snapshot format v1: the one reader and the one writer. docs/FORMAT.md is the specification.

Layout of a file:

    [0, 4096)                 header (struct below, zero padded)
    [2 MiB, 2 MiB + P)        payload: tensors, each at a 4 KiB aligned offset
    [M, M + L)                manifest: UTF-8 JSON, at a 4 KiB aligned offset after the payload

The header is written last, so a file whose writer died anywhere never has a valid header;
writers also work in a temporary file renamed into place only after fsync.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import thaw._native as _native
from thaw.dtypes import DTYPES, itemsize
from thaw.errors import (
    BadMagic,
    ChecksumMismatch,
    HeaderCorrupt,
    ManifestCorrupt,
    ManifestOutOfBounds,
    SnapshotError,
    TruncatedSnapshot,
    UnsupportedVersion,
)
from thaw.fingerprint import Fingerprint

MAGIC = b"THAWSNAP"
VERSION = 1
HEADER_SIZE = 4096
# Tensors start on 4 KiB boundaries: the O_DIRECT and page granularity, so any tensor can be
# read straight into page-aligned pinned memory. Coarser alignment only wastes space.
ALIGNMENT = 4096
# The payload starts at 2 MiB so that a mapping of it, and the pool buffers that mirror its
# offsets one to one, begin on a huge-page (and CUDA VMM granule) boundary.
PAYLOAD_OFFSET = 2 << 20
CHECKSUM_ALGORITHM = "xxh3-tree-16M"

# Sanity bounds: nothing is allocated from an unchecked field.
MAX_MANIFEST_BYTES = 64 << 20
MAX_TENSORS = 1_000_000
MAX_NDIM = 16
MAX_NAME = 1024

# magic, version, flags, header_size, alignment, payload_offset, payload_length,
# manifest_offset, manifest_length, file_length, manifest_checksum, header_checksum
_HEADER = struct.Struct("<8sIIIIQQQQQQQ")


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of the payload. `offset` is relative to the payload's start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int
    checksum: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "length": self.length,
            "checksum": f"{self.checksum:016x}",
        }


@dataclasses.dataclass(frozen=True)
class Manifest:
    fingerprint: Fingerprint
    tensors: tuple[TensorEntry, ...]

    @property
    def payload_length(self) -> int:
        if not self.tensors:
            return 0
        return align_up(max(t.offset + t.length for t in self.tensors))

    def to_bytes(self) -> bytes:
        doc = {
            "format": "thaw-snapshot",
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "fingerprint": self.fingerprint.to_json(),
            "tensors": [t.to_json() for t in self.tensors],
        }
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """An opened, validated snapshot file: header and manifest checked, payload not yet read."""

    path: Path
    manifest: Manifest
    payload_offset: int
    payload_length: int
    file_length: int

    @property
    def fingerprint(self) -> Fingerprint:
        return self.manifest.fingerprint

    @property
    def tensors(self) -> tuple[TensorEntry, ...]:
        return self.manifest.tensors

    def tensor(self, name: str) -> TensorEntry:
        for t in self.manifest.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


def layout(specs: Sequence[tuple[str, str, tuple[int, ...]]]) -> list[TensorEntry]:
    """Assign aligned payload offsets to (name, dtype, shape) in order; checksums come later."""
    entries, offset = [], 0
    for name, dtype, shape in specs:
        # The reader's limits, checked before a file exists: never write what cannot be read.
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"tensor name {name!r} must be 1 to {MAX_NAME} characters")
        if len(shape) > MAX_NDIM:
            raise ValueError(
                f"tensor {name!r} has {len(shape)} dims; snapshots hold at most {MAX_NDIM}"
            )
        length = itemsize(dtype)
        for d in shape:
            length *= d
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, length))
        offset = align_up(offset + length)
    return entries


# --- reading --------------------------------------------------------------------------------


def open_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Open and validate a snapshot's header and manifest. Raises a SnapshotError subclass."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(path, f"cannot open: {e.strerror}") from e
    try:
        return _read(fd, path)
    finally:
        os.close(fd)


def _read(fd: int, path: Path) -> Snapshot:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(path, "not a regular file")
    file_length = st.st_size
    raw = os.pread(fd, _HEADER.size, 0)
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise BadMagic(path, "not a thaw snapshot (wrong magic bytes)")
    if len(raw) < _HEADER.size:
        raise TruncatedSnapshot(path, f"file is {file_length} bytes, shorter than its header")
    (_, version, _flags, header_size, alignment, payload_offset, payload_length,
     manifest_offset, manifest_length, declared_length, manifest_checksum,
     header_checksum) = _HEADER.unpack(raw)  # fmt: skip
    if version != VERSION:
        raise UnsupportedVersion(
            path, f"format version {version}; this thaw reads version {VERSION}: upgrade thaw"
        )
    if _native.xxh3(raw[: _HEADER.size - 8]) != header_checksum:
        raise HeaderCorrupt(path, "header checksum mismatch: the header is damaged")
    if header_size != HEADER_SIZE or alignment != ALIGNMENT:
        raise HeaderCorrupt(path, f"header size {header_size} / alignment {alignment} invalid")
    if file_length < declared_length:
        raise TruncatedSnapshot(
            path, f"file is {file_length} bytes, header says {declared_length}: truncated copy?"
        )
    if declared_length != file_length:
        raise HeaderCorrupt(path, f"header says {declared_length} bytes, file has {file_length}")
    if payload_offset < HEADER_SIZE or payload_offset % ALIGNMENT or payload_length % ALIGNMENT:
        raise HeaderCorrupt(path, f"payload [{payload_offset}, +{payload_length}) misaligned")
    if payload_offset + payload_length > manifest_offset:
        raise HeaderCorrupt(path, "payload overlaps the manifest")
    if manifest_length > MAX_MANIFEST_BYTES:
        raise HeaderCorrupt(path, f"manifest of {manifest_length} bytes exceeds the 64 MiB bound")
    if manifest_offset + manifest_length > file_length:
        raise HeaderCorrupt(path, "manifest extends past the end of the file")
    blob = os.pread(fd, manifest_length, manifest_offset)
    if len(blob) != manifest_length:
        raise TruncatedSnapshot(path, "manifest shorter than declared")
    if _native.xxh3(blob) != manifest_checksum:
        raise ManifestCorrupt(path, "manifest checksum mismatch: the manifest is damaged")
    manifest = _parse_manifest(path, blob, payload_length)
    return Snapshot(path, manifest, payload_offset, payload_length, file_length)


def _parse_manifest(path: Path, blob: bytes, payload_length: int) -> Manifest:
    try:
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") != "thaw-snapshot":
            raise ValueError("not a thaw manifest")
        if doc.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
            raise ValueError(f"unknown checksum algorithm {doc.get('checksum_algorithm')!r}")
        fingerprint = Fingerprint.from_json(doc["fingerprint"])
        raw_tensors = doc["tensors"]
        if not isinstance(raw_tensors, list) or len(raw_tensors) > MAX_TENSORS:
            raise ValueError("tensors must be a list of at most 1,000,000 entries")
        tensors = tuple(_parse_entry(t) for t in raw_tensors)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ManifestCorrupt(path, f"invalid manifest: {e}") from e
    names: set[str] = set()
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.name in names:
            raise ManifestCorrupt(path, f"tensor {t.name!r} appears twice")
        names.add(t.name)
        if t.offset % ALIGNMENT:
            raise ManifestOutOfBounds(path, f"tensor {t.name!r} offset {t.offset} is not aligned")
        if t.offset < end:
            raise ManifestOutOfBounds(path, f"tensor {t.name!r} overlaps the previous tensor")
        if t.offset + t.length > payload_length:
            raise ManifestOutOfBounds(
                path, f"tensor {t.name!r} [{t.offset}, +{t.length}) lies outside the payload"
            )
        end = t.offset + t.length
    return Manifest(fingerprint, tensors)


def _parse_entry(raw: Any) -> TensorEntry:
    name, dtype, shape = raw["name"], raw["dtype"], raw["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"bad tensor name {name!r}")
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ValueError(f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} dims")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape):
        raise ValueError(f"tensor {name!r}: bad shape {shape}")
    offset, length = raw["offset"], raw["length"]
    if not all(isinstance(v, int) and 0 <= v < 1 << 56 for v in (offset, length)):
        raise ValueError(f"tensor {name!r}: bad offset/length")
    entry = TensorEntry(name, dtype, tuple(shape), offset, length, int(raw["checksum"], 16))
    if entry.numel * itemsize(dtype) != length:
        raise ValueError(f"tensor {name!r}: length {length} does not match {dtype}{shape}")
    return entry


def verify_tensor(path: object, entry: TensorEntry, addr: int, threads: int = 1) -> None:
    """Check the bytes of one tensor at `addr` against its recorded checksum."""
    found = _native.tree_hash(addr, entry.length, threads)
    if found != entry.checksum:
        raise ChecksumMismatch(path, entry.name, entry.checksum, found)


# --- writing --------------------------------------------------------------------------------


class SnapshotWriter:
    """Writes one snapshot crash-safely: temporary file, fsync, atomic rename, fsync of the dir.

    Use as a context manager: on an exception the temporary file is removed and the target
    path is untouched. The payload may be written in any order with `write_at` / `fd`.
    """

    def __init__(self, path: str | os.PathLike[str], entries: Sequence[TensorEntry]) -> None:
        self.path = Path(path)
        self.entries = list(entries)
        self.payload_length = Manifest(Fingerprint(), tuple(self.entries)).payload_length
        self._tmp: Path | None = None
        self.fd = -1
        self.direct_fd = -1

    def __enter__(self) -> SnapshotWriter:
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        self.fd, self._tmp = fd, Path(tmp)
        # A hole, not zeros, for the header gap and the payload: written regions fill it.
        os.ftruncate(fd, PAYLOAD_OFFSET + self.payload_length)
        try:
            self.direct_fd = os.open(tmp, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self.direct_fd = -1  # tmpfs and some filesystems refuse O_DIRECT
        return self

    def write_at(self, payload_offset: int, addr: int, length: int, threads: int = 1) -> None:
        _native.pwrite_from(self.fd, addr, length, PAYLOAD_OFFSET + payload_offset, threads)

    def commit(self, fingerprint: Fingerprint, checksums: Sequence[int]) -> None:
        """Write manifest and header, make the file durable and move it into place."""
        assert self._tmp is not None
        tensors = tuple(
            dataclasses.replace(e, checksum=c) for e, c in zip(self.entries, checksums, strict=True)
        )
        blob = Manifest(fingerprint, tensors).to_bytes()
        manifest_offset = PAYLOAD_OFFSET + self.payload_length
        file_length = manifest_offset + len(blob)
        os.pwrite(self.fd, blob, manifest_offset)
        os.ftruncate(self.fd, file_length)
        os.fchmod(self.fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from thawd
        fields = (
            MAGIC, VERSION, 0, HEADER_SIZE, ALIGNMENT, PAYLOAD_OFFSET, self.payload_length,
            manifest_offset, len(blob), file_length, _native.xxh3(blob),
        )  # fmt: skip
        head = _HEADER.pack(*fields, 0)[:-8]
        header = head + struct.pack("<Q", _native.xxh3(head))
        # The payload and manifest are durable before the header that makes them valid.
        os.fsync(self.fd)
        os.pwrite(self.fd, header, 0)
        os.fsync(self.fd)
        os.rename(self._tmp, self.path)
        self._tmp = None
        _fsync_dir(self.path.parent)

    def __exit__(self, *exc: object) -> None:
        for fd in (self.direct_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def _umask() -> int:
    # /proc shows the umask without the race of setting it to read it (Linux 4.7+).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def payload_fd(snapshot: Snapshot, direct: bool) -> Iterator[int]:
    """An fd on the snapshot file for payload reads; O_DIRECT when asked and supported."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    fd = -1
    if direct:
        try:
            fd = os.open(snapshot.path, flags | os.O_DIRECT)
        except OSError:
            fd = -1
    if fd < 0:
        fd = os.open(snapshot.path, flags)
    try:
        yield fd
    finally:
        os.close(fd)
