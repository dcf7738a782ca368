"""The CUDA driver API through ctypes: the system's libcuda.so.1 (the library torch has loaded in
every CUDA process), each function at CUDA 12.0's ABI, resolved with cuGetProcAddress.

Why not cuda-python: importing cuda.bindings.driver cost a new engine process 17-23 ms of its
`thaw.connect()` on the H200 hosts (two thirds in cuda.pathfinder, which looks for libraries
thaw never loads); ctypes is imported by torch already, and binding a function takes
microseconds. Asking cuGetProcAddress for version 12000 gives every function the signature
that CUDA 12.0's cuda.h declares under its plain name (cuMemcpyHtoDAsync is
cuMemcpyHtoDAsync_v2, ...), whatever newer versions the installed driver also has: the
prototypes below are those signatures, and tests/test_driver_abi.py checks them, the
structures and the constants against the CUDA toolkit's cuda.h.

`call` is the one place a failed CUresult becomes a CudaError naming the call and CUDA's error.
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_uint, c_uint64, c_void_p
from typing import Any

from thaw.errors import CudaError

ABI_VERSION = 12000  # the CUDA version whose signatures the prototypes below describe

# Constants and enum values from cuda.h (checked against it by tests/test_driver_abi.py).
STREAM_NON_BLOCKING = 0x1
EVENT_DISABLE_TIMING = 0x2
MEMHOSTALLOC_PORTABLE = 0x1
MEMHOSTREGISTER_PORTABLE = 0x1
MEMHOSTREGISTER_READ_ONLY = 0x8
IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1
IPC_HANDLE_SIZE = 64
MEM_ALLOCATION_TYPE_PINNED = 0x1
MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 0x1
MEM_LOCATION_TYPE_DEVICE = 0x1
MEM_LOCATION_TYPE_HOST_NUMA = 0x3
MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3
MEM_ALLOC_GRANULARITY_MINIMUM = 0x0
DEVICE_ATTRIBUTE_PCI_BUS_ID = 33
DEVICE_ATTRIBUTE_PCI_DEVICE_ID = 34
DEVICE_ATTRIBUTE_PCI_DOMAIN_ID = 50
DEVICE_ATTRIBUTE_HOST_NUMA_ID = 134


class Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_char * 16)]


class IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


class MemLocation(ctypes.Structure):
    _fields_ = [("type", c_int), ("id", c_int)]


class MemAllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class MemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", c_int),
        ("requestedHandleTypes", c_int),
        ("location", MemLocation),
        ("win32HandleMetaData", c_void_p),
        ("allocFlags", MemAllocFlags),
    ]


class MemAccessDesc(ctypes.Structure):
    _fields_ = [("location", MemLocation), ("flags", c_int)]


_P = POINTER
# CUdevice is an int, CUdeviceptr and CUmemGenericAllocationHandle 64-bit, every other handle
# (context, stream, event) a pointer; each function returns a CUresult (int).
PROTOTYPES: dict[str, tuple[Any, ...]] = {
    "cuDeviceGetCount": (_P(c_int),),
    "cuDeviceGet": (_P(c_int), c_int),
    "cuDeviceGetName": (c_char_p, c_int, c_int),
    "cuDeviceGetUuid": (_P(Uuid), c_int),
    "cuDeviceTotalMem": (_P(c_size_t), c_int),
    "cuDeviceGetAttribute": (_P(c_int), c_int, c_int),
    "cuDevicePrimaryCtxRetain": (_P(c_void_p), c_int),
    "cuCtxSetCurrent": (c_void_p,),
    "cuCtxSynchronize": (),
    "cuStreamCreate": (_P(c_void_p), c_uint),
    "cuStreamSynchronize": (c_void_p,),
    "cuEventCreate": (_P(c_void_p), c_uint),
    "cuEventRecord": (c_void_p, c_void_p),
    "cuEventSynchronize": (c_void_p,),
    "cuMemcpyHtoDAsync": (c_uint64, c_void_p, c_size_t, c_void_p),
    "cuMemcpyDtoHAsync": (c_void_p, c_uint64, c_size_t, c_void_p),
    "cuMemHostAlloc": (_P(c_void_p), c_size_t, c_uint),
    "cuMemFreeHost": (c_void_p,),
    "cuMemHostRegister": (c_void_p, c_size_t, c_uint),
    "cuMemHostUnregister": (c_void_p,),
    "cuMemGetAddressRange": (_P(c_uint64), _P(c_size_t), c_uint64),
    "cuIpcGetMemHandle": (_P(IpcMemHandle), c_uint64),
    "cuIpcOpenMemHandle": (_P(c_uint64), IpcMemHandle, c_uint),
    "cuIpcCloseMemHandle": (c_uint64,),
    "cuMemAddressReserve": (_P(c_uint64), c_size_t, c_size_t, c_uint64, c_uint64),
    "cuMemAddressFree": (c_uint64, c_size_t),
    "cuMemCreate": (_P(c_uint64), c_size_t, _P(MemAllocationProp), c_uint64),
    "cuMemRelease": (c_uint64,),
    "cuMemMap": (c_uint64, c_size_t, c_size_t, c_uint64, c_uint64),
    "cuMemUnmap": (c_uint64, c_size_t),
    "cuMemSetAccess": (c_uint64, c_size_t, _P(MemAccessDesc), c_size_t),
    "cuMemExportToShareableHandle": (c_void_p, c_uint64, c_int, c_uint64),
    "cuMemImportFromShareableHandle": (_P(c_uint64), c_void_p, c_int),
    "cuMemGetAllocationGranularity": (_P(c_size_t), _P(MemAllocationProp), c_int),
}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_initialized = False
_addresses: dict[str, int] = {}
_functions: dict[str, Any] = {}


def _load() -> ctypes.CDLL:
    """libcuda.so.1, loaded once; CudaError where this host has no NVIDIA driver."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                try:
                    lib = ctypes.CDLL("libcuda.so.1")
                except OSError as e:
                    raise CudaError(f"no CUDA driver on this host (libcuda.so.1): {e}") from e
                # The four functions called by name; the rest by address.
                try:
                    lib.cuInit.argtypes = (c_uint,)
                    for name in ("cuGetErrorName", "cuGetErrorString"):
                        getattr(lib, name).argtypes = (c_int, _P(c_char_p))
                    get = lib.cuGetProcAddress_v2
                except AttributeError as e:
                    raise CudaError(
                        f"the NVIDIA driver predates CUDA 12.0 ({e}): update it to 525 or newer"
                    ) from e
                get.argtypes = (c_char_p, _P(c_void_p), c_int, c_uint64, _P(c_int))
                _library = lib
    return _library


