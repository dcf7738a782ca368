"""An opened restore session (OpenRestoreResponse) as the fd socket carries it: JSON.

The fd socket's "open" speaks JSON, not serialized protobuf, so that a process's first restore
imports no protobuf (18 ms of a new process's connect on the H200 host); the fields are the
messages' own (proto/thaw/v1/thawd.proto), enums by their names:

    request:  {"name": S, "mapped_buffer": N, "daemon_copy": B, "can_daemon_copy": B,
               "pool_id": N}                                    (OpenRestoreRequest)
    response: {"session_id": S, "tier": "TIER_PINNED", "pool_kind": "POOL_KIND_VMM",
               "pool_size": N, "payload_offset": N, "payload_length": N,
               "tensors": [[name, dtype, shape, offset, length, checksum], ...],
               "fingerprint_json": S, "path": S, "delivery": "DELIVERY_POOL",
               "buffer_id": N, "pool_offset": N}                (OpenRestoreResponse)

thawd's "auth" reply says `"open": "json"`: a client opens on the fd socket only then, and
over gRPC with a thawd from before. thawd encodes a response's session fields with `as_json`
and its manifest's rows, built once per manifest, with `tensor_row`; a client reads it, or a
response that came over gRPC (a batch too large for one packet, or a thawd from before)
through the same `as_json`, into an `Opened`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from thaw.daemon.values import Delivery, PoolKind, Tier
from thaw.format import TensorEntry

if TYPE_CHECKING:
    from thaw._proto import thawd_pb2 as pb


class Opened:
    """One opened restore session, its enums as thaw's values (Tier, PoolKind, Delivery)."""

    __slots__ = (
        "buffer_id",
        "delivery",
        "fingerprint_json",
        "path",
        "payload_length",
        "payload_offset",
        "pool_kind",
        "pool_offset",
        "pool_size",
        "session_id",
        "tensors",
        "tier",
    )

    def __init__(self, m: Mapping[str, Any]) -> None:
        self.session_id: str = m["session_id"]
        self.tier = _enum(Tier, m["tier"], "TIER_", Tier.COLD)
        self.pool_kind = _enum(PoolKind, m["pool_kind"], "POOL_KIND_", PoolKind.FILE)
        self.delivery = _enum(Delivery, m["delivery"], "DELIVERY_", Delivery.FDS)
        self.pool_size: int = m["pool_size"]
        self.payload_offset: int = m["payload_offset"]
        self.payload_length: int = m["payload_length"]
        self.buffer_id: int = m["buffer_id"]
        self.pool_offset: int = m["pool_offset"]
        self.fingerprint_json: str = m["fingerprint_json"]
        self.path: str = m["path"]
        self.tensors = tuple(
            TensorEntry(name, dtype, tuple(shape), offset, length, checksum)
            for name, dtype, shape, offset, length, checksum in m["tensors"]
        )


def as_json(o: pb.OpenRestoreResponse) -> dict[str, Any]:
    """`o` as the fd socket carries it (the module's docstring)."""
    from thaw._proto import thawd_pb2 as pb

    return {
        "session_id": o.session_id,
        "tier": pb.Tier.Name(o.tier),
        "pool_kind": pb.PoolKind.Name(o.pool_kind),
        "pool_size": o.pool_size,
        "payload_offset": o.payload_offset,
        "payload_length": o.payload_length,
        "tensors": [tensor_row(t) for t in o.tensors],
        "fingerprint_json": o.fingerprint_json,
        "path": o.path,
        "delivery": pb.Delivery.Name(o.delivery),
        "buffer_id": o.buffer_id,
        "pool_offset": o.pool_offset,
    }


def tensor_row(t: Any) -> list[Any]:
    """A tensor entry (a TensorEntry message or thaw.format's) as the fd socket's row."""
    return [t.name, t.dtype, list(t.shape), t.offset, t.length, t.checksum]


def _enum(kind: Any, name: str, prefix: str, unspecified: Any) -> Any:
    """The value of `kind` that the wire enum `name` (prefix + value in capitals) names."""
    try:
        return kind(name.removeprefix(prefix).lower())
    except ValueError:  # UNSPECIFIED, or a value newer than this client
        return unspecified
