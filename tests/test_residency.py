"""thaw.format.residency's estimate against the exact page count, on a real file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from thaw import _native
from thaw.format.residency import WINDOW, WINDOWS, resident_estimate

MiB = 1 << 20


@pytest.fixture
def cached_file(tmp_path: Path) -> Iterator[int]:
    """A 200 MiB file (more than the 64 windows' worth), written and so in the page cache."""
    path = tmp_path / "f.bin"
    with open(path, "wb") as f:
        for i in range(200):
            f.write(bytes([i]) * MiB)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def drop(fd: int, offset: int, length: int) -> None:
    """Evict the range; the test's reads then bring back only what they read: readahead pages
    landing after an exact count moved an estimate by 9.5 MiB in a CI run."""
    os.fsync(fd)
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    if _native.resident_bytes(fd, offset, length) > length // 10:
        pytest.skip("this filesystem keeps pages that POSIX_FADV_DONTNEED drops elsewhere")
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_RANDOM)


def test_a_wholly_cached_range_reads_exactly_its_length(cached_file: int) -> None:
    size = 200 * MiB
    assert resident_estimate(cached_file, 0, size) == size
    assert resident_estimate(cached_file, 4096 + 17, size - 8192) == size - 8192


def test_a_small_range_is_counted_page_by_page(cached_file: int) -> None:
    drop(cached_file, 0, 200 * MiB)
    os.pread(cached_file, 3 * MiB, 10 * MiB)  # bring 3 MiB back
    n = WINDOWS * WINDOW
    assert resident_estimate(cached_file, 0, n) == _native.resident_bytes(cached_file, 0, n)


def test_a_large_range_is_estimated_within_a_window_per_sample(cached_file: int) -> None:
    size = 200 * MiB
    drop(cached_file, 0, size)
    assert resident_estimate(cached_file, 0, size) == 0
    os.pread(cached_file, 80 * MiB, 0)  # the first 80 MiB cached again (40%)
    exact = _native.resident_bytes(cached_file, 0, size)
    estimate = resident_estimate(cached_file, 0, size)
    assert abs(estimate - exact) <= size // WINDOWS + WINDOW
