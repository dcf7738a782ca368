"""Names of tensor dtypes as they appear in snapshot manifests: torch's names without "torch.".

Torch-free on purpose: thawd validates manifests without importing torch (seconds of start-up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Bytes per element of every dtype a snapshot may hold.
DTYPES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
}


def itemsize(name: str) -> int:
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype} cannot be stored in a thaw snapshot")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest name; ValueError where this torch build lacks it."""
    import torch

    dtype = getattr(torch, name, None) if name in DTYPES else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not available in torch {torch.__version__}")
    return dtype
