"""thaw._native.read_to_device's loop (native/readdevice.c) on machines without a GPU.

The CUDA driver is the one thing stood in for: its eleven entry points are ctypes functions
whose "device memory" is host memory. Copies are lazy, as a GPU's are: a copy runs only when
its stream or an event recorded after it is synchronized, so a loop that refilled a bounce
buffer before waiting for that buffer's copy would restore the wrong bytes here too. On a GPU
the same loop runs against the real driver (tests/test_gpu.py, benchmarks/restore.py).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from pathlib import Path
from typing import Any

import pytest

from thaw import _native

MiB = 1 << 20
BLOCK = _native.BLOCK_HASH_SIZE
BOUNCE = _native.BOUNCE_SIZE
ILLEGAL_ADDRESS = 700

c_int, c_uint, c_void_p, c_size_t = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_size_t
P_VOID = ctypes.POINTER(c_void_p)


def addr_of(buf: Any, at: int = 0) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) + at


class Driver:
    """The driver calls read_to_device makes, in thaw.mem.cuda's order, with lazy copies."""

    def __init__(self, fail_copy_at: int = -1, context: int = 1) -> None:
        self.fail_copy_at = fail_copy_at
        self.context = context
        self.copies = 0
        self.queued: dict[int, list[tuple[int, int, int]]] = {}  # stream -> its copies
        self.ran: dict[int, int] = {}  # stream -> copies run so far
        self.events: dict[int, tuple[int, int]] = {}  # event -> (stream, copies before it)
        self.streams_made: list[int] = []
        self.streams_destroyed: list[int] = []
        self.events_destroyed: list[int] = []
        self.synced_at_end: set[int] = set()  # streams synchronized with nothing left to run
        self.next_handle = 0x1000
        self._error_name = ctypes.c_char_p(b"CUDA_ERROR_ILLEGAL_ADDRESS")
        fns = [
            ctypes.CFUNCTYPE(c_int, c_int, ctypes.POINTER(ctypes.c_char_p))(self.get_error_name),
            ctypes.CFUNCTYPE(c_int, P_VOID)(self.ctx_get_current),
            ctypes.CFUNCTYPE(c_int, c_void_p)(lambda ctx: 0 if ctx == self.context else 201),
            ctypes.CFUNCTYPE(c_int, P_VOID, c_uint)(self.stream_create),
            ctypes.CFUNCTYPE(c_int, c_void_p)(self.stream_destroy),
            ctypes.CFUNCTYPE(c_int, c_void_p)(self.stream_synchronize),
            ctypes.CFUNCTYPE(c_int, P_VOID, c_uint)(self.event_create),
            ctypes.CFUNCTYPE(c_int, c_void_p)(self.event_destroy),
            ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p)(self.event_record),
            ctypes.CFUNCTYPE(c_int, c_void_p)(self.event_synchronize),
            ctypes.CFUNCTYPE(c_int, ctypes.c_ulonglong, c_void_p, c_size_t, c_void_p)(self.copy),
        ]
        self._keep = fns  # the callbacks live as long as the driver
        self.entry_points = [ctypes.cast(f, c_void_p).value or 0 for f in fns]

    def handle(self) -> int:
        self.next_handle += 16
        return self.next_handle

    def get_error_name(self, code: int, out: Any) -> int:
        out[0] = self._error_name.value
        return 0 if code == ILLEGAL_ADDRESS else 1

    def ctx_get_current(self, out: Any) -> int:
        out[0] = self.context or None
        return 0

    def stream_create(self, out: Any, flags: int) -> int:
        stream = self.handle()
        self.queued[stream], self.ran[stream] = [], 0
        self.streams_made.append(stream)
        out[0] = stream
        return 0

    def stream_destroy(self, stream: int) -> int:
        self.streams_destroyed.append(stream)
        return 0

    def run(self, stream: int, upto: int) -> None:
        for dst, src, n in self.queued[stream][self.ran[stream] : upto]:
            ctypes.memmove(dst, src, n)
        self.ran[stream] = max(self.ran[stream], upto)

    def stream_synchronize(self, stream: int) -> int:
        self.run(stream, len(self.queued[stream]))
        self.synced_at_end.add(stream)
        return 0

    def event_create(self, out: Any, flags: int) -> int:
        out[0] = event = self.handle()
        self.events[event] = (0, 0)
        return 0

    def event_destroy(self, event: int) -> int:
        self.events_destroyed.append(event)
        return 0

    def event_record(self, event: int, stream: int) -> int:
        self.events[event] = (stream, len(self.queued[stream]))
        return 0

    def event_synchronize(self, event: int) -> int:
        stream, upto = self.events[event]
        if stream:
            self.run(stream, upto)
        return 0

    def copy(self, dst: int, src: int, n: int, stream: int) -> int:
        self.copies += 1
        if self.copies == self.fail_copy_at:
            return ILLEGAL_ADDRESS
        self.queued[stream].append((dst, src, n))
        self.synced_at_end.discard(stream)
        return 0

    def assert_cleaned_up(self) -> None:
        """Every stream ran all its copies and was freed, with its events."""
        assert self.streams_made and sorted(self.streams_made) == sorted(self.streams_destroyed)
        assert self.synced_at_end == set(self.streams_made)
        assert len(self.events_destroyed) == 2 * len(self.streams_made)


