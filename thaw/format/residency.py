"""How much of a file range is in the page cache, for the choices that need only the share.

Counting every page (`_native.resident_bytes`: mmap + mincore) costs about 10 ms per GB: 169
ms for a 16 GB snapshot on the H200 host, a third of that snapshot's whole restore from the
page cache, and on thawd's event loop a pause of every client for each warm snapshot a listing
names. A restore's O_DIRECT choice, a pin's and a tier's display need the share, so a large
range is estimated from windows spread evenly over it.
"""

from __future__ import annotations

from thaw import _native

WINDOWS = 64
WINDOW = 1 << 20  # 64 x 1 MiB: about 0.7 ms of mincore, whatever the range's size


def resident_estimate(fd: int, offset: int, length: int) -> int:
    """Bytes of [offset, offset + length) of `fd` in the page cache: counted exactly up to 64
    MiB, above that scaled from 64 windows of 1 MiB at even strides (a range wholly cached or
    wholly cold still reads as exactly that)."""
    if length <= WINDOWS * WINDOW:
        return int(_native.resident_bytes(fd, offset, length))
    stride = length // WINDOWS
    found = sum(_native.resident_bytes(fd, offset + i * stride, WINDOW) for i in range(WINDOWS))
    return found * length // (WINDOWS * WINDOW)
