"""thaw.mem.driver's ctypes prototypes, structures and constants against the CUDA toolkit's
cuda.h, compiled with the host's C compiler: a wrong one would pass wrong bytes to the driver
without any error. Runs where a toolkit is installed (the dev and CI machines have one); the
GPU machine's tests then call every function on a real driver.

cuda.h declares each function under its plain name at its newest version; driver.py asks for
CUDA 12.0's. For thaw's functions these are the same signatures (the _v2 versions that
CUDA 12.0 already used), so the newest header is the reference."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from thaw.errors import CudaError
from thaw.mem import cuda, driver


def cuda_header() -> Path | None:
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    for root in roots:
        if root and (Path(root) / "include" / "cuda.h").is_file():
            return Path(root) / "include" / "cuda.h"
    return None


HEADER = cuda_header()
needs_header = pytest.mark.skipif(
    HEADER is None or shutil.which("cc") is None, reason="needs the CUDA toolkit's cuda.h and cc"
)

STRUCTS = {
    "CUuuid": (driver.Uuid, ["bytes"]),
    "CUipcMemHandle": (driver.IpcMemHandle, ["reserved"]),
    "CUmemLocation": (driver.MemLocation, ["type", "id"]),
    "CUmemAllocationProp": (
        driver.MemAllocationProp,
        ["type", "requestedHandleTypes", "location", "win32HandleMetaData", "allocFlags"],
    ),
    "CUmemAccessDesc": (driver.MemAccessDesc, ["location", "flags"]),
}

CONSTANTS = {
    "STREAM_NON_BLOCKING": "CU_STREAM_NON_BLOCKING",
    "EVENT_DISABLE_TIMING": "CU_EVENT_DISABLE_TIMING",
    "MEMHOSTALLOC_PORTABLE": "CU_MEMHOSTALLOC_PORTABLE",
    "MEMHOSTREGISTER_PORTABLE": "CU_MEMHOSTREGISTER_PORTABLE",
    "MEMHOSTREGISTER_READ_ONLY": "CU_MEMHOSTREGISTER_READ_ONLY",
    "IPC_MEM_LAZY_ENABLE_PEER_ACCESS": "CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS",
    "IPC_HANDLE_SIZE": "CU_IPC_HANDLE_SIZE",
    "MEM_ALLOCATION_TYPE_PINNED": "CU_MEM_ALLOCATION_TYPE_PINNED",
    "MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR": "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR",
    "MEM_LOCATION_TYPE_DEVICE": "CU_MEM_LOCATION_TYPE_DEVICE",
    "MEM_LOCATION_TYPE_HOST_NUMA": "CU_MEM_LOCATION_TYPE_HOST_NUMA",
    "MEM_ACCESS_FLAGS_PROT_READWRITE": "CU_MEM_ACCESS_FLAGS_PROT_READWRITE",
    "MEM_ALLOC_GRANULARITY_MINIMUM": "CU_MEM_ALLOC_GRANULARITY_MINIMUM",
    "DEVICE_ATTRIBUTE_PCI_BUS_ID": "CU_DEVICE_ATTRIBUTE_PCI_BUS_ID",
    "DEVICE_ATTRIBUTE_PCI_DEVICE_ID": "CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID",
    "DEVICE_ATTRIBUTE_PCI_DOMAIN_ID": "CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID",
    "DEVICE_ATTRIBUTE_HOST_NUMA_ID": "CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID",
}


def declared_parameters(header: str, name: str) -> list[str]:
    """The parameter types of `name`'s declaration in cuda.h, names dropped."""
    found = re.search(rf"CUresult CUDAAPI {name}\(([^;]*?)\);", header)
    assert found, f"cuda.h declares no {name}"
    params = " ".join(found.group(1).split())
    if params == "void":
        return []
    return [re.sub(r"\s*\b\w+$", "", p.strip()) for p in params.split(",")]


def compile_and_run(tmp_path: Path, body: str, declarations: str = "#include <cuda.h>") -> dict:
    """Compile and run `body` (json_print's statements) after `declarations`: the printed
    object."""
    assert HEADER is not None
    source = tmp_path / "abi.c"
    source.write_text(
        f"#include <stddef.h>\n#include <stdio.h>\n{declarations}\n"
        f"int main(void) {{\n{body}\n  return 0;\n}}\n"
    )
    binary = tmp_path / "abi"
    subprocess.run(
        ["cc", "-std=c11", "-I", str(HEADER.parent), str(source), "-o", str(binary)], check=True
    )
    return json.loads(subprocess.run([binary], capture_output=True, text=True, check=True).stdout)


def json_print(items: dict[str, str]) -> str:
    """C statements printing {key: (long long)expr} as one JSON object."""
    lines = ['  printf("{");']
    for i, (key, expr) in enumerate(items.items()):
        sep = "," if i else ""
        lines.append(f'  printf("{sep}\\"{key}\\": %lld", (long long)({expr}));')
    lines.append('  printf("}\\n");')
    return "\n".join(lines)


def ctypes_size(kind: object) -> int:
    return ctypes.sizeof(kind)  # type: ignore[arg-type]


@needs_header
def test_every_prototype_matches_the_size_of_each_parameter_cuda_h_declares(
    tmp_path: Path,
) -> None:
    assert HEADER is not None
    header = HEADER.read_text()
    wanted: dict[str, str] = {}
    ours: dict[str, int] = {}
    for name, argtypes in driver.PROTOTYPES.items():
        params = declared_parameters(header, name)
        assert len(params) == len(argtypes), f"{name}: cuda.h has {params}"
        for i, (c_type, ours_type) in enumerate(zip(params, argtypes, strict=True)):
            wanted[f"{name}.{i}"] = f"sizeof({c_type})"
            ours[f"{name}.{i}"] = ctypes_size(ours_type)
            pointee = getattr(ours_type, "_type_", None)
            if c_type.rstrip().endswith("*") and isinstance(pointee, type):
                # What an out-argument points to: the driver writes that many bytes there.
                wanted[f"{name}.{i}.pointee"] = f"sizeof({c_type.rstrip()[:-1]})"
                ours[f"{name}.{i}.pointee"] = ctypes_size(pointee)
    assert compile_and_run(tmp_path, json_print(wanted)) == ours


