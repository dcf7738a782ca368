"""The fingerprint of one rank of an engine: what its snapshot must match before a byte moves."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from thaw.format.fingerprint import Fingerprint

# Recorded in every engine snapshot's labels: what the tensors are, so that a reader (a person,
# thawctl info) knows they are not a checkpoint and not kernel-format weights.
WEIGHTS_LABEL = "thaw.weights"  # "vllm-pre-processing": per-rank shards, before packing
NAMES_LABEL = "thaw.names"  # whose parameter names: "vllm", "sglang"
SHARD_LABEL = "thaw.shard"


def make_fingerprint(
    *,
    engine: str,
    architecture: str,
    dtype: str,
    parameter_count: int,
    quantization: str,
    tp_rank: int,
    tp_size: int,
    engine_version: str,
    model: str,
    labels: Mapping[str, str] | None = None,
) -> Fingerprint:
    """The fingerprint of rank `tp_rank` of an `engine` engine: its pre-processing weights
    under the engine's own parameter names."""
    all_labels = {
        WEIGHTS_LABEL: f"{engine}-pre-processing",
        NAMES_LABEL: engine,
        SHARD_LABEL: f"tp{tp_rank}/{tp_size}",
        **dict(labels or {}),
    }
    return Fingerprint(
        architecture=architecture,
        dtype=dtype,
        parameter_count=parameter_count,
        quantization=quantization,
        tp_rank=tp_rank,
        tp_size=tp_size,
        engine=engine,
        engine_version=engine_version,
        model=model,
        labels=all_labels,
    )


def model_name(model: str) -> str:
    """What fingerprints record as the model: an id as given, a directory by its name
    (as `thawctl freeze` does, so a copied model directory still matches)."""
    return Path(model).resolve().name if os.path.isdir(model) else model


def without(fp: Fingerprint, keys: Sequence[str]) -> Fingerprint:
    """`fp` with `keys` unset, so `check` does not compare them."""
    if not keys:
        return fp
    unset: dict[str, Any] = {k: (-1 if isinstance(getattr(fp, k), int) else "") for k in keys}
    return dataclasses.replace(fp, **unset)
