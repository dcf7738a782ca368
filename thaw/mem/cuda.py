"""thaw's CUDA calls, all through cuda-python's driver API (cuda.bindings.driver), imported only
where CUDA is used.

The driver API and not the runtime's: importing cuda.bindings.runtime costs a new process 54 ms
(it finds and loads libcudart through cuda.pathfinder), the driver's 14 ms (H200 host,
cuda-bindings 13.3), and both are on an engine's first restore. The runtime that torch uses
runs in the device's primary context; `set_device` makes that same context current, so what
thaw issues and what torch issues meet in one context.

Every failing call raises CudaError naming the call and CUDA's error (`check`, the one place
that turns a cuda.bindings result into a value or an exception).
"""

from __future__ import annotations

import threading
from typing import Any

from cuda.bindings import driver as cu

from thaw import _native
from thaw.errors import CudaError

_SUCCESS = cu.CUresult.CUDA_SUCCESS


def check(result: tuple[Any, ...], call: str) -> Any:
    """Unwrap a cuda.bindings result tuple, raising CudaError on failure: None, the one value,
    or the tuple of values after the error code."""
    err = result[0]
    if err != _SUCCESS:
        _, name = cu.cuGetErrorName(err)
        _, text = cu.cuGetErrorString(err)
        what = name.decode() if name else str(err)
        raise CudaError(f"{call} failed: {what}: {text.decode() if text else ''}".rstrip(": "))
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


_init_lock = threading.Lock()
_initialized = False
_contexts: dict[int, Any] = {}  # device -> its primary context, retained once per process


def _init() -> None:
    """cuInit, once: the driver API needs it (the runtime calls it implicitly)."""
    global _initialized
    if not _initialized:
        with _init_lock:
            if not _initialized:
                check(cu.cuInit(0), "cuInit")
                _initialized = True


def device_count() -> int:
    """CUDA devices visible to this process; 0 where there is no driver or no GPU."""
    try:
        _init()
        return int(check(cu.cuDeviceGetCount(), "cuDeviceGetCount"))
    except Exception:  # no libcuda at all (cuda.pathfinder's error), or no device
        return 0


