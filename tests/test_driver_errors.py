"""What thaw.mem.driver says on hosts whose NVIDIA driver cannot serve it: a driver older than
CUDA 12.0, a driver with no GPU, a driver without a function thaw needs. These drivers cannot
be had here, so each test builds a stand-in libcuda.so.1 with the host's C compiler that
answers as such a driver does, and loads it in a fresh process (LD_LIBRARY_PATH); the GPU tests
(tests/test_driver_gpu.py) check the same messages against the real driver where it can."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

# cuInit fails with CUDA_ERROR_NO_DEVICE (100) when NO_DEVICE is defined; cuGetProcAddress_v2
# (absent when OLD is defined: drivers before R525) finds no function at all.
STAND_IN = r"""
typedef int CUresult;
CUresult cuInit(unsigned flags) {
#ifdef NO_DEVICE
    return 100;
#else
    return 0;
#endif
}
CUresult cuGetErrorName(CUresult rc, const char **s) {
    *s = rc == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN";
    return 0;
}
CUresult cuGetErrorString(CUresult rc, const char **s) {
    *s = rc == 100 ? "no CUDA-capable device is detected" : "unknown error";
    return 0;
}
#ifndef OLD
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version,
                             unsigned long long flags, int *status) {
    *pfn = 0;
    *status = 1; /* CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND */
    return 0;
}
#endif
"""

PROBE = """
from thaw.errors import CudaError
from thaw.mem import cuda, driver
print("devices", cuda.device_count())
try:
    driver.address("cuMemMap")
except CudaError as e:
    print("CudaError:", e)
"""


def probe(tmp_path: Path, *defines: str) -> str:
    source = tmp_path / "libcuda.c"
    source.write_text(STAND_IN)
    library = tmp_path / "libcuda.so.1"
    flags = [f"-D{d}" for d in defines]
    subprocess.run(["cc", "-shared", "-fPIC", *flags, str(source), "-o", str(library)], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_driver_older_than_cuda_12_is_named_with_the_version_to_install(
    tmp_path: Path,
) -> None:
    out = probe(tmp_path, "OLD")
    assert "devices 0" in out
    assert "the NVIDIA driver predates CUDA 12.0" in out and "update it to 525 or newer" in out


def test_a_driver_without_a_gpu_reports_no_device_and_cuda_s_own_words(tmp_path: Path) -> None:
    out = probe(tmp_path, "NO_DEVICE")
    assert "devices 0" in out
    assert "cuInit failed: CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected" in out


def test_a_function_the_driver_lacks_is_named_with_what_to_do(tmp_path: Path) -> None:
    out = probe(tmp_path)
    assert "has no cuMemMap for CUDA 12 (status 1): update the NVIDIA driver" in out