@pytest.fixture
def bounce() -> Any:
    buffers = mmap.mmap(-1, 16 * BOUNCE)  # page aligned: eight threads' worth
    yield [addr_of(buffers, i * BOUNCE) for i in range(16)]
    buffers.close()


def snapshot_file(path: Path, lengths: list[int], align: int = 4096) -> tuple[bytes, list[int]]:
    """A file of random bytes holding one range per length, each at an `align`ed offset."""
    offsets, at = [], 8192
    for n in lengths:
        offsets.append(at)
        at += (n + align - 1) // align * align + align
    content = random.Random(len(lengths)).randbytes(at)
    path.write_bytes(content)
    return content, offsets


LENGTHS = [0, 1, 4095, BLOCK + 3 * BOUNCE + 5, 5 * MiB, 2 * BLOCK]


@pytest.mark.parametrize("threads", [1, 3, 8, 32])
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("align", [0, 4096])
def test_reads_every_range_to_its_device_address(
    tmp_path: Path, bounce: Any, threads: int, verify: bool, align: int
) -> None:
    path = tmp_path / "s.bin"
    content, offsets = snapshot_file(path, LENGTHS)
    device = [bytearray(n + 1) for n in LENGTHS]  # +1: dsts need no alignment, even so
    dsts = [addr_of(d, 1) if len(d) > 1 else addr_of(bytearray(1)) for d in device]
    driver = Driver()
    fd = os.open(path, os.O_RDONLY)
    try:
        hashes = _native.read_to_device(fd, dsts, offsets, LENGTHS, bounce, driver.entry_points,
                                        threads, align, verify)  # fmt: skip
    finally:
        os.close(fd)
    for n, off, d in zip(LENGTHS, offsets, device, strict=True):
        assert bytes(d[1:]) == content[off : off + n], n
    if verify:
        assert hashes is not None
        for n, off, digest in zip(LENGTHS, offsets, hashes, strict=True):
            expected = bytearray(content[off : off + n]) or bytearray(1)
            assert digest == _native.block_hashes(addr_of(expected), n)
    else:
        assert hashes is None
    driver.assert_cleaned_up()
    blocks = sum(-(-n // BLOCK) for n in LENGTHS)  # one task each
    assert len(driver.streams_made) == min(threads, len(bounce) // 2, blocks)


def test_a_file_that_ends_early_names_the_missing_bytes(tmp_path: Path, bounce: Any) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(random.Random(1).randbytes(3 * MiB))
    device = bytearray(2 * BLOCK)
    driver = Driver()
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(EOFError, match=r"end of file, \d+ bytes missing"):
            _native.read_to_device(fd, [addr_of(device)], [0], [len(device)], bounce,
                                   driver.entry_points, 4)  # fmt: skip
    finally:
        os.close(fd)
    driver.assert_cleaned_up()


def test_a_failed_copy_names_the_call_and_waits_for_the_others(
    tmp_path: Path, bounce: Any
) -> None:
    path = tmp_path / "s.bin"
    _, offsets = snapshot_file(path, [3 * BLOCK])
    device = bytearray(3 * BLOCK)
    driver = Driver(fail_copy_at=5)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(RuntimeError, match=r"cuMemcpyHtoDAsync failed: "
                           r"CUDA_ERROR_ILLEGAL_ADDRESS \(700\)"):  # fmt: skip
            _native.read_to_device(fd, [addr_of(device)], offsets, [len(device)], bounce,
                                   driver.entry_points, 3)  # fmt: skip
    finally:
        os.close(fd)
    driver.assert_cleaned_up()


def test_no_current_context_is_an_error_before_any_copy(tmp_path: Path, bounce: Any) -> None:
    path = tmp_path / "s.bin"
    _, offsets = snapshot_file(path, [MiB])
    driver = Driver(context=0)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(RuntimeError, match="no CUDA context is current"):
            _native.read_to_device(fd, [addr_of(bytearray(MiB))], offsets, [MiB], bounce,
                                   driver.entry_points)  # fmt: skip
    finally:
        os.close(fd)
    assert driver.copies == 0 and not driver.streams_made


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"driver": [1] * 10}, "driver must hold 11 entry points, got 10"),
        ({"driver": [1] * 10 + [0]}, "driver entry point 10 is NULL"),
        ({"bounce": "one"}, "bounce must hold at least 2 buffers, got 1"),
        ({"bounce": "unaligned"}, "bounce buffer 1 is not page aligned"),
        ({"offsets": [100]}, "range 0: offset must be 4096-aligned"),
        ({"lengths": [1, 2]}, "dsts, offsets, lengths differ in length"),
        ({"threads": 0}, r"threads must be in \[1, 256\]"),
    ],
)
def test_bad_arguments_are_value_errors(
    bounce: Any, change: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {
        "fd": 0, "dsts": [4096], "offsets": [0], "lengths": [1], "bounce": bounce,
        "driver": [1] * 11, "threads": 1, "align": 4096,
    }  # fmt: skip
    args.update(change)
    if args["bounce"] == "one":
        args["bounce"] = bounce[:1]
    elif args["bounce"] == "unaligned":
        args["bounce"] = [bounce[0], bounce[1] + 8]
    with pytest.raises(ValueError, match=message):
        _native.read_to_device(**args)