def set_device(index: int) -> None:
    """Make `index`'s primary context (the runtime's, torch's) current in this thread, as
    cudaSetDevice does."""
    context = _contexts.get(index)
    if context is None:
        _init()
        with _init_lock:
            context = _contexts.get(index)
            if context is None:
                device = check(cu.cuDeviceGet(index), f"cuDeviceGet({index})")
                context = check(cu.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
                _contexts[index] = context
    check(cu.cuCtxSetCurrent(context), f"cuCtxSetCurrent(device {index})")


def device_synchronize() -> None:
    """Wait for all work of the current device (its primary context)."""
    check(cu.cuCtxSynchronize(), "cuCtxSynchronize")


class PinnedBuffer:
    """Page-locked host memory from cuMemHostAlloc (portable: usable from every device)."""

    def __init__(self, size: int) -> None:
        self.size = size
        flags = cu.CU_MEMHOSTALLOC_PORTABLE
        self.addr = int(check(cu.cuMemHostAlloc(size, flags), f"cuMemHostAlloc({size})"))

    def close(self) -> None:
        if self.addr:
            check(cu.cuMemFreeHost(self.addr), "cuMemFreeHost")
            self.addr = 0


class Stream:
    """A non-blocking stream; thaw's streams live as long as the process (Staging caches them)."""

    def __init__(self) -> None:
        flags = cu.CUstream_flags.CU_STREAM_NON_BLOCKING
        self.handle = check(cu.cuStreamCreate(flags), "cuStreamCreate")

    def synchronize(self) -> None:
        check(cu.cuStreamSynchronize(self.handle), "cuStreamSynchronize")


class Event:
    def __init__(self) -> None:
        flags = cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
        self.handle = check(cu.cuEventCreate(flags), "cuEventCreate")

    def record(self, stream: Stream) -> None:
        check(cu.cuEventRecord(self.handle, stream.handle), "cuEventRecord")

    def synchronize(self) -> None:
        check(cu.cuEventSynchronize(self.handle), "cuEventSynchronize")


# The driver functions thaw._native.read_to_device calls from its threads, in its order.
_NATIVE_CALLS = (
    "cuGetErrorName", "cuCtxGetCurrent", "cuCtxSetCurrent", "cuStreamCreate", "cuStreamDestroy",
    "cuStreamSynchronize", "cuEventCreate", "cuEventDestroy", "cuEventRecord",
    "cuEventSynchronize", "cuMemcpyHtoDAsync",
)  # fmt: skip
_entry_points: tuple[int, ...] = ()


def driver_entry_points() -> tuple[int, ...]:
    """Addresses of the driver functions native code calls, resolved once through
    cuGetProcAddress: the libcuda that cuda-python loaded, at CUDA 12's ABI (cuStreamDestroy_v2,
    cuMemcpyHtoDAsync_v2, ...)."""
    global _entry_points
    if not _entry_points:
        _init()
        found = cu.CUdriverProcAddressQueryResult.CU_GET_PROC_ADDRESS_SUCCESS
        points = []
        for name in _NATIVE_CALLS:
            flags = cu.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT
            pfn, status = check(cu.cuGetProcAddress(name.encode(), 12000, flags),
                                f"cuGetProcAddress({name})")  # fmt: skip
            if status != found or not pfn:
                raise CudaError(f"the CUDA driver has no {name} ({status}): update the driver")
            points.append(int(pfn))
        _entry_points = tuple(points)
    return _entry_points


def read_to_device(
    fd: int,
    dsts: list[int],
    offsets: list[int],
    lengths: list[int],
    bounce: list[int],
    threads: int,
    align: int,
    verify: bool,
) -> list[bytes] | None:
    """thaw._native.read_to_device in the current device's context (see native/readdevice.c),
    its failed CUDA calls raised as CudaError."""
    try:
        return _native.read_to_device(fd, dsts, offsets, lengths, bounce, driver_entry_points(),
                                      threads, align, verify)  # fmt: skip
    except RuntimeError as e:
        raise CudaError(str(e)) from e


def copy_h2d(dst: int, src: int, length: int, stream: Stream) -> None:
    check(cu.cuMemcpyHtoDAsync(dst, src, length, stream.handle), "cuMemcpyHtoDAsync")


def copy_d2h(dst: int, src: int, length: int, stream: Stream) -> None:
    check(cu.cuMemcpyDtoHAsync(dst, src, length, stream.handle), "cuMemcpyDtoHAsync")


_registrations: dict[int, int] = {}
_registrations_lock = threading.Lock()


def register_host(addr: int, length: int, read_only: bool = False) -> None:
    """Page-lock an existing mapping once per process; later calls for it are free.

    This is what a CUDA client does once with a memfd pool mapping: ~16 GB/s of registration,
    paid on the first restore from that mapping and cached for every later one.
    """
    with _registrations_lock:
        if _registrations.get(addr, 0) >= length:
            return
        if addr in _registrations:
            check(cu.cuMemHostUnregister(addr), "cuMemHostUnregister")
            del _registrations[addr]
        flags = cu.CU_MEMHOSTREGISTER_PORTABLE
        if read_only:
            flags |= cu.CU_MEMHOSTREGISTER_READ_ONLY
        check(cu.cuMemHostRegister(addr, length, flags), f"cuMemHostRegister({length})")
        _registrations[addr] = length


def unregister_host(addr: int) -> None:
    """Drop a registration made by register_host (before the mapping is unmapped)."""
    with _registrations_lock:
        if _registrations.pop(addr, None) is not None:
            check(cu.cuMemHostUnregister(addr), "cuMemHostUnregister")
