"""thaw.mem.driver on a real NVIDIA driver: what the ctypes binding returns and how the driver's
refusals reach Python (tests/test_driver_abi.py checks the prototypes against cuda.h)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from thaw.errors import CudaError
from thaw.mem import cuda, driver

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cuda.device_count() == 0, reason="needs a CUDA GPU"),
]


def test_device_facts_match_what_torch_reports() -> None:
    props = torch.cuda.get_device_properties(0)
    assert cuda.device_name(0) == torch.cuda.get_device_name(0)
    assert cuda.device_memory(0) == props.total_memory
    assert cuda.device_uuid(0).removeprefix("GPU-") == str(props.uuid).removeprefix("GPU-")


def test_a_refused_call_raises_cuda_error_with_the_driver_s_name_and_text() -> None:
    count = cuda.device_count()
    refused = rf"cuDeviceGet\({count}\) failed: CUDA_ERROR_INVALID_DEVICE: .+"
    with pytest.raises(CudaError, match=refused):
        cuda.set_device(count)


def test_a_function_the_driver_lacks_is_named_with_what_to_do() -> None:
    with pytest.raises(CudaError, match=r"has no cuThawNoSuchFunction .*update the NVIDIA driver"):
        driver.address("cuThawNoSuchFunction")


def test_the_device_address_range_and_ipc_handle_of_a_torch_tensor() -> None:
    """What a daemon copy exports: the allocation behind a tensor, and its IPC handle, which
    another process opens to the same bytes."""
    cuda.set_device(0)
    tensor = torch.arange(1 << 20, dtype=torch.int32, device="cuda")
    base, size = cuda.address_range(tensor.data_ptr())
    assert base <= tensor.data_ptr() < base + size
    handle = cuda.ipc_handle(base)
    assert len(handle) == driver.IPC_HANDLE_SIZE
    torch.cuda.synchronize()
    opener = (
        "import sys, torch\n"
        "from thaw.mem import cuda\n"
        "torch.cuda.init(); cuda.set_device(0)\n"
        "ptr = cuda.ipc_open(bytes.fromhex(sys.argv[1])) + int(sys.argv[2])\n"
        "s = cuda.Stream()\n"
        "host = torch.empty(4, dtype=torch.int32).pin_memory()\n"
        "cuda.copy_d2h(host.data_ptr(), ptr + 4 * 1000, 16, s)\n"
        "s.synchronize()\n"
        "cuda.ipc_close(ptr - int(sys.argv[2]))\n"
        "print(host.tolist())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", opener, handle.hex(), str(tensor.data_ptr() - base)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1000, 1001, 1002, 1003]"