def _error(rc: int, what: str) -> CudaError:
    name, text = c_char_p(), c_char_p()
    lib = _load()
    lib.cuGetErrorName(rc, ctypes.byref(name))
    lib.cuGetErrorString(rc, ctypes.byref(text))
    label = name.value.decode() if name.value else f"CUresult {rc}"
    detail = text.value.decode() if text.value else ""
    return CudaError(f"{what} failed: {label}: {detail}".rstrip(": "))


def init() -> None:
    """cuInit, once per process (the runtime that torch uses calls it implicitly)."""
    global _initialized
    if not _initialized:
        lib = _load()
        with _lock:
            if not _initialized:
                rc = lib.cuInit(0)
                if rc:
                    raise _error(rc, "cuInit")
                _initialized = True


def address(name: str) -> int:
    """The address of driver function `name` at ABI_VERSION (for native code to call)."""
    found = _addresses.get(name)
    if found is None:
        init()
        pfn, status = c_void_p(), c_int()
        rc = _load().cuGetProcAddress_v2(
            name.encode(), ctypes.byref(pfn), ABI_VERSION, 0, ctypes.byref(status)
        )
        if rc:
            raise _error(rc, f"cuGetProcAddress({name})")
        if status.value or not pfn.value:
            raise CudaError(
                f"the CUDA driver has no {name} for CUDA {ABI_VERSION // 1000} "
                f"(status {status.value}): update the NVIDIA driver to 525 or newer"
            )
        found = _addresses[name] = int(pfn.value)
    return found


def _function(name: str) -> Any:
    fn = _functions.get(name)
    if fn is None:
        prototype = ctypes.CFUNCTYPE(c_int, *PROTOTYPES[name])  # calls release the GIL
        fn = _functions[name] = prototype(address(name))
    return fn


def call(name: str, *args: Any, what: str | None = None) -> None:
    """Call driver function `name`; CudaError naming it (or `what`) when it fails. Values come
    back through the ctypes out-arguments the caller passes."""
    rc = _function(name)(*args)
    if rc:
        raise _error(rc, what or name)


def try_call(name: str, *args: Any) -> bool:
    """Call `name` where a failure leaves nothing to do (unmapping and freeing on a close):
    whether it succeeded."""
    return _function(name)(*args) == 0
