"""What the pool may serve: model names bound to thawd snapshots, and the architecture that
decides which slots can hold each one."""

from __future__ import annotations

import dataclasses

from thaw.format.fingerprint import Fingerprint

# The fingerprint keys that make weights fit an engine: the same tensors, shapes and dtypes.
# `model` (the checkpoint's name) is left out on purpose: a fine-tune is another model of the
# same architecture and swaps into the same engine.
ARCHITECTURE_KEYS = ("engine", "architecture", "dtype", "parameter_count", "quantization",
                     "tp_size")  # fmt: skip


class ModelError(Exception):
    """A model that cannot be registered or served; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The part of a fingerprint that says which engines can hold some weights."""

    engine: str
    architecture: str
    dtype: str
    parameter_count: int
    quantization: str
    tp_size: int

    @classmethod
    def of(cls, fp: Fingerprint) -> Architecture:
        return cls(*(getattr(fp, key) for key in ARCHITECTURE_KEYS))

    def known(self) -> bool:
        """A snapshot without an architecture (frozen from bare tensors) fits no slot:
        serving it would be a guess."""
        return bool(self.architecture) and self.parameter_count > 0

    def __str__(self) -> str:
        return (f"{self.architecture} {self.dtype} {self.parameter_count} parameters "
                f"tp={self.tp_size}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Model:
    """One servable model: the name clients put in `model`, the thawd snapshot holding its
    weights, and their architecture."""

    name: str
    snapshot: str
    architecture: Architecture
    registered: float


def validate_name(name: str) -> str:
    """Model names travel in URLs and Prometheus labels: keep them plain."""
    if not name or len(name) > 200 or any(c.isspace() or c in "/\\\"'" for c in name):
        raise ModelError(f"invalid model name {name!r}: 1-200 characters, no spaces, quotes "
                         "or slashes")  # fmt: skip
    return name
