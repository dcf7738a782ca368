"""The one exception hierarchy of thaw: every failure a caller can act on has its own class.

Each message says what is wrong and, where there is one, what to do about it.
"""

from __future__ import annotations


def add_note(exc: BaseException, note: str) -> None:
    """`exc.add_note(note)`, also on Python 3.10, which lacks it (tracebacks and thawctl's
    error line read `__notes__` either way)."""
    notes: list[str] | None = getattr(exc, "__notes__", None)
    if notes is None:
        notes = []
        setattr(exc, "__notes__", notes)  # noqa: B010 (3.10 declares no such attribute)
    notes.append(note)


class ThawError(Exception):
    """Base class of every error raised by thaw, thawd's client and thawctl."""


# --- snapshot files -------------------------------------------------------------------------


class SnapshotError(ThawError):
    """A snapshot file cannot be used: it is not a snapshot, or it is damaged."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class BadMagic(SnapshotError):
    """The file does not start with the snapshot magic: it is not a thaw snapshot."""


class UnsupportedVersion(SnapshotError):
    """The snapshot was written by a format version this thaw cannot read."""


class HeaderCorrupt(SnapshotError):
    """The header's own checksum or one of its fields is wrong."""


class TruncatedSnapshot(SnapshotError):
    """The file is shorter than its header says: an interrupted copy or a full disk."""


class ManifestCorrupt(SnapshotError):
    """The manifest fails its checksum, does not parse, or holds an invalid entry."""


class ManifestOutOfBounds(ManifestCorrupt):
    """A manifest entry points outside the payload or overlaps another one."""


class ChecksumMismatch(SnapshotError):
    """A tensor's bytes do not match the checksum recorded at freeze time."""

    def __init__(self, path: object, tensor: str, expected: int, found: int) -> None:
        self.tensor = tensor
        self.expected = expected
        self.found = found
        super().__init__(
            path,
            f"checksum mismatch in tensor {tensor!r} (recorded {expected:016x}, "
            f"computed {found:016x}): the file is damaged; freeze it again or restore a copy",
        )


# --- models ---------------------------------------------------------------------------------


class ModelMismatch(ThawError):
    """The snapshot does not fit the model it is restored into; nothing was copied."""


class TensorMismatch(ModelMismatch):
    """One tensor differs in dtype or shape between the snapshot and the model."""

    def __init__(self, tensor: str, what: str, expected: object, found: object) -> None:
        self.tensor = tensor
        self.what = what
        self.expected = expected
        self.found = found
        super().__init__(
            f"tensor {tensor!r}: the model has {what} {expected}, the snapshot has {found}"
        )


class FingerprintMismatch(ModelMismatch):
    """The snapshot was frozen from a different model, engine, dtype or parallel layout."""

    def __init__(self, differences: list[tuple[str, object, object]]) -> None:
        self.differences = differences
        parts = [
            f"{key}: expected {exp!r}, snapshot has {found!r}" for key, exp, found in differences
        ]
        super().__init__("snapshot fingerprint does not match: " + "; ".join(parts))


class KVMismatch(ModelMismatch):
    """A KV-cache snapshot does not fit the engine: other model, dtype, KV layout or block size."""


class RestoreIncomplete(ThawError):
    """A restore failed after bytes were copied: the model holds a mix of old and new weights.

    The model must not be used; restore again (or reload it) before serving.
    """


# --- engines --------------------------------------------------------------------------------


class SnapshotMissing(ThawError):
    """The snapshot an engine was asked to load does not exist (in thawd or on disk)."""


class EngineBusy(ThawError):
    """The engine has unfinished requests: swapping weights under them would mix models."""


class ExtensionMissing(ThawError):
    """The engine's workers cannot be reached: the LLM lacks thaw's worker extension."""


class WorkerFailed(ThawError):
    """thaw's call failed in an engine's worker process; the message is the worker's own."""


# --- the daemon -----------------------------------------------------------------------------


class DaemonError(ThawError):
    """thawd refused or failed a request."""


class DaemonUnavailable(DaemonError):
    """No thawd answers on the socket."""


class NotFound(DaemonError):
    """No snapshot of that name is registered."""


class AlreadyExists(DaemonError):
    """A snapshot of that name is already registered."""


class PermissionDenied(DaemonError):
    """The caller may not do this (peer credentials, file permissions)."""


class BudgetExceeded(DaemonError):
    """Pinning or warming this snapshot would exceed a configured memory budget."""


class InvalidRequest(DaemonError):
    """A request's arguments are invalid (a bad name, a bad label)."""


class SnapshotChanged(DaemonError):
    """The file of a registered snapshot was modified, replaced or removed since it was
    registered: thawd no longer serves it from the file. Register it again to adopt the new
    file (its pinned copy, verified when pinned, is still the registered snapshot's)."""


class CudaError(ThawError):
    """A CUDA call failed; the message names the call and CUDA's error."""


class SnapshotCorrupt(DaemonError):
    """thawd found a snapshot damaged (a checksum mismatch at pin time, or not a snapshot).

    `tensor` names the first damaged tensor, "" when the damage is not in a tensor;
    `expected` and `found` are its recorded and computed checksums (None when not a mismatch).
    """

    def __init__(
        self, message: str, tensor: str = "", expected: int | None = None, found: int | None = None
    ) -> None:
        self.tensor = tensor
        self.expected = expected
        self.found = found
        super().__init__(message)
