"""The node's cache of snapshot objects: whole snapshot files in a directory of thawd's own,
within a byte budget, so a restarted thawd re-pins from disk instead of the network.

A file is named by a hash of the object's bucket, key and ETag: another version of the object
is another name, never a stale hit. Files are written unnamed (O_TMPFILE, or a hidden
temporary name where the filesystem has none), fsynced, then linked under their name: a name
in the cache is always a complete file. A file is used as any registered snapshot file is:
opened without following links, a regular file of the object's size whose manifest must be
the registered one (content id), every tensor verified as it is read into the pool.
Least recently used files go first when the budget is full; a snapshot larger than the
budget is not cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat

from thaw import _native
from thaw.format.snapshot import HEADER_SIZE
from thawd.files import SnapshotFile
from thawd.s3.config import ObjectRef
from thawd.s3.objects import SnapshotObject
from thawd.s3.store import Store

log = logging.getLogger("thawd.s3")
SUFFIX = ".thaw"
TEMP_PREFIX = ".tmp-"
# The cache's own files: only these are counted and evicted (a cache_dir that also holds
# someone's snapshot files loses none of them).
OWN = re.compile(r"[0-9a-f]{40}\.thaw")


class Cache:
    def __init__(self, directory: str, budget: int) -> None:
        self.directory = directory
        self.budget = budget
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        if st.st_uid != os.getuid():
            os.close(self.fd)
            raise PermissionError(
                f"cache_dir {directory} belongs to uid {st.st_uid}, not thawd's "
                f"({os.getuid()}): give thawd a directory of its own"
            )
        if st.st_mode & 0o022:  # never chmod a directory the operator named by mistake
            os.close(self.fd)
            raise PermissionError(f"cache_dir {directory} is writable by others (mode "
                                  f"{st.st_mode & 0o777:o}): give thawd a directory of its own, "
                                  "mode 0700")  # fmt: skip
        for entry in os.scandir(self.fd):  # a write killed midway left its temporary file
            if entry.name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=self.fd)

    @staticmethod
    def name(ref: ObjectRef, etag: str) -> str:
        ident = "\0".join((ref.bucket, ref.key, etag)).encode()
        return hashlib.sha256(ident).hexdigest()[:40] + SUFFIX

    def open(self, ref: ObjectRef, etag: str, size: int) -> SnapshotFile | None:
        """The cached file of this version of the object, opened and its manifest read, or
        None. The caller checks the manifest is the registered one."""
        name = self.name(ref, etag)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self.fd)  # fmt: skip
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            os.close(fd)
            log.warning("cache: %s is not a %d-byte file; removing it", name, size)
            self.remove(name)
            return None
        os.utime(fd)  # its last use, for the eviction order
        return SnapshotFile.adopt(fd, os.path.join(self.directory, name))

    def put(self, store: Store, obj: SnapshotObject, addr: int, threads: int) -> bool:
        """Write the object as a cache file: its header and manifest as the object holds them,
        the payload from the verified pool buffer at `addr`. False when it does not fit."""
        snap = obj.snapshot
        if obj.size > self.budget:
            log.info("cache: %s (%d bytes) is larger than cache_bytes; not cached",
                     obj.ref.uri, obj.size)  # fmt: skip
            return False
        name = self.name(obj.ref, obj.etag)
        self._make_room(obj.size, keep=name)
        head = obj.bytes_at(store, 0, HEADER_SIZE)
        tail_at = snap.payload_offset + snap.payload_length
        tail = obj.bytes_at(store, tail_at, obj.size - tail_at)
        fd, temp = self._create()
        try:
            os.ftruncate(fd, obj.size)
            os.pwrite(fd, head, 0)
            _native.pwrite_from(fd, addr, snap.payload_length, snap.payload_offset, threads)
            os.pwrite(fd, tail, tail_at)
            os.fsync(fd)
            try:
                if temp is None:
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=self.fd)
                else:
                    os.link(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd,
                            follow_symlinks=False)  # fmt: skip
            except FileExistsError:
                pass  # another pin of the same version cached it first: same bytes
            os.fsync(self.fd)
        finally:
            os.close(fd)
            if temp is not None:
                self.remove(temp)
        return True

    def _create(self) -> tuple[int, str | None]:
        """An unnamed file in the cache directory (None), else a hidden temporary name."""
        with contextlib.suppress(OSError):
            return os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                           dir_fd=self.fd), None  # fmt: skip
        temp = f"{TEMP_PREFIX}{os.urandom(8).hex()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(temp, flags, 0o600, dir_fd=self.fd), temp

    def _make_room(self, size: int, keep: str) -> None:
        """Remove least recently used files until `size` more bytes fit the budget."""
        files = []
        for e in os.scandir(self.fd):
            if OWN.fullmatch(e.name) and e.name != keep:
                st = e.stat(follow_symlinks=False)
                files.append((st.st_mtime_ns, st.st_blocks * 512, e.name))
        used = sum(f[1] for f in files)
        for _, blocks, name in sorted(files):
            if used + size <= self.budget:
                break
            log.info("cache: removing %s (%d bytes) to make room", name, blocks)
            self.remove(name)
            used -= blocks

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def close(self) -> None:
        os.close(self.fd)
