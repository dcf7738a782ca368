"""Mapping fds into this process: the memory half of the data path.

thawd hands out fds (a sealed memfd pool buffer, or the snapshot file itself); this module
maps them and hands back addresses for thaw.copy.datapath to copy from. thawd maps its own
memfd buffers with it too (and creates and seals them in thawd/buffers.py).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from types import TracebackType

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
MADV_POPULATE_READ = 22  # linux/mman.h; Python's mmap module does not name it
PAGE = mmap.PAGESIZE


def _oserror(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


class Mapping:
    """A shared mapping of [offset, offset+length) of an fd; `addr` is its first byte."""

    def __init__(
        self,
        fd: int,
        length: int,
        offset: int = 0,
        *,
        writable: bool = False,
        populate: bool = False,
    ) -> None:
        if length <= 0:
            raise ValueError("cannot map an empty range")
        if offset % PAGE:
            raise ValueError(f"mapping offset {offset} is not page aligned")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_SHARED | (MAP_POPULATE if populate else 0)
        addr = _libc.mmap(None, length, prot, flags, fd, offset)
        if addr is None or addr == _MAP_FAILED:
            raise _oserror(f"mmap(fd={fd}, length={length}, offset={offset})")
        self.addr: int = addr
        self.length = length
        self.locked = False

    def lock(self) -> bool:
        """mlock the mapping; False (and nothing locked) when RLIMIT_MEMLOCK forbids it."""
        if _libc.mlock(self.addr, self.length) != 0:
            return False
        self.locked = True
        return True

    def advise(self, advice: int) -> None:
        _libc.madvise(self.addr, self.length, advice)

    def populate(self, offset: int, length: int) -> None:
        """Fault [offset, offset+length) of the mapping in through the kernel
        (MADV_POPULATE_READ, Linux 5.14): a file truncated under the mapping makes this raise
        OSError(EFAULT), where touching the pages would deliver SIGBUS to the process."""
        if _libc.madvise(self.addr + offset, length, MADV_POPULATE_READ) != 0:
            raise _oserror(f"madvise(MADV_POPULATE_READ, offset={offset}, length={length})")

    def close(self) -> None:
        if self.addr:
            if self.locked:
                _libc.munlock(self.addr, self.length)
            _libc.munmap(self.addr, self.length)
            self.addr = 0
            self.locked = False

    def __enter__(self) -> Mapping:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if _libc is not None:  # None at interpreter exit, when the process unmaps anyway
            self.close()
