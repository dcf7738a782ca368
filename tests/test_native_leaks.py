"""Leak tests for thaw._native: call each entry point many times (success and
error paths) and assert process RSS, Python allocations and open fds stay flat
(psutil's tests/test_memleaks.py approach)."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from thaw import _native

MiB = 1 << 20
LOOPS = 200
WARMUP = 20
# Per-call pools create and join threads; glibc caches a few thread stacks and
# malloc arenas, which the warm-up absorbs. A real leak of the buffers below
# (>= 1 MiB per call) would be >= 200 MiB after LOOPS.
RSS_TOLERANCE = 4 * MiB
BLOCKS_TOLERANCE = 50  # Python object blocks (sys.getallocatedblocks)

PROC = psutil.Process()


def addr_of(buf: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def assert_flat(fn: Any, loops: int = LOOPS) -> None:
    for _ in range(WARMUP):
        fn()
    gc.collect()
    rss0, blocks0 = PROC.memory_info().rss, sys.getallocatedblocks()
    for _ in range(loops):
        fn()
    gc.collect()
    rss1, blocks1 = PROC.memory_info().rss, sys.getallocatedblocks()
    assert rss1 - rss0 < RSS_TOLERANCE, f"RSS grew by {(rss1 - rss0) / MiB:.1f} MiB"
    assert blocks1 - blocks0 < BLOCKS_TOLERANCE, f"{blocks1 - blocks0} Python blocks leaked"


@pytest.fixture
def data_fd(tmp_path: Path) -> Iterator[Any]:
    path = tmp_path / "leak.bin"
    path.write_bytes(os.urandom(4 * MiB))
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def test_allocate_copy_hash_pread_loop_is_flat(data_fd: Any) -> None:
    def once() -> None:
        # Fresh mappings each time: mmap + prefault + copy + hash + I/O + unmap.
        src, dst = mmap.mmap(-1, 4 * MiB), mmap.mmap(-1, 4 * MiB)
        try:
            a, b = addr_of(src), addr_of(dst)
            _native.prefault(a, 4 * MiB, threads=2)
            _native.pread_into(data_fd, a, 4 * MiB, 0, threads=2, block=1 * MiB)
            _native.copy(b, a, 4 * MiB, threads=2)
            _native.block_hashes(b, 4 * MiB, threads=2)
            _native.tree_hash(b, 4 * MiB, threads=2)
            _native.xxh3(src)  # type: ignore[arg-type]
            _native.pwrite_from(data_fd, b, 1 * MiB, 0, threads=2, block=256 * 1024)
        finally:
            src.close()
            dst.close()

    assert_flat(once)


def test_error_paths_are_flat(data_fd: Any) -> None:
    buf = bytearray(8 * MiB)
    a = addr_of(buf)

    def once() -> None:
        with pytest.raises(EOFError):
            _native.pread_into(data_fd, a, 8 * MiB, 0, threads=2, block=1 * MiB)
        with pytest.raises(OSError):
            _native.pread_into(987654, a, 1 * MiB, 0, threads=2)
        with pytest.raises(OSError):
            _native.resident_bytes(987654, 0, 4096)
        with pytest.raises(ValueError):
            _native.copy(a, a + 64, -1)

    assert_flat(once)


def test_small_calls_are_flat() -> None:
    data = bytearray(os.urandom(64 * 1024))
    a = addr_of(data)

    def once() -> None:
        for _ in range(50):
            _native.xxh3(data)
            _native.block_hashes(a, len(data))
            _native.tree_hash(a, len(data))

    assert_flat(once)


def test_resident_bytes_keeps_fd_count_and_rss_flat(data_fd: Any) -> None:
    fds0 = PROC.num_fds()

    def once() -> None:
        for _ in range(10):
            assert _native.resident_bytes(data_fd, 123, 4 * MiB - 123) >= 0
        _native.fadvise(data_fd, 0, 0, _native.FADV_WILLNEED)

    assert_flat(once)
    assert PROC.num_fds() == fds0


def test_read_to_device_without_a_device_is_flat(data_fd: Any) -> None:
    """Its argument errors after the bounce list and ranges are parsed, and a call with no
    bytes to move (no driver call is made: the entry points are never called)."""
    buffers = mmap.mmap(-1, 4 * _native.BOUNCE_SIZE)
    bounce = [addr_of(buffers) + i * _native.BOUNCE_SIZE for i in range(4)]
    driver = [1] * 11

    def once() -> None:
        for _ in range(20):
            with pytest.raises(ValueError):
                _native.read_to_device(data_fd, [4096, 8192], [0, 100], [1, 1], bounce, driver,
                                       2, 4096)  # fmt: skip
            assert _native.read_to_device(data_fd, [4096], [0], [0], bounce, driver, 2) == [b""]
            assert _native.read_to_device(data_fd, [], [], [], bounce, driver, verify=False) is None

    assert_flat(once)
    buffers.close()
