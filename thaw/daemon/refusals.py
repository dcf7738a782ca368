"""How thawd's refusals become thaw.errors exceptions: gRPC status codes and the class thawd
names in the `thaw-error` trailer, or in an fd-socket reply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from thaw import errors

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
_BY_CODE: dict[grpc.StatusCode, type[errors.DaemonError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.BudgetExceeded,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest,
    grpc.StatusCode.UNAVAILABLE: errors.DaemonUnavailable,
}


def from_rpc(e: grpc.RpcError, socket: str) -> errors.DaemonError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else "") or str(code)
    metadata = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    trailers: dict[str, Any] = {m.key: m.value for m in metadata or ()}
    cls_name = trailers.get("thaw-error", "")
    snapshot_error = getattr(errors, cls_name, None) if cls_name else None
    if code is grpc.StatusCode.DATA_LOSS or (
        isinstance(snapshot_error, type) and issubclass(snapshot_error, errors.SnapshotError)
    ):
        checksums = trailers.get("thaw-checksums", "").split()
        return errors.SnapshotCorrupt(
            details, trailers.get("thaw-tensor", ""), *(int(c, 16) for c in checksums[:2])
        )
    if code is grpc.StatusCode.UNAVAILABLE and not cls_name:
        return errors.DaemonUnavailable(
            f"thawd at {socket} is not answering ({details}); " + HOW_TO_START
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and not cls_name:
        return errors.DaemonUnavailable(
            f"thawd at {socket} did not answer in time: stopped "
            "or stuck? check `systemctl status thawd`"
        )
    cls = _BY_NAME.get(cls_name) or _BY_CODE.get(code, errors.DaemonError)
    return cls(details)


def refused(reply: Mapping[str, Any]) -> errors.DaemonError:
    """The exception for an fd-socket reply that is not ok: the class thawd names."""
    return _BY_NAME.get(reply.get("error", ""), errors.DaemonError)(reply.get("message", ""))
