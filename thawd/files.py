"""A registered snapshot's file as thawd holds it: one open fd, its identity and its manifest.

A snapshot's identity is fixed when it is registered (or written by a freeze): the file is
opened once (thawd/paths.py), its header and manifest are read from that fd, and its
(dev, ino, size, mtime, ctime) recorded. Every later read goes through that fd or a new open
file description of the same inode (/proc/self/fd, for O_DIRECT), never through the name.

A file changed in place (its size, mtime or ctime differ from the recorded ones) or whose path
now names another file (replaced, removed) is refused with SnapshotChanged: its manifest no
longer describes what the name holds. Re-register it to adopt the new file. Bytes read from
the fd are verified against the manifest's checksums wherever they are used, so a change
that leaves the metadata as it was is still caught, tensor by tensor.

Every method that touches the filesystem blocks: callers run it on a worker thread.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import stat
from collections.abc import Sequence

from thaw.errors import SnapshotChanged
from thaw.format import Snapshot, TensorEntry, read_snapshot
from thaw.format.checksum import expect_checksum, file_checksums

# Verifying a file reads it through a scratch buffer of this size: a multiple of the 16 MiB
# hash block, so a tensor's block hashes come out piece by piece.
SCRATCH = 64 << 20
# O_DIRECT reads: offsets, lengths and buffers in multiples of the logical block size (4 KiB
# on every device thaw targets; snapshots align tensors to it).
DIRECT_ALIGN = 4096


@dataclasses.dataclass(frozen=True)
class Identity:
    """What makes a file the one that was registered. ctime cannot be set by users: any
    write, truncate, chmod or rename of the inode moves it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same_file(self, st: os.stat_result) -> bool:
        return (self.dev, self.ino) == (st.st_dev, st.st_ino)

    def change(self, st: os.stat_result) -> str:
        """How the file behind `st` differs from this identity ("" when it does not)."""
        if not self.same_file(st):
            return "the path now names another file (replaced)"
        if st.st_size != self.size:
            return f"its size changed from {self.size} to {st.st_size} bytes"
        if (st.st_mtime_ns, st.st_ctime_ns) != (self.mtime_ns, self.ctime_ns):
            return "it was modified in place"
        return ""


class SnapshotFile:
    """An opened, identified snapshot file. Owns its fd until `close()`."""

    def __init__(self, fd: int, path: str, snapshot: Snapshot, identity: Identity) -> None:
        self.fd = fd
        self.path = path
        self.snapshot = snapshot
        self.identity = identity

    @classmethod
    def adopt(cls, fd: int, path: str) -> SnapshotFile:
        """Take ownership of `fd` (opened and checked for the caller) and read its manifest:
        the identity is recorded before the read, so a write during it shows as a change."""
        try:
            identity = Identity.of(os.fstat(fd))
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SnapshotChanged(f"{path}: not a regular file")
            snapshot = read_snapshot(fd, path)
            if os.fstat(fd).st_size != identity.size:
                raise SnapshotChanged(f"{path} changed while thawd read its manifest; retry")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, snapshot, identity)

    @classmethod
    def reopen(cls, path: str, identity: Identity | None) -> SnapshotFile:
        """A registered file opened again by its name after a restart: it must still be the
        file that was registered (`identity`; None for a row from before identities, which
        adopts the file found). Raises SnapshotChanged, or a SnapshotError for a bad file."""
        try:
            # O_PATH first: whatever the name holds now is looked at, never opened, until it
            # is known to be the registered regular file (a device's open can have effects).
            probe = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            raise SnapshotChanged(f"{path}: cannot open it ({e.strerror}): it was removed or "
                                  "replaced since it was registered") from None  # fmt: skip
        try:
            st = os.fstat(probe)
            why = identity.change(st) if identity is not None else ""
            if not why and not stat.S_ISREG(st.st_mode):
                why = "it is no longer a regular file"
            if why:
                raise SnapshotChanged(f"{path}: {why} since it was registered")
            fd = os.open(f"/proc/self/fd/{probe}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
        finally:
            os.close(probe)
        opened = cls.adopt(fd, path)
        if identity is not None:
            opened.identity = identity
        return opened

    def check(self) -> None:
        """Raise SnapshotChanged unless the fd's file is unchanged and the path still names it."""
        # The name first: a replaced or removed file also changes the old inode's ctime (its
        # link count), and "replaced" is the more useful thing to say.
        try:
            named = os.stat(self.path)
            why = "" if self.identity.same_file(named) else self.identity.change(named)
        except OSError as e:
            why = f"the path cannot be reached ({e.strerror}): removed or replaced"
        why = why or self.identity.change(os.fstat(self.fd))
        if why:
            raise SnapshotChanged(f"{self.path}: {why} since it was registered; register it "
                                  "again to use the new file")  # fmt: skip

    def dup(self) -> int:
        """A new fd for a client: the same open file description, read-only."""
        return os.dup(self.fd)

    def direct(self) -> tuple[int, int]:
        """A new read-only fd on the same inode, and the alignment its reads need: O_DIRECT
        (4096) where the filesystem allows it, through a new open file description of
        /proc/self/fd (not the name); else a dup and 0."""
        try:
            return os.open(f"/proc/self/fd/{self.fd}",
                           os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), DIRECT_ALIGN  # fmt: skip
        except OSError:
            return os.dup(self.fd), 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def verify_file(file: SnapshotFile, tensors: Sequence[TensorEntry], threads: int) -> None:
    """Check every tensor of `file` against its checksum, reading with pread (O_DIRECT where
    allowed) into a private scratch buffer and hashing as the bytes land: no mapping of the
    file, so a file truncated meanwhile is an EOFError here, never a SIGBUS in the daemon."""
    scratch = mmap.mmap(-1, SCRATCH)
    view = ctypes.c_char.from_buffer(scratch)
    fd, align = file.direct()
    try:
        buffer = (ctypes.addressof(view), SCRATCH)
        base = file.snapshot.payload_offset
        for t, found in file_checksums(fd, base, tensors, buffer, threads, direct=bool(align)):
            expect_checksum(file.path, t, found)
    finally:
        os.close(fd)
        del view
        scratch.close()