@needs_header
def test_structures_have_cuda_h_s_size_and_field_offsets(tmp_path: Path) -> None:
    wanted: dict[str, str] = {}
    ours: dict[str, int] = {}
    for c_name, (structure, fields) in STRUCTS.items():
        assert [f[0] for f in structure._fields_] == fields
        wanted[c_name] = f"sizeof({c_name})"
        ours[c_name] = ctypes.sizeof(structure)
        for field in fields:
            wanted[f"{c_name}.{field}"] = f"offsetof({c_name}, {field})"
            ours[f"{c_name}.{field}"] = getattr(structure, field).offset
    assert compile_and_run(tmp_path, json_print(wanted)) == ours


@needs_header
def test_constants_have_cuda_h_s_values(tmp_path: Path) -> None:
    got = compile_and_run(tmp_path, json_print(CONSTANTS))
    assert got == {ours: getattr(driver, ours) for ours in CONSTANTS}
    assert driver.ABI_VERSION == 12000


def test_every_driver_function_thaw_calls_has_a_prototype() -> None:
    """A name `call` does not know would fail only when a GPU path first runs it."""
    root = Path(driver.__file__).parents[2]
    sources = [*root.glob("thaw/**/*.py"), *root.glob("thawd/**/*.py")]
    called = set()
    for path in sources:
        called |= set(re.findall(r"(?:call|try_call)\(\s*\"(cu\w+)\"", path.read_text()))
    assert called, "no driver calls found: the pattern no longer matches the code"
    assert called <= set(driver.PROTOTYPES), called - set(driver.PROTOTYPES)


def test_without_a_driver_cuda_reports_no_device_and_calls_raise_cuda_error() -> None:
    """On a host with no libcuda (this one, in CI), thaw's CUDA layer says so instead of
    failing to import."""
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("this host has an NVIDIA driver")
    assert cuda.device_count() == 0
    with pytest.raises(CudaError, match=r"no CUDA driver on this host \(libcuda.so.1\)"):
        cuda.set_device(0)


def readdevice_declarations() -> tuple[str, list[tuple[str, list[str]]], dict[str, str]]:
    """native/readdevice.c's own driver ABI: (its typedefs and defines, as C; each driver_t
    member's name and parameter types, in order; its #defines of cuda.h constants)."""
    source = (Path(driver.__file__).parents[2] / "native" / "readdevice.c").read_text()
    types = "\n".join(re.findall(r"^typedef [\w ]+?\s\*?CU\w+;$", source, re.MULTILINE))
    struct = re.search(r"typedef struct \{\n(.*?)\} driver_t;", source, re.DOTALL)
    assert struct, "native/readdevice.c has no driver_t"
    members = [
        (name, [p.strip() for p in params.split(",")])
        for name, params in re.findall(r"CUresult \(\*(\w+)\)\(([^)]*)\);", struct.group(1))
    ]
    defines = dict(re.findall(r"^#define (CU_\w+) (\d+)$", source, re.MULTILINE))
    return types, members, defines


@needs_header
def test_native_read_to_device_declares_the_driver_functions_as_cuda_h_does(
    tmp_path: Path,
) -> None:
    """read_to_device calls the functions thaw.mem.cuda passes it (_NATIVE_CALLS, resolved at
    CUDA 12.0's ABI) through native/readdevice.c's own declarations, which do not include
    cuda.h (the extension builds without a toolkit): each must agree with cuda.h in order,
    parameter count, parameter sizes and out-argument sizes, and its constants in value."""
    from thaw.mem.cuda import _NATIVE_CALLS

    assert HEADER is not None
    header = HEADER.read_text()
    types, members, defines = readdevice_declarations()
    assert len(members) == len(_NATIVE_CALLS) == 11
    ours: dict[str, str] = {"CUresult": "sizeof(CUresult)"}
    wanted: dict[str, str] = {"CUresult": "sizeof(CUresult)"}
    for (member, params), name in zip(members, _NATIVE_CALLS, strict=True):
        declared = declared_parameters(header, name)
        assert len(params) == len(declared), f"{member} ({name}): cuda.h has {declared}"
        for i, (mine, theirs) in enumerate(zip(params, declared, strict=True)):
            # An out-argument stays one: a handle passed where its address is due has their size.
            assert mine.endswith("*") == theirs.endswith("*"), f"{member}: {mine} vs {theirs}"
            ours[f"{name}.{i}"], wanted[f"{name}.{i}"] = f"sizeof({mine})", f"sizeof({theirs})"
            if mine.endswith("*") and "void" not in mine:
                ours[f"{name}.{i}.pointee"] = f"sizeof({mine[:-1]})"
                wanted[f"{name}.{i}.pointee"] = f"sizeof({theirs[:-1]})"
    for constant in defines:
        ours[constant] = wanted[constant] = constant
    own = types + "".join(f"\n#define {k} {v}" for k, v in defines.items())
    native = compile_and_run(tmp_path, json_print(ours), declarations=own)
    assert native == compile_and_run(tmp_path, json_print(wanted))
    assert set(defines) == {"CU_STREAM_NON_BLOCKING", "CU_EVENT_DISABLE_TIMING"}
