"""Restore into a running `sglang.Engine`. NOT RUN against a real SGLang (docs/ENGINES.md).

The Engine object lives in the caller's process; the model lives in its scheduler processes.
thaw reads every rank's snapshot here (thawd's pool or the file) and hands the tensors to
`Engine.update_weights_from_tensor(named_tensors, load_format="direct", flush_cache=...)`,
each as a `LocalSerializedTensor` with one serialized shard per rank, in bounded batches,
inside `begin_weight_update()` / `end_weight_update()` where the engine has them (0.5.23:
they restore in-place-packed weights to a loadable state and re-pack at the end).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, NoReturn

from thaw.engines.options import Options
from thaw.engines.ranks import rank_path, resolve
from thaw.engines.sources import SourceKind, locate
from thaw.engines.transfer import EngineTransfer, read_rank
from thaw.errors import SnapshotMissing
from thaw.sglang.core import BATCH_BYTES, batches, per_rank_named_tensors

if TYPE_CHECKING:
    from thaw.daemon.client import Client


def restore(
    engine: Any,
    snapshot: str | os.PathLike[str],
    *,
    tp_size: int | None = None,
    path: str | None = None,
    socket: str | None = None,
    daemon: str = "auto",
    batch_bytes: int = BATCH_BYTES,
    client: Client | None = None,
) -> EngineTransfer:
    import torch
    from sglang.srt.model_executor.model_runner import LocalSerializedTensor
    from sglang.srt.utils import MultiprocessingSerializer

    from thaw.format import open_snapshot
    from thaw.format.dtypes import torch_dtype

    started = time.perf_counter()
    size = tp_size or int(getattr(engine.server_args, "tp_size", 1))
    options = Options.from_config(
        {
            "snapshot": os.fspath(snapshot),
            "path": path or "",
            "socket": socket or "",
            "daemon": daemon,
        }
    )
    ranks, results = [], []
    for rank in range(size):
        ref = resolve(options, rank, size)
        source, used = locate(ref, options, client)
        if source.kind == SourceKind.MISSING:
            raise SnapshotMissing(f"rank {rank}: snapshot {ref.label!r} not found")
        if source.fingerprint is not None and source.fingerprint.tp_size not in (-1, size):
            from thaw.errors import FingerprintMismatch

            raise FingerprintMismatch([("tp_size", size, source.fingerprint.tp_size)])
        entries = (
            open_snapshot(source.path).tensors
            if source.kind == SourceKind.FILE
            else _entries(used, source.name)
        )
        named = [(e.name, torch.empty(e.shape, dtype=torch_dtype(e.dtype))) for e in entries]
        expect = source.fingerprint or open_snapshot(source.path).fingerprint
        results.append(read_rank(named, ref, options, expect, rank, source, used))
        ranks.append(named)

    def wrap(shards: list[Any]) -> Any:
        return LocalSerializedTensor(
            values=[MultiprocessingSerializer.serialize(t) for t in shards]
        )

    groups = list(batches(ranks[0], batch_bytes))
    begin, end = (
        getattr(engine, "begin_weight_update", None),
        getattr(engine, "end_weight_update", None),
    )
    if begin is not None:
        begin()
    try:
        for i, group in enumerate(groups):
            names = {n for n, _ in group}
            per_rank = [[(n, t) for n, t in named if n in names] for named in ranks]
            engine.update_weights_from_tensor(
                per_rank_named_tensors(per_rank, wrap),
                load_format="direct",
                flush_cache=i == len(groups) - 1,
            )
    finally:
        if end is not None:
            end()
    return EngineTransfer(os.fspath(snapshot), tuple(results), time.perf_counter() - started)


def _entries(client: Any, name: str) -> Any:
    """A registered snapshot's manifest: read from its file (thawd registers files)."""
    from thaw.format import open_snapshot

    return open_snapshot(client.stat(name).path).tensors


def freeze(engine: Any, snapshot: str) -> NoReturn:
    """Not possible from outside a running SGLang engine: its API returns only truncated
    parameter values (get_weights_by_name). Freeze with the loader's freeze_on_miss instead
    (freeze_engine)."""
    raise NotImplementedError(
        "SGLang exposes no full read of a running engine's weights; create the snapshot with "
        'load_format=ThawSGLangLoader and {"freeze_on_miss": true} (thaw.sglang.freeze_engine)'
    )


def freeze_engine(
    model: str,
    path: str,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    labels: dict[str, str] | None = None,
) -> list[str]:
    """`thawctl freeze --engine sglang`: start SGLang with freeze_on_miss, return the files."""
    import sglang

    from thaw.sglang.loader import ThawSGLangLoader

    paths = [
        os.path.abspath(rank_path(path, r, tensor_parallel_size))
        for r in range(tensor_parallel_size)
    ]
    engine = sglang.Engine(
        model_path=model,
        dtype=dtype,
        tp_size=tensor_parallel_size,
        load_format=ThawSGLangLoader,
        model_loader_extra_config={
            "snapshot": os.path.abspath(path),
            "freeze_on_miss": True,
            "daemon": "never",
            "labels": dict(labels or {}),
        },
    )
    engine.shutdown()
    return paths
