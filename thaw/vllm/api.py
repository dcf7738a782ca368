"""thaw's operations on a live `vllm.LLM` (called in the process that owns it)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from thaw.engines import weights
from thaw.engines.adapter import is_instance_of
from thaw.engines.options import Options
from thaw.engines.ranks import rank_path, resolve
from thaw.engines.sources import SourceKind, check_before_copy, locate, missing_message
from thaw.engines.transfer import EngineTransfer, RankTransfer
from thaw.errors import EngineBusy, ExtensionMissing, SnapshotMissing, ThawError, WorkerFailed
from thaw.format.fingerprint import Fingerprint
from thaw.vllm import WORKER_EXTENSION

if TYPE_CHECKING:
    from thaw.daemon.client import Client


def is_llm(target: Any) -> bool:
    """True for a `vllm.LLM` (or subclass), found without importing vllm."""
    return is_instance_of(target, "vllm", "LLM")


def _rpc(llm: Any, method: str, *args: Any) -> list[Any]:
    """Call a ThawWorkerExtension method on every worker (one result per rank, in rank order).
    A failure in a worker (vLLM raises it here as a bare Exception holding the worker's
    message) is a WorkerFailed with that message."""
    ext = getattr(llm.llm_engine.vllm_config.parallel_config, "worker_extension_cls", "") or ""
    if ext:
        call: Any = method
    elif os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") == "1":
        from thaw.vllm import worker

        call = {
            "thaw_restore": worker.restore_rank,
            "thaw_freeze": worker.freeze_rank,
            "thaw_fingerprint": worker.fingerprint_rank,
        }[method]
    else:
        raise ExtensionMissing(
            "thaw cannot reach this engine's workers: create the LLM with "
            f'worker_extension_cls="{WORKER_EXTENSION}" (or set '
            "VLLM_ALLOW_INSECURE_SERIALIZATION=1 before creating it, to let thaw send its "
            "functions to the workers)"
        )
    try:
        return list(llm.collective_rpc(call, args=args))
    except ThawError:
        raise
    except Exception as e:
        raise WorkerFailed(f"{method} failed in a vLLM worker: {_worker_message(e)}") from e


def _worker_message(e: Exception) -> str:
    """The worker's own message out of vLLM's "Call to collective_rpc method failed: Worker
    failed with error '...', please check the stack trace above for the root cause"."""
    text = str(e)
    start, end = "Worker failed with error '", "', please check the stack trace"
    if start in text and end in text:
        return text[text.index(start) + len(start) : text.rindex(end)]
    return text


def _check_idle(llm: Any) -> None:
    engine = llm.llm_engine
    if engine.has_unfinished_requests():
        raise EngineBusy(
            f"the engine has {engine.get_num_unfinished_requests()} unfinished request(s): "
            "swapping weights under them would mix two models; wait for them (or abort them)"
        )


def fingerprints(llm: Any, labels: Mapping[str, str] | None = None) -> list[Fingerprint]:
    """Each rank's fingerprint: what a snapshot restored into this engine must match."""
    return [Fingerprint.from_json(d) for d in _rpc(llm, "thaw_fingerprint", dict(labels or {}))]


def restore(
    llm: Any,
    snapshot: str | os.PathLike[str],
    *,
    path: str | None = None,
    socket: str | None = None,
    daemon: str | None = None,
    ignore: Sequence[str] | None = None,
    verify: bool | None = None,
    client: Client | None = None,
) -> EngineTransfer:
    """Swap a live engine's weights for a snapshot's, in place, on every rank.

    `snapshot` is a thawd name or a file (per rank: see docs/ENGINES.md). Every rank's
    snapshot is found and its fingerprint checked here first (FingerprintMismatch names each
    difference); only then do the workers restore, each its own shard, through vLLM's
    layerwise reload. The prefix cache is reset afterwards, the KV connector's too: cached
    KV belongs to the old weights, and no KV of theirs survives the swap. `ignore=["model"]`
    swaps in another model's weights of the same shape (a fine-tune, an RL step). `client`:
    the thawd client to check with here (default: this process's own for `socket`).
    """
    started = time.perf_counter()
    _check_idle(llm)
    options = Options.of(
        snapshot,
        path=path,
        socket=socket,
        daemon=daemon,
        ignore=list(ignore) if ignore else None,
        verify=verify,
    )
    expected = fingerprints(llm)
    for fp in expected:
        ref = resolve(options, fp.tp_rank, fp.tp_size)
        source, used = locate(ref, options, client)  # a thawd gone since: the file, with "auto"
        if source.kind == SourceKind.MISSING:
            raise SnapshotMissing(
                f"rank {fp.tp_rank}: "
                + missing_message(ref, options, daemon_running=used is not None)
            )
        check_before_copy(source, fp, options)
    results = _rpc(llm, "thaw_restore", options.to_config())
    ranks = tuple(RankTransfer(**r) for r in results)
    weights.remember(llm, {r.rank: r.content_id for r in ranks})
    # KV computed with the old weights must not serve the new ones: the engine's prefix
    # cache goes, and so does its KV connector's view (the thaw connector re-keys its store
    # by the weights the workers now report; thaw.engines.weights).
    try:
        llm.reset_prefix_cache(reset_connector=True)
    except TypeError:  # a vLLM without connector resets
        llm.reset_prefix_cache()
    return EngineTransfer(os.fspath(snapshot), ranks, time.perf_counter() - started)


