"""What goes where: a model's named tensors, and each bound to the snapshot entry it is
restored from (or frozen to), names, dtypes and shapes checked before a byte moves."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from thaw.errors import ModelMismatch, TensorMismatch
from thaw.format import TensorEntry
from thaw.format.dtypes import dtype_name
from thaw.format.fingerprint import Fingerprint

NamedTensors = Sequence[tuple[str, torch.Tensor]]


def model_tensors(source: Any) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of a module (parameters and buffers), a state dict or (name, tensor) pairs.

    Tensors sharing storage (tied embeddings) appear once, under their first name.
    """
    if isinstance(source, torch.nn.Module):
        pairs: Iterable[tuple[str, torch.Tensor]] = [
            *source.named_parameters(),
            *source.named_buffers(),
        ]
    elif isinstance(source, Mapping):
        pairs = source.items()
    else:
        pairs = source
    out, seen = [], set()
    for name, tensor in pairs:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out.append((name, tensor.detach()))
    return out


def describe(source: Any, **extra: Any) -> Fingerprint:
    """A fingerprint of a torch module: architecture, dominant dtype, parameter count."""
    tensors = model_tensors(source)
    sizes: dict[str, int] = {}
    for _, t in tensors:
        sizes[dtype_name(t.dtype)] = sizes.get(dtype_name(t.dtype), 0) + t.numel()
    config = getattr(source, "config", None)
    architectures = getattr(config, "architectures", None) or [type(source).__name__]
    values: dict[str, Any] = {
        "architecture": architectures[0] if isinstance(source, torch.nn.Module) else "",
        "dtype": max(sizes, key=lambda k: sizes[k]) if sizes else "",
        "parameter_count": sum(t.numel() for _, t in tensors),
        "engine": "torch",
        "tp_rank": 0,
        "tp_size": 1,
    }
    values.update(extra)
    return Fingerprint(**values)


@dataclasses.dataclass(frozen=True)
class Binding:
    """A snapshot tensor and the model tensor it is restored into (or frozen from)."""

    entry: TensorEntry
    tensor: torch.Tensor


def bind(entries: Sequence[TensorEntry], named: NamedTensors, strict: bool = True) -> list[Binding]:
    """Match snapshot entries to model tensors by name, checking dtype and shape first.

    Raises before any byte moves: TensorMismatch names the tensor, expected and found;
    ModelMismatch lists tensors present on one side only. `strict=False` allows the snapshot
    to hold tensors the model lacks (never the reverse: a half-filled model is no model).
    """
    by_name = {e.name: e for e in entries}
    missing = [name for name, _ in named if name not in by_name]
    if missing:
        raise ModelMismatch(
            f"the snapshot lacks {len(missing)} tensor(s) of the model: {_few(missing)}"
        )
    model_names = {name for name, _ in named}
    extra = [e.name for e in entries if e.name not in model_names]
    if strict and extra:
        raise ModelMismatch(
            f"the snapshot has {len(extra)} tensor(s) the model lacks: {_few(extra)}"
        )
    bindings = []
    for name, tensor in named:
        entry = by_name[name]
        found = dtype_name(tensor.dtype)
        if found != entry.dtype:
            raise TensorMismatch(name, "dtype", found, entry.dtype)
        if tuple(tensor.shape) != entry.shape:
            raise TensorMismatch(name, "shape", list(tensor.shape), list(entry.shape))
        if tensor.device.type not in ("cpu", "cuda"):
            raise ModelMismatch(f"tensor {name!r} is on {tensor.device}; thaw restores cpu/cuda")
        bindings.append(Binding(entry, tensor))
    bindings.sort(key=lambda b: b.entry.offset)
    return bindings


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def cuda_device(bindings: Sequence[Binding]) -> int | None:
    """The one CUDA device the bindings use, None if all are on the CPU."""
    devices = {b.tensor.device.index or 0 for b in bindings if b.tensor.device.type == "cuda"}
    if len(devices) > 1:
        raise ModelMismatch(f"tensors span CUDA devices {sorted(devices)}; restore per device")
    return devices.pop() if devices else None
