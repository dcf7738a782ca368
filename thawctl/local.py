"""What thawctl can do with a snapshot file alone, without a daemon: describe it, verify it.

Both read through thaw.format (the one reader), so a file thawctl calls valid is one thaw
restores, and a damaged one fails here with the same SnapshotError the restore would raise.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thaw import _native
from thaw.errors import ChecksumMismatch
from thaw.format import CHECKSUM_ALGORITHM, VERSION, Snapshot, open_snapshot
from thaw.format.checksum import file_checksums

# Reads of 64 MiB (four 16 MiB hash blocks): a chunk boundary is always a block boundary of
# the tensor, so block hashes of consecutive chunks concatenate to the tensor's tree hash.
CHUNK = 4 * _native.BLOCK_HASH_SIZE
IO_THREADS = max(1, min(8, os.cpu_count() or 1))


def file_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `info --json` document of a snapshot file (schema in docs/THAWCTL.md)."""
    snap = open_snapshot(path)
    return snapshot_file_doc(snap)


def snapshot_file_doc(snap: Snapshot) -> dict[str, Any]:
    by_dtype: dict[str, int] = {}
    for t in snap.tensors:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.length
    return {
        "path": str(Path(snap.path).resolve()),
        "format_version": VERSION,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "file_bytes": snap.file_length,
        "payload_offset": snap.payload_offset,
        "payload_bytes": snap.payload_length,
        "tensor_bytes": sum(t.length for t in snap.tensors),
        "tensor_count": len(snap.tensors),
        "bytes_by_dtype": by_dtype,
        "fingerprint": snap.fingerprint.to_json(),
        "tensors": [t.to_json() for t in snap.tensors],
    }


@dataclasses.dataclass(frozen=True)
class Mismatch:
    tensor: str
    expected: int
    found: int


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    path: str
    tensors: int
    bytes: int
    seconds: float
    mismatches: tuple[Mismatch, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def error(self) -> ChecksumMismatch:
        """The first mismatch as the library's exception (for the one-line message)."""
        m = self.mismatches[0]
        return ChecksumMismatch(self.path, m.tensor, m.expected, m.found)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": "file",
            "path": self.path,
            "ok": self.ok,
            "tensor_count": self.tensors,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "mismatches": [
                {"tensor": m.tensor, "expected": f"{m.expected:016x}", "found": f"{m.found:016x}"}
                for m in self.mismatches
            ],
        }


def verify_file(
    path: str | os.PathLike[str],
    on_progress: Callable[[int, int], None] | None = None,
    threads: int = IO_THREADS,
) -> VerifyResult:
    """Recompute every tensor's checksum from the file; collect every mismatch, not just one.

    Header and manifest problems raise their SnapshotError from open_snapshot.
    """
    import numpy as np

    started = time.perf_counter()
    snap = open_snapshot(path)
    total = sum(t.length for t in snap.tensors)
    buf = np.empty(CHUNK, dtype=np.uint8)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    mismatches = []
    fd = os.open(snap.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _native.fadvise(fd, snap.payload_offset, snap.payload_length, _native.FADV_SEQUENTIAL)
        buffer = (int(buf.ctypes.data), CHUNK)
        for t, found in file_checksums(
            fd,
            snap.payload_offset,
            snap.tensors,
            buffer,
            threads,
            on_bytes=advance,
        ):
            if found != t.checksum:
                mismatches.append(Mismatch(t.name, t.checksum, found))
    finally:
        os.close(fd)
    return VerifyResult(
        str(Path(snap.path).resolve()),
        len(snap.tensors),
        done,
        time.perf_counter() - started,
        tuple(mismatches),
    )
