"""How thawd's refusals become thaw.errors exceptions: gRPC status codes and the class thawd
names in the `thaw-error` trailer, or in an fd-socket reply.

Status codes are compared by name: this module does not import grpc, which a process that
only restores (over the fd socket) never loads (thaw/daemon/connection.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from thaw import errors

if TYPE_CHECKING:
    import grpc

HOW_TO_START = (
    "start it with `systemctl start thawd` (or run `thawd --config FILE` by hand), or point "
    "$THAW_SOCKET at its socket"
)

_BY_NAME: dict[str, type[errors.DaemonError]] = {
    c.__name__: c
    for c in (
        errors.NotFound,
        errors.AlreadyExists,
        errors.PermissionDenied,
        errors.BudgetExceeded,
        errors.InvalidRequest,
        errors.DaemonUnavailable,
        errors.SnapshotChanged,
    )
}
_BY_CODE: dict[str, type[errors.DaemonError]] = {
    "NOT_FOUND": errors.NotFound,
    "ALREADY_EXISTS": errors.AlreadyExists,
    "PERMISSION_DENIED": errors.PermissionDenied,
    "UNAUTHENTICATED": errors.PermissionDenied,
    "RESOURCE_EXHAUSTED": errors.BudgetExceeded,
    "INVALID_ARGUMENT": errors.InvalidRequest,
    "UNAVAILABLE": errors.DaemonUnavailable,
}


def code_name(e: grpc.RpcError) -> str:
    """The status code's name ("UNAUTHENTICATED"); "UNKNOWN" for an error that has none."""
    code = e.code() if hasattr(e, "code") else None
    return str(getattr(code, "name", "UNKNOWN"))


def from_rpc(e: grpc.RpcError, socket: str) -> errors.DaemonError:
    code = code_name(e)
    details = (e.details() if hasattr(e, "details") else "") or f"StatusCode.{code}"
    metadata = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    trailers: dict[str, Any] = {m.key: m.value for m in metadata or ()}
    cls_name = trailers.get("thaw-error", "")
    snapshot_error = getattr(errors, cls_name, None) if cls_name else None
    if code == "DATA_LOSS" or (
        isinstance(snapshot_error, type) and issubclass(snapshot_error, errors.SnapshotError)
    ):
        checksums = trailers.get("thaw-checksums", "").split()
        return errors.SnapshotCorrupt(
            details, trailers.get("thaw-tensor", ""), *(int(c, 16) for c in checksums[:2])
        )
    if code == "UNAVAILABLE" and not cls_name:
        return errors.DaemonUnavailable(
            f"thawd at {socket} is not answering ({details}); " + HOW_TO_START
        )
    if code == "DEADLINE_EXCEEDED" and not cls_name:
        return errors.DaemonUnavailable(
            f"thawd at {socket} did not answer in time: stopped "
            "or stuck? check `systemctl status thawd`"
        )
    cls = _BY_NAME.get(cls_name) or _BY_CODE.get(code, errors.DaemonError)
    return cls(details)


def refused(reply: Mapping[str, Any]) -> errors.DaemonError:
    """The exception for an fd-socket reply that is not ok: the class thawd names."""
    return _BY_NAME.get(reply.get("error", ""), errors.DaemonError)(reply.get("message", ""))
