"""Names of tensor dtypes as they appear in snapshot manifests: torch's names without "torch."."""

from __future__ import annotations

import torch

_CANDIDATES = [
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
    "complex64", "complex128",
]  # fmt: skip

# Only the dtypes this torch build has: a snapshot naming another one is refused by name.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in _CANDIDATES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in a thaw snapshot") from None


def itemsize(name: str) -> int:
    return torch.empty((), dtype=DTYPES[name]).element_size()
