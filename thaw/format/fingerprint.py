"""What a snapshot was frozen from, and the check that a target matches it before any copy."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from thaw.errors import FingerprintMismatch

# What a manifest's fingerprint may hold (thaw/format/snapshot.py bounds the rest of a manifest).
MAX_LABELS = 1024
MAX_TEXT = 4096

# Keys compared by `check`. Labels are free-form and never compared.
IDENTITY_KEYS = (
    "architecture",
    "dtype",
    "parameter_count",
    "quantization",
    "tp_rank",
    "tp_size",
    "engine",
    "engine_version",
    "model",
)


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Identity of the model a snapshot holds. Empty strings and -1 mean "not recorded"."""

    architecture: str = ""
    dtype: str = ""
    parameter_count: int = -1
    quantization: str = ""
    tp_rank: int = -1
    tp_size: int = -1
    engine: str = ""
    engine_version: str = ""
    model: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["labels"] = dict(self.labels)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fingerprint:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fingerprint keys {sorted(unknown)}")
        values = dict(data)
        labels = values.get("labels", {})
        if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ValueError("fingerprint labels must map strings to strings")
        if len(labels) > MAX_LABELS or any(
            len(k) > MAX_TEXT or len(v) > MAX_TEXT for k, v in labels.items()
        ):
            raise ValueError(
                f"fingerprint labels: at most {MAX_LABELS}, each at most {MAX_TEXT} characters"
            )
        for f in dataclasses.fields(cls):
            if f.name in values and f.name != "labels":
                expected_type = int if f.type == "int" else str
                if not isinstance(values[f.name], expected_type) or isinstance(
                    values[f.name], bool
                ):
                    raise ValueError(f"fingerprint {f.name} must be {expected_type.__name__}")
                if expected_type is str and len(values[f.name]) > MAX_TEXT:
                    raise ValueError(f"fingerprint {f.name} longer than {MAX_TEXT} characters")
        return cls(**values)

    def differences(self, other: Fingerprint) -> list[tuple[str, object, object]]:
        """Keys where both sides recorded a value and the values differ."""
        out = []
        for key in IDENTITY_KEYS:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine in ("", -1) or theirs in ("", -1):
                continue
            if mine != theirs:
                out.append((key, mine, theirs))
        return out


def check(expected: Fingerprint, found: Fingerprint) -> None:
    """Raise FingerprintMismatch naming every difference between a target and a snapshot."""
    differences = expected.differences(found)
    if differences:
        raise FingerprintMismatch(differences)
