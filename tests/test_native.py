"""Contract tests of thaw._native against real files and memory (no mocks)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
from pathlib import Path
from typing import Any

import pytest

from thaw import _native

MiB = 1 << 20
BLOCK = _native.BLOCK_HASH_SIZE


def addr_of(buf: Any) -> int:
    """Address of a writable buffer (bytearray or mmap)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def data_file(tmp_path: Path) -> Any:
    def make(content: bytes) -> Any:
        path = tmp_path / "data.bin"
        path.write_bytes(content)
        return path

    return make


# --- pread_into / pwrite_from ---------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("length", [1, 4095, 4097, 3 * MiB + 17])
def test_pread_into_reads_exact_range(data_file: Any, threads: int, length: int) -> None:
    content = random_bytes(length + 1000, seed=length)
    path = data_file(content)
    buf = bytearray(length)
    fd = os.open(path, os.O_RDONLY)
    try:
        _native.pread_into(fd, addr_of(buf), length, 999, threads=threads, block=64 * 1024 + 3)
    finally:
        os.close(fd)
    assert bytes(buf) == content[999 : 999 + length]


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_pwrite_then_pread_round_trip(tmp_path: Path, threads: int) -> None:
    length = 5 * MiB + 123
    src = bytearray(random_bytes(length, seed=threads))
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _native.pwrite_from(fd, addr_of(src), length, 4096, threads=threads, block=1 * MiB)
        assert os.fstat(fd).st_size == 4096 + length
        dst = bytearray(length)
        _native.pread_into(fd, addr_of(dst), length, 4096, threads=threads)
    finally:
        os.close(fd)
    assert dst == src
    assert path.read_bytes()[4096:] == bytes(src)


def test_zero_length_is_a_no_op(data_file: Any) -> None:
    fd = os.open(data_file(b"abc"), os.O_RDONLY)
    try:
        _native.pread_into(fd, 0, 0, 0)
        _native.pwrite_from(fd, 0, 0, 0)
    finally:
        os.close(fd)


def _open_direct(tmp_path: Path) -> Any:
    """An O_DIRECT fd in the first directory whose filesystem accepts it."""
    for d in (tmp_path, "/var/tmp", os.path.expanduser("~")):
        path = os.path.join(d, f"thaw-direct-{os.getpid()}.bin")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError as e:
            if e.errno == errno.EINVAL:  # e.g. tmpfs refuses O_DIRECT
                continue
            raise
        return fd, path
    pytest.skip("no filesystem here accepts O_DIRECT")


@pytest.mark.parametrize("threads", [1, 4])
def test_o_direct_round_trip_with_aligned_buffers(tmp_path: Path, threads: int) -> None:
    length = 4 * MiB
    fd, path = _open_direct(tmp_path)
    src = mmap.mmap(-1, length)  # anonymous mappings are page-aligned
    dst = mmap.mmap(-1, length)
    try:
        src[:] = random_bytes(length, seed=7)
        _native.pwrite_from(fd, addr_of(src), length, 8192, threads=threads, block=256 * 1024)
        _native.pread_into(fd, addr_of(dst), length, 8192, threads=threads, block=256 * 1024)
        assert dst[:] == src[:]
    finally:
        os.close(fd)
        os.unlink(path)
        src.close()
        dst.close()


def test_o_direct_misaligned_offset_raises_oserror(tmp_path: Path) -> None:
    fd, path = _open_direct(tmp_path)
    buf = mmap.mmap(-1, 8192)
    try:
        with pytest.raises(OSError, match=r"pwrite\(fd=\d+, offset=1, length=4096\)"):
            _native.pwrite_from(fd, addr_of(buf), 4096, 1)
    finally:
        os.close(fd)
        os.unlink(path)
        buf.close()


