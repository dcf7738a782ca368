"""Snapshot format v1: the one reader and the one writer. docs/FORMAT.md is the specification.

Layout of a file:

    [0, 4096)                 header (struct below, zero padded)
    [2 MiB, 2 MiB + P)        payload: tensors, each at a 4 KiB aligned offset
    [M, M + L)                manifest: UTF-8 JSON, at a 4 KiB aligned offset after the payload

The header is written last, so a file whose writer died anywhere never has a valid header;
writers also work in a temporary file renamed into place only after fsync.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import secrets
import stat
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import thaw._native as _native
from thaw.errors import (
    BadMagic,
    HeaderCorrupt,
    ManifestCorrupt,
    ManifestOutOfBounds,
    SnapshotError,
    TruncatedSnapshot,
    UnsupportedVersion,
)
from thaw.format.dtypes import DTYPES, itemsize
from thaw.format.fingerprint import Fingerprint

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

# Sanity bounds: nothing is allocated from an unchecked field, and a manifest's parse cost is
# bounded by its structure, not only its bytes (64 MiB of `[{},{},...]` would be 22 million
# dicts, ~1.5 GB of Python objects in the daemon). 262,144 tensors is 3x the largest
# checkpoints in use (a 384-expert MoE with per-tensor scales has ~140,000).
MAX_MANIFEST_BYTES = 64 << 20
MAX_TENSORS = 1 << 18
MAX_NDIM = 16
MAX_NAME = 1024
# A manifest's JSON objects and arrays: the document, the fingerprint and its labels, and one
# object and one shape array per tensor. Counted on the raw bytes before parsing.
_MAX_CONTAINERS = 2 * MAX_TENSORS + 8
_ENTRY_KEYS = frozenset({"name", "dtype", "shape", "offset", "length", "checksum"})
_CHECKSUM_HEX = frozenset("0123456789abcdef")

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

    @functools.cached_property
    def content_id(self) -> str:
        """16 hex digits naming the payload's content: every tensor's name, dtype, shape and
        checksum. Two snapshots with equal ids restore the same bytes into the same tensors,
        whatever their files, fingerprints or labels (KV snapshots are bound to it). Computed
        once per manifest: records of a 100,000-tensor snapshot are listed every second."""
        doc = [[t.name, t.dtype, list(t.shape), t.checksum] for t in self.tensors]
        return f"{_native.xxh3(json.dumps(doc, separators=(',', ':')).encode()):016x}"

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
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise SnapshotError(path, f"cannot open: {e.strerror}") from e
    try:
        return read_snapshot(fd, path)
    finally:
        os.close(fd)


def read_snapshot(fd: int, path: object) -> Snapshot:
    """Validate the header and manifest of the snapshot open as `fd` (`path` names it in
    messages only: nothing is opened by name). Raises a SnapshotError subclass."""
    path = Path(str(path))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(path, "not a regular file")
    header = parse_header(path, os.pread(fd, _HEADER.size, 0), st.st_size)
    blob = os.pread(fd, header.manifest_length, header.manifest_offset)
    return header.snapshot(path, blob)


@dataclasses.dataclass(frozen=True)
class Header:
    """A validated header: where the payload and the manifest lie in a file of `file_length`."""

    payload_offset: int
    payload_length: int
    manifest_offset: int
    manifest_length: int
    manifest_checksum: int
    file_length: int

    def snapshot(self, path: Path, blob: bytes) -> Snapshot:
        """The snapshot whose manifest, read from where this header says, is `blob`."""
        if len(blob) != self.manifest_length:
            raise TruncatedSnapshot(path, "manifest shorter than declared")
        if _native.xxh3(blob) != self.manifest_checksum:
            raise ManifestCorrupt(path, "manifest checksum mismatch: the manifest is damaged")
        manifest = parse_manifest(path, blob, self.payload_length)
        return Snapshot(path, manifest, self.payload_offset, self.payload_length, self.file_length)


def parse_header(path: Path, raw: bytes, file_length: int) -> Header:
    """Validate the first HEADER_SIZE bytes (`raw`) of a snapshot of `file_length` bytes: a
    file's or an object's (thawd/s3 reads both ranges over HTTP, with the same bounds)."""
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise BadMagic(path, "not a thaw snapshot (wrong magic bytes)")
    if len(raw) < _HEADER.size:
        raise TruncatedSnapshot(path, f"file is {file_length} bytes, shorter than its header")
    (
        _,
        version,
        _flags,
        header_size,
        alignment,
        payload_offset,
        payload_length,
        manifest_offset,
        manifest_length,
        declared_length,
        manifest_checksum,
        header_checksum,
    ) = _HEADER.unpack(raw[: _HEADER.size])
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
    return Header(payload_offset, payload_length, manifest_offset, manifest_length,
                  manifest_checksum, file_length)  # fmt: skip


def parse_manifest(path: object, blob: bytes, payload_length: int) -> Manifest:
    """The manifest in `blob`, validated against a payload of `payload_length` bytes.

    The cost of a parse is bounded before json sees the bytes: at most `_MAX_CONTAINERS`
    objects and arrays (their opening brackets, counted in C), so no valid-checksum file can
    make the parser build millions of objects."""
    containers = blob.count(b"{") + blob.count(b"[")
    if containers > _MAX_CONTAINERS:
        raise ManifestCorrupt(
            path,
            f"manifest has {containers} JSON objects and arrays; a "
            f"snapshot holds at most {MAX_TENSORS} tensors",
        )
    try:
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") != "thaw-snapshot":
            raise ValueError("not a thaw manifest")
        if doc.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
            raise ValueError(f"unknown checksum algorithm {doc.get('checksum_algorithm')!r}")
        fingerprint = Fingerprint.from_json(doc["fingerprint"])
        raw_tensors = doc["tensors"]
        if not isinstance(raw_tensors, list) or len(raw_tensors) > MAX_TENSORS:
            raise ValueError(f"tensors must be a list of at most {MAX_TENSORS} entries")
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
    if not isinstance(raw, dict) or raw.keys() != _ENTRY_KEYS:
        raise ValueError(f"a tensor entry is an object with exactly the keys {sorted(_ENTRY_KEYS)}")
    name, dtype, shape = raw["name"], raw["dtype"], raw["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"bad tensor name {name!r}")
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ValueError(f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} dims")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape):
        raise ValueError(f"tensor {name!r}: bad shape {shape}")
    offset, length, checksum = raw["offset"], raw["length"], raw["checksum"]
    if not all(isinstance(v, int) and 0 <= v < 1 << 56 for v in (offset, length)):
        raise ValueError(f"tensor {name!r}: bad offset/length")
    if not isinstance(checksum, str) or len(checksum) != 16 or not set(checksum) <= _CHECKSUM_HEX:
        raise ValueError(f"tensor {name!r}: checksum must be 16 lowercase hex digits")
    entry = TensorEntry(name, dtype, tuple(shape), offset, length, int(checksum, 16))
    if entry.numel * itemsize(dtype) != length:
        raise ValueError(f"tensor {name!r}: length {length} does not match {dtype}{shape}")
    return entry


# --- writing --------------------------------------------------------------------------------


class SnapshotWriter:
    """Writes one snapshot crash-safely: temporary file, fsync, atomic link or rename, fsync of
    the directory.

    Use as a context manager: on an exception the temporary file is removed and the target
    path is untouched. The payload may be written in any order with `write_at` / `fd`.

    `dir_fd`: the directory as an open fd and `path` a bare name in it; nothing is then
    resolved by name but that one entry, so a directory swapped for a symlink after it was
    opened (and checked) changes nothing. `replace=False`: the final name appears only if it
    does not exist (`FileExistsError` otherwise); the temporary file is then an unnamed
    O_TMPFILE where the filesystem allows, so a writer killed at any point leaves nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[TensorEntry],
        *,
        dir_fd: int | None = None,
        replace: bool = True,
    ) -> None:
        self.path = Path(path)
        bare = self.path.name == str(path) and self.path.name not in ("", ".", "..")
        if dir_fd is not None and not bare:
            raise ValueError(f"with dir_fd, the snapshot path must be a bare name, not {path!r}")
        self.entries = list(entries)
        self.payload_length = Manifest(Fingerprint(), tuple(self.entries)).payload_length
        self.replace = replace
        self._own_dir = dir_fd is None
        self._dir_fd = -1 if dir_fd is None else dir_fd
        self._tmp: str | None = None  # the temporary file's name; None for O_TMPFILE
        self._linked = False
        self.fd = -1
        self.direct_fd = -1

    def __enter__(self) -> SnapshotWriter:
        if self._own_dir:
            self._dir_fd = os.open(self.path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.fd, self._tmp = _create_temp(self._dir_fd, self.path.name, self.replace)
            # A hole, not zeros, for the header gap and the payload: written regions fill it.
            os.ftruncate(self.fd, PAYLOAD_OFFSET + self.payload_length)
        except BaseException:
            self.__exit__()
            raise
        try:
            # The same file, a second open file description: O_DIRECT for payload writes.
            self.direct_fd = os.open(
                f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
            )
        except OSError:
            self.direct_fd = -1  # tmpfs and some filesystems refuse O_DIRECT
        return self

    def write_at(self, payload_offset: int, addr: int, length: int, threads: int = 1) -> None:
        _native.pwrite_from(self.fd, addr, length, PAYLOAD_OFFSET + payload_offset, threads)

    def commit(self, fingerprint: Fingerprint, checksums: Sequence[int]) -> None:
        """Write manifest and header, make the file durable and move it into place."""
        tensors = tuple(
            dataclasses.replace(e, checksum=c) for e, c in zip(self.entries, checksums, strict=True)
        )
        header, blob = encode(Manifest(fingerprint, tensors), self.payload_length)
        manifest_offset = PAYLOAD_OFFSET + self.payload_length
        os.pwrite(self.fd, blob, manifest_offset)
        os.ftruncate(self.fd, manifest_offset + len(blob))
        os.fchmod(self.fd, 0o666 & ~_umask())  # a temporary file's 0600 would hide it
        # The payload and manifest are durable before the header that makes them valid.
        os.fsync(self.fd)
        os.pwrite(self.fd, header, 0)
        os.fsync(self.fd)
        name = self.path.name
        if self._tmp is None:  # O_TMPFILE: give the unnamed inode its name
            os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self._dir_fd)
        elif self.replace:
            os.rename(self._tmp, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        else:  # link fails on an existing name: never replaces what appeared meanwhile
            os.link(
                self._tmp,
                name,
                src_dir_fd=self._dir_fd,
                dst_dir_fd=self._dir_fd,
                follow_symlinks=False,
            )
            os.unlink(self._tmp, dir_fd=self._dir_fd)
        self._tmp = None
        self._linked = True
        _fsync_dir(self._dir_fd)

    def __exit__(self, *exc: object) -> None:
        for fd in (self.direct_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1
        if self._tmp is not None and self._dir_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp, dir_fd=self._dir_fd)
            self._tmp = None
        if self._own_dir and self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


def encode(manifest: Manifest, payload_length: int) -> tuple[bytes, bytes]:
    """The header and the manifest of a snapshot whose payload of `payload_length` bytes
    lies at PAYLOAD_OFFSET and whose manifest follows it (a file, or an object uploaded in
    parts by thawd/s3)."""
    blob = manifest.to_bytes()
    manifest_offset = PAYLOAD_OFFSET + payload_length
    fields = (
        MAGIC,
        VERSION,
        0,
        HEADER_SIZE,
        ALIGNMENT,
        PAYLOAD_OFFSET,
        payload_length,
        manifest_offset,
        len(blob),
        manifest_offset + len(blob),
        _native.xxh3(blob),
    )
    head = _HEADER.pack(*fields, 0)[:-8]
    return head + struct.pack("<Q", _native.xxh3(head)), blob


TEMP_SUFFIX = ".tmp"


def _create_temp(dir_fd: int, name: str, replace: bool) -> tuple[int, str | None]:
    """A new file for writing in `dir_fd`: (fd, its temporary name), the name None for an
    unnamed O_TMPFILE (only where the final name must not replace anything: an O_TMPFILE
    can be linked into place but not renamed over an existing file)."""
    flags = os.O_WRONLY | os.O_CLOEXEC
    if not replace:
        try:
            return os.open(".", flags | os.O_TMPFILE, 0o600, dir_fd=dir_fd), None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
    tmp = f".{name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    return fd, tmp


def _umask() -> int:
    # /proc shows the umask without the race of setting it to read it (Linux 4.7+).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _fsync_dir(dir_fd: int) -> None:
    """Make a new directory entry durable. An O_PATH fd cannot be fsynced: open "." in it."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except PermissionError:
        return  # a directory we may write but not read: the entry is durable at the next sync
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