def freeze(
    llm: Any,
    snapshot: str | os.PathLike[str],
    *,
    path: str | None = None,
    socket: str | None = None,
    daemon: str | None = None,
    labels: Mapping[str, str] | None = None,
    pin: bool | None = None,
) -> EngineTransfer:
    """Snapshot a live engine's weights, one snapshot per rank (pre-processing, vLLM names).

    A thawd name (thawd running) freezes into the daemon, written behind to `path` or its
    state directory; a path writes the file. See freeze_rank for packed (CPU) engines.
    """
    started = time.perf_counter()
    options = Options.of(
        snapshot,
        path=path,
        socket=socket,
        daemon=daemon,
        labels=dict(labels) if labels else None,
        pin=pin,
    )
    results = _rpc(llm, "thaw_freeze", options.to_config())
    ranks = tuple(RankTransfer(**r) for r in results)
    return EngineTransfer(os.fspath(snapshot), ranks, time.perf_counter() - started)


# Engine defaults for freeze_engine: the snapshot needs the weights, not a serving engine.
FREEZE_ENGINE_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,
    "max_model_len": 512,
    "kv_cache_memory_bytes": 64 << 20,
}


def freeze_engine_into(
    model: str,
    name: str,
    path: str,
    socket: str,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    labels: Mapping[str, str] | None = None,
    **engine_kwargs: Any,
) -> EngineTransfer:
    """Start vLLM on `model` and freeze each rank's weights into thawd at `socket` as `name`
    (a name per rank as rank_name gives them), which writes them behind to `path` (a file or
    an object URI, one per rank as rank_path names them) and keeps them pinned. What
    `thawctl freeze --engine vllm -o s3://...` calls; returns once thawd holds every rank."""
    from vllm import LLM

    llm = LLM(
        model=model,
        dtype=dtype,  # type: ignore[arg-type]
        tensor_parallel_size=tensor_parallel_size,
        worker_extension_cls=WORKER_EXTENSION,
        **{**FREEZE_ENGINE_DEFAULTS, **engine_kwargs},
    )
    try:
        return freeze(llm, name, path=path, socket=socket, daemon="require", labels=labels)
    finally:
        _shutdown(llm)


def freeze_engine(
    model: str,
    path: str,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    labels: Mapping[str, str] | None = None,
    **engine_kwargs: Any,
) -> list[str]:
    """Start vLLM on `model` and freeze each rank's weights to `path` (a file, "{rank}" or
    ".rankN" per rank as in docs/ENGINES.md); returns the files. What `thawctl freeze
    --engine vllm` calls. Existing rank files are replaced (thawctl asks for --force first).
    The engine loads through load_format="thaw" with freeze_on_miss, so the snapshot holds
    exactly what a thaw load will later restore."""
    from vllm import LLM

    paths = [
        os.path.abspath(rank_path(path, r, tensor_parallel_size))
        for r in range(tensor_parallel_size)
    ]
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)
    kwargs = {**FREEZE_ENGINE_DEFAULTS, **engine_kwargs}
    llm = LLM(
        model=model,
        dtype=dtype,  # type: ignore[arg-type]
        tensor_parallel_size=tensor_parallel_size,
        load_format="thaw",
        model_loader_extra_config={
            "snapshot": os.path.abspath(path),
            "freeze_on_miss": True,
            "daemon": "never",
            "labels": dict(labels or {}),
        },
        **kwargs,
    )
    try:
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise SnapshotMissing(f"the engine started but did not write {missing}")
    finally:
        _shutdown(llm)
    return paths


def _shutdown(llm: Any) -> None:
    """Stop the engine's core processes now, not when the object is collected."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
