"""thaw's CUDA calls, all through the driver API (thaw.mem.driver, ctypes over libcuda),
imported only where CUDA is used.

The driver API and not the runtime's: the runtime that torch uses runs in the device's primary
context; `set_device` makes that same context current, so what thaw issues and what torch
issues meet in one context, with no runtime library of thaw's own to find and load.

Every failing call raises CudaError naming the call and CUDA's error (driver.call).
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import byref, c_int, c_size_t, c_uint64, c_void_p

from thaw import _native
from thaw.errors import CudaError
from thaw.mem import driver
from thaw.mem.driver import call

_contexts: dict[int, int] = {}  # device -> its primary context, retained once per process
_contexts_lock = threading.Lock()


def device_count() -> int:
    """CUDA devices visible to this process; 0 where there is no driver or no GPU."""
    try:
        driver.init()
        count = c_int()
        call("cuDeviceGetCount", byref(count))
        return count.value
    except CudaError:  # no libcuda at all, or no device
        return 0


def device(index: int) -> int:
    """The CUdevice of ordinal `index`."""
    dev = c_int()
    call("cuDeviceGet", byref(dev), index, what=f"cuDeviceGet({index})")
    return dev.value


def set_device(index: int) -> None:
    """Make `index`'s primary context (the runtime's, torch's) current in this thread, as
    cudaSetDevice does."""
    context = _contexts.get(index)
    if context is None:
        driver.init()
        with _contexts_lock:
            context = _contexts.get(index)
            if context is None:
                ctx = c_void_p()
                call("cuDevicePrimaryCtxRetain", byref(ctx), device(index))
                context = _contexts[index] = int(ctx.value or 0)
    call("cuCtxSetCurrent", context, what=f"cuCtxSetCurrent(device {index})")


def device_synchronize() -> None:
    """Wait for all work of the current device (its primary context)."""
    call("cuCtxSynchronize")


def device_attribute(index: int, attribute: int) -> int:
    value = c_int()
    call("cuDeviceGetAttribute", byref(value), attribute, device(index))
    return value.value


def device_name(index: int) -> str:
    name = ctypes.create_string_buffer(256)
    call("cuDeviceGetName", name, len(name), device(index))
    return name.value.decode()


def device_memory(index: int) -> int:
    """The GPU's total memory in bytes."""
    total = c_size_t()
    call("cuDeviceTotalMem", byref(total), device(index))
    return total.value


def device_uuid(index: int) -> str:
    """The GPU's UUID as nvidia-smi prints it ("GPU-xxxxxxxx-..."): the same in every process,
    whatever CUDA_VISIBLE_DEVICES renumbers."""
    uuid = driver.Uuid()
    call("cuDeviceGetUuid", byref(uuid), device(index), what=f"cuDeviceGetUuid({index})")
    h = bytes(uuid).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def address_range(ptr: int) -> tuple[int, int]:
    """(base, size) of the device allocation holding `ptr`."""
    base, size = c_uint64(), c_size_t()
    call("cuMemGetAddressRange", byref(base), byref(size), ptr,
         what=f"cuMemGetAddressRange({ptr:#x})")  # fmt: skip
    return base.value, size.value


def ipc_handle(base: int) -> bytes:
    """The CUDA IPC handle of the device allocation at `base` (driver.IPC_HANDLE_SIZE bytes)."""
    handle = driver.IpcMemHandle()
    call("cuIpcGetMemHandle", byref(handle), base)
    return bytes(handle)


def ipc_open(handle: bytes) -> int:
    """Open another process's allocation from its IPC handle, in the current context."""
    h = driver.IpcMemHandle.from_buffer_copy(handle)
    ptr = c_uint64()
    call("cuIpcOpenMemHandle", byref(ptr), h, driver.IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
    return ptr.value


def ipc_close(ptr: int) -> None:
    call("cuIpcCloseMemHandle", ptr)


class PinnedBuffer:
    """Page-locked host memory from cuMemHostAlloc (portable: usable from every device)."""

    def __init__(self, size: int) -> None:
        self.size = size
        addr = c_void_p()
        call("cuMemHostAlloc", byref(addr), size, driver.MEMHOSTALLOC_PORTABLE,
             what=f"cuMemHostAlloc({size})")  # fmt: skip
        self.addr = int(addr.value or 0)

    def close(self) -> None:
        if self.addr:
            call("cuMemFreeHost", self.addr)
            self.addr = 0


class Stream:
    """A non-blocking stream; thaw's streams live as long as the process (Staging caches them)."""

    def __init__(self) -> None:
        handle = c_void_p()
        call("cuStreamCreate", byref(handle), driver.STREAM_NON_BLOCKING)
        self.handle = int(handle.value or 0)

    def synchronize(self) -> None:
        call("cuStreamSynchronize", self.handle)


class Event:
    def __init__(self) -> None:
        handle = c_void_p()
        call("cuEventCreate", byref(handle), driver.EVENT_DISABLE_TIMING)
        self.handle = int(handle.value or 0)

    def record(self, stream: Stream) -> None:
        call("cuEventRecord", self.handle, stream.handle)

    def synchronize(self) -> None:
        call("cuEventSynchronize", self.handle)


# The driver functions thaw._native.read_to_device calls from its threads, in its order.
_NATIVE_CALLS = (
    "cuGetErrorName", "cuCtxGetCurrent", "cuCtxSetCurrent", "cuStreamCreate", "cuStreamDestroy",
    "cuStreamSynchronize", "cuEventCreate", "cuEventDestroy", "cuEventRecord",
    "cuEventSynchronize", "cuMemcpyHtoDAsync",
)  # fmt: skip


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
    its failed CUDA calls raised as CudaError. Its driver functions are those thaw.mem.driver
    resolved, at the ABI native/readdevice.c declares."""
    points = [driver.address(name) for name in _NATIVE_CALLS]
    try:
        return _native.read_to_device(fd, dsts, offsets, lengths, bounce, points, threads,
                                      align, verify)  # fmt: skip
    except RuntimeError as e:
        raise CudaError(str(e)) from e


def copy_h2d(dst: int, src: int, length: int, stream: Stream) -> None:
    call("cuMemcpyHtoDAsync", dst, src, length, stream.handle)


def copy_d2h(dst: int, src: int, length: int, stream: Stream) -> None:
    call("cuMemcpyDtoHAsync", dst, src, length, stream.handle)


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
            call("cuMemHostUnregister", addr)
            del _registrations[addr]
        flags = driver.MEMHOSTREGISTER_PORTABLE
        if read_only:
            flags |= driver.MEMHOSTREGISTER_READ_ONLY
        call("cuMemHostRegister", addr, length, flags, what=f"cuMemHostRegister({length})")
        _registrations[addr] = length


def unregister_host(addr: int) -> None:
    """Drop a registration made by register_host (before the mapping is unmapped)."""
    with _registrations_lock:
        if _registrations.pop(addr, None) is not None:
            call("cuMemHostUnregister", addr)
