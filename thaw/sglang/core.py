"""Engine-independent SGLang logic: fingerprints, batching tensors for
`update_weights_from_tensor`, and per-rank payloads. Tested without sglang."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from thaw.engines.fingerprints import make_fingerprint
from thaw.format.fingerprint import Fingerprint

ENGINE = "sglang"
# Bytes per update_weights_from_tensor call: each call serializes (CUDA IPC handles on GPU)
# and loads; bounded batches keep the scheduler's transient memory bounded.
BATCH_BYTES = 512 << 20


def fingerprint(**fields: Any) -> Fingerprint:
    """The fingerprint of one rank of an SGLang engine (pre-processing weights, SGLang names)."""
    return make_fingerprint(engine=ENGINE, **fields)


def batches(
    named: Sequence[tuple[str, Any]],
    max_bytes: int = BATCH_BYTES,
    nbytes: Callable[[Any], int] | None = None,
) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive groups of (name, tensor) of at most `max_bytes` each (a bigger tensor is a
    group of its own). Order is kept: layers arrive whole and in order."""
    size = nbytes or (lambda t: t.numel() * t.element_size())
    group: list[tuple[str, Any]] = []
    used = 0
    for name, t in named:
        n = size(t)
        if group and used + n > max_bytes:
            yield group
            group, used = [], 0
        group.append((name, t))
        used += n
    if group:
        yield group


def per_rank_named_tensors(
    ranks: Sequence[Sequence[tuple[str, Any]]],
    wrap: Callable[[list[Any]], Any],
) -> list[tuple[str, Any]]:
    """Zip each rank's (name, tensor) list into one list of (name, wrap([t_rank0, t_rank1...])).

    SGLang's update_weights_from_tensor sends one list to every TP rank; a
    `LocalSerializedTensor(values=[one serialized tensor per rank])` lets rank r take its own
    shard. All ranks must hold the same names in the same order.
    """
    if not ranks:
        return []
    names = [n for n, _ in ranks[0]]
    for r, named in enumerate(ranks[1:], start=1):
        other = [n for n, _ in named]
        if other != names:
            missing = sorted(set(names) ^ set(other))[:5]
            raise ValueError(f"rank {r} holds other tensors than rank 0 (e.g. {missing})")
    return [(name, wrap([named[i][1] for named in ranks])) for i, name in enumerate(names)]