# --- pread_hashed ----------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3])
def test_pread_hashed_reads_and_hashes_what_landed(data_file: Any, threads: int) -> None:
    content = random_bytes(BLOCK * 2 + 3 * MiB, seed=11)
    path = data_file(content)
    # Ranges of every shape: empty, tiny, unaligned, more than one hash block.
    ranges = [(0, 0), (4096, 100), (8192, BLOCK + 5), (0, 2 * BLOCK + 17), (MiB + 3, 4097)]
    places = [sum((n + 4095) // 4096 * 4096 + 4096 for _, n in ranges[:i]) for i in range(6)]
    buf = mmap.mmap(-1, places[-1])
    try:
        dsts = [addr_of(buf) + at for at in places[:-1]]
        fd = os.open(path, os.O_RDONLY)
        try:
            hashes = _native.pread_hashed(fd, dsts, [o for o, _ in ranges],
                                          [n for _, n in ranges], threads)  # fmt: skip
        finally:
            os.close(fd)
        for (offset, length), dst, digest in zip(ranges, dsts, hashes, strict=True):
            assert ctypes.string_at(dst, length) == content[offset : offset + length]
            assert digest == _native.block_hashes(dst, length)
    finally:
        buf.close()


def test_pread_hashed_with_o_direct(tmp_path: Path) -> None:
    fd, path = _open_direct(tmp_path)
    src = mmap.mmap(-1, BLOCK + 8192)
    dst = mmap.mmap(-1, BLOCK + 8192)
    try:
        src[:] = random_bytes(len(src), seed=12)
        _native.pwrite_from(fd, addr_of(src), len(src), 0)
        length = BLOCK + 100  # read rounded up to 4 KiB; only `length` bytes are hashed
        (digest,) = _native.pread_hashed(fd, [addr_of(dst)], [4096], [length], 2, 4096)
        assert dst[:length] == src[4096 : 4096 + length]
        assert digest == _native.block_hashes(addr_of(src) + 4096, length)
        with pytest.raises(ValueError, match="4096-aligned"):
            _native.pread_hashed(fd, [addr_of(dst) + 1], [0], [10], 1, 4096)
    finally:
        os.close(fd)
        os.unlink(path)
        src.close()
        dst.close()


def test_pread_hashed_past_eof_names_the_offset(data_file: Any) -> None:
    path = data_file(random_bytes(MiB))
    buf = mmap.mmap(-1, 2 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(EOFError, match=r"offset=1048576.*end of file"):
            _native.pread_hashed(fd, [addr_of(buf)], [0], [2 * MiB])
        with pytest.raises(ValueError, match="differ in length"):
            _native.pread_hashed(fd, [addr_of(buf)], [0, 1], [1])
    finally:
        os.close(fd)
        buf.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_pread_past_eof_raises_eoferror_naming_offset_and_missing(
    data_file: Any, threads: int
) -> None:
    fd = os.open(data_file(b"x" * 10_000), os.O_RDONLY)
    buf = bytearray(20_000)
    try:
        with pytest.raises(EOFError) as info:
            _native.pread_into(fd, addr_of(buf), 20_000, 0, threads=threads, block=4096)
    finally:
        os.close(fd)
    # Lowest failing piece wins, whatever the thread count: bytes 8192..12287
    # reach EOF at 10000 with 2288 bytes of that piece missing.
    assert str(info.value) == (
        f"pread(fd={fd}, offset=10000, length=2288): end of file, 2288 bytes missing"
    )


def test_pread_bad_fd_raises_oserror_naming_pread() -> None:
    buf = bytearray(4096)
    with pytest.raises(OSError) as info:
        _native.pread_into(987654, addr_of(buf), 4096, 4096)
    assert info.value.errno == errno.EBADF
    assert "pread(fd=987654, offset=4096, length=4096)" in str(info.value)


def test_pwrite_to_read_only_fd_raises_oserror_naming_pwrite(data_file: Any) -> None:
    fd = os.open(data_file(b"abc"), os.O_RDONLY)
    buf = bytearray(100)
    try:
        with pytest.raises(OSError, match=r"pwrite\(fd=\d+, offset=0, length=100\)") as info:
            _native.pwrite_from(fd, addr_of(buf), 100, 0, threads=2)
    finally:
        os.close(fd)
    assert info.value.errno == errno.EBADF


def test_pwrite_to_full_device_raises_enospc() -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    buf = bytearray(8192)
    try:
        with pytest.raises(OSError, match=r"pwrite\(fd=\d+") as info:
            _native.pwrite_from(fd, addr_of(buf), 8192, 0)
    finally:
        os.close(fd)
    assert info.value.errno == errno.ENOSPC


# --- copy / prefault ------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 7])
@pytest.mark.parametrize("length", [0, 1, 2 * MiB - 1, 2 * MiB + 1, 19 * MiB + 4097])
def test_copy_copies_exactly(threads: int, length: int) -> None:
    src = bytearray(random_bytes(length, seed=length))
    dst = bytearray(length + 16)
    if length:
        _native.copy(addr_of(dst) + 8, addr_of(src), length, threads=threads)
    assert dst[8 : 8 + length] == src
    assert dst[:8] == bytes(8) and dst[8 + length :] == bytes(8)


def test_copy_between_large_mappings() -> None:
    length = 64 * MiB
    src, dst = mmap.mmap(-1, length), mmap.mmap(-1, length)
    try:
        src[:] = random_bytes(length, seed=3)
        _native.copy(addr_of(dst), addr_of(src), length, threads=4)
        assert dst[:] == src[:]
    finally:
        src.close()
        dst.close()


def test_copy_rejects_overlap() -> None:
    buf = bytearray(4 * MiB)
    with pytest.raises(ValueError, match="overlap"):
        _native.copy(addr_of(buf) + 1, addr_of(buf), 2 * MiB)


@pytest.mark.parametrize("write", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
def test_prefault_faults_in_pages_and_keeps_contents(write: Any, threads: int) -> None:
    length = 16 * MiB + 100
    m = mmap.mmap(-1, length)
    try:
        m[-5:] = b"hello"
        _native.prefault(addr_of(m) + 1, length - 1, threads=threads, write=write)
        assert m[-5:] == b"hello"
        assert m[:-5].count(0) == length - 5
    finally:
        m.close()


def test_prefault_file_mapping_makes_it_resident(tmp_path: Path) -> None:
    length = 8 * MiB
    path = tmp_path / "f.bin"
    path.write_bytes(b"\1" * length)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        _native.fadvise(fd, 0, 0, _native.FADV_DONTNEED)
        m = mmap.mmap(fd, length)
        try:
            _native.prefault(addr_of(m), length, threads=2, write=False)
            assert _native.resident_bytes(fd, 0, length) == length
        finally:
            m.close()
    finally:
        os.close(fd)


# --- checksums ------------------------------------------------------------------


def test_xxh3_known_answers() -> None:
    assert _native.xxh3(b"") == 0x2D06800538D394C2
    # Any contiguous buffer works, and the hash is of its bytes.
    data = random_bytes(3 * MiB)
    assert _native.xxh3(bytearray(data)) == _native.xxh3(data) == _native.xxh3(memoryview(data))
    assert _native.xxh3(b"a") != _native.xxh3(b"b")


def test_xxh3_rejects_non_buffers() -> None:
    with pytest.raises(TypeError):
        _native.xxh3("text")  # type: ignore[arg-type]


def test_block_hashes_of_empty_range_is_empty() -> None:
    assert _native.block_hashes(0, 0) == b""
    assert _native.tree_hash(0, 0) == _native.xxh3(b"")


def python_block_hashes(data: bytes) -> bytes:
    return b"".join(
        _native.xxh3(data[i : i + BLOCK]).to_bytes(8, "little") for i in range(0, len(data), BLOCK)
    )


@pytest.mark.parametrize("length", [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345])
def test_block_hashes_match_per_block_xxh3_for_any_thread_count(length: int) -> None:
    data = bytearray(random_bytes(length, seed=length))
    expected = python_block_hashes(bytes(data))
    assert len(expected) == 8 * -(-length // BLOCK)
    for threads in (1, 2, 3, 16):
        assert _native.block_hashes(addr_of(data), length, threads=threads) == expected
        assert _native.tree_hash(addr_of(data), length, threads=threads) == _native.xxh3(expected)


def test_tree_hash_with_more_than_64_blocks() -> None:
    # Sparse anonymous mapping: reads see the shared zero page, no RSS growth.
    length = 70 * BLOCK + 5
    m = mmap.mmap(-1, length)
    try:
        hashes = _native.block_hashes(addr_of(m), length, threads=2)
        zero_block = _native.xxh3(bytes(BLOCK)).to_bytes(8, "little")
        assert hashes == zero_block * 70 + _native.xxh3(bytes(5)).to_bytes(8, "little")
        assert _native.tree_hash(addr_of(m), length, threads=2) == _native.xxh3(hashes)
    finally:
        m.close()


def test_tree_hash_detects_a_flipped_bit() -> None:
    data = bytearray(random_bytes(2 * BLOCK))
    before = _native.tree_hash(addr_of(data), len(data))
    data[BLOCK + 5] ^= 1
    assert _native.tree_hash(addr_of(data), len(data), threads=2) != before


# --- page cache -----------------------------------------------------------------


def test_resident_bytes_after_write_and_after_dontneed(tmp_path: Path) -> None:
    length = 16 * MiB
    path = tmp_path / "cache.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, random_bytes(length))
        warm = _native.resident_bytes(fd, 0, length)
        assert 0 < warm <= length
        os.fsync(fd)  # DONTNEED drops only clean pages
        _native.fadvise(fd, 0, length, _native.FADV_DONTNEED)
        cold = _native.resident_bytes(fd, 0, length)
        assert cold < warm
        _native.fadvise(fd, 0, length, _native.FADV_SEQUENTIAL)
        _native.fadvise(fd, 0, length, _native.FADV_WILLNEED)
    finally:
        os.close(fd)


def test_resident_bytes_clips_to_unaligned_range(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(b"z" * 3 * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 3 * 4096)  # make it resident
        assert _native.resident_bytes(fd, 100, 5000) == 5000
        assert _native.resident_bytes(fd, 4095, 2) == 2
        assert _native.resident_bytes(fd, 0, 0) == 0
        # Past end of file counts as not resident.
        assert _native.resident_bytes(fd, 0, 10 * 4096) == 3 * 4096
    finally:
        os.close(fd)


def test_resident_bytes_bad_fd_names_mmap() -> None:
    with pytest.raises(OSError, match=r"mmap\(fd=987654, offset=0, length=4096\)"):
        _native.resident_bytes(987654, 0, 4096)


def test_fadvise_bad_fd_names_posix_fadvise() -> None:
    with pytest.raises(OSError, match=r"posix_fadvise\(fd=987654") as info:
        _native.fadvise(987654, 0, 0, _native.FADV_DONTNEED)
    assert info.value.errno == errno.EBADF


# --- argument validation --------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda a: _native.pread_into(0, a, -1, 0),
        lambda a: _native.pread_into(0, a, 10, -1),
        lambda a: _native.pread_into(0, a, 10, 0, threads=0),
        lambda a: _native.pread_into(0, a, 10, 0, threads=257),
        lambda a: _native.pread_into(0, a, 10, 0, block=0),
        lambda a: _native.pwrite_from(1, a, -5, 0),
        lambda a: _native.copy(a, a + 64, -1),
        lambda a: _native.copy(a, a + 64, 8, threads=0),
        lambda a: _native.copy(-1, a, 8),
        lambda a: _native.copy(0, a, 8),
        lambda a: _native.prefault(a, -1),
        lambda a: _native.prefault(a, 8, threads=-3),
        lambda a: _native.block_hashes(a, -1),
        lambda a: _native.block_hashes(a, 8, threads=0),
        lambda a: _native.tree_hash(a, -8),
        lambda a: _native.tree_hash(a, 8, threads=1000),
        lambda a: _native.resident_bytes(0, 0, -1),
        lambda a: _native.resident_bytes(0, -1, 1),
        lambda a: _native.fadvise(0, -1, 0, _native.FADV_WILLNEED),
    ],
)
def test_bad_arguments_raise_valueerror(call: Any) -> None:
    buf = bytearray(128)
    with pytest.raises(ValueError):
        call(addr_of(buf))


def test_threads_upper_bound_is_allowed() -> None:
    data = bytearray(b"q" * 1000)
    assert _native.block_hashes(addr_of(data), 1000, threads=256) == python_block_hashes(
        bytes(data)
    )


def test_module_constants() -> None:
    assert _native.BLOCK_HASH_SIZE == 16 << 20
    assert _native.FADV_DONTNEED == os.POSIX_FADV_DONTNEED
    assert _native.FADV_WILLNEED == os.POSIX_FADV_WILLNEED
    assert _native.FADV_SEQUENTIAL == os.POSIX_FADV_SEQUENTIAL


def test_copy_many_copies_every_segment() -> None:
    import ctypes

    sizes = [0, 1, 4096, (8 << 20) + 3, 3 << 20]
    srcs = [
        ctypes.create_string_buffer(os.urandom(n), n) if n else ctypes.create_string_buffer(1)
        for n in sizes
    ]
    dsts = [ctypes.create_string_buffer(max(n, 1)) for n in sizes]
    _native.copy_many(
        [ctypes.addressof(d) for d in dsts], [ctypes.addressof(s) for s in srcs], sizes, 3
    )
    for n, s, d in zip(sizes, srcs, dsts, strict=True):
        assert d.raw[:n] == s.raw[:n]


@pytest.mark.parametrize("dst_offset", [0, 1, 8, 15])
@pytest.mark.parametrize("length", [MiB, MiB + 63, 3 * MiB + 17])
def test_large_copies_land_exactly(dst_offset: int, length: int) -> None:
    """Copies of 1 MiB and more write with non-temporal stores from a 16-byte-aligned start:
    every destination alignment and tail length lands exactly, and nothing beside it."""
    src = bytearray(random_bytes(length + 3, seed=length))
    dst = bytearray(length + 64)
    start = addr_of(dst) + 16 + dst_offset
    _native.copy_many([start], [addr_of(src) + 3], [length], 2)
    at = 16 + dst_offset
    assert dst[at : at + length] == src[3:]
    assert dst[:at] == bytes(at) and dst[at + length :] == bytes(len(dst) - at - length)
    _native.copy(start, addr_of(src) + 3, length, threads=1)
    assert dst[at : at + length] == src[3:]


def test_copy_many_refuses_bad_arguments() -> None:
    import ctypes

    buf = ctypes.create_string_buffer(8192)
    a = ctypes.addressof(buf)
    with pytest.raises(ValueError, match="overlaps"):
        _native.copy_many([a], [a + 100], [4096])
    with pytest.raises(ValueError, match="differ in length"):
        _native.copy_many([a], [a + 4096], [1, 2])
    with pytest.raises(ValueError):
        _native.copy_many([a], [a + 4096], [-1])
    with pytest.raises(TypeError):
        _native.copy_many(1, [a], [1])  # type: ignore[arg-type]
