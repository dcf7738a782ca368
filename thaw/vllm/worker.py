"""What each vLLM worker runs for thaw: `ThawWorkerExtension`, mixed into the worker class with

    LLM(..., worker_extension_cls="thaw.vllm.worker.ThawWorkerExtension")

and called by thaw.vllm.restore/freeze through `llm.collective_rpc("thaw_restore", ...)`. The
module-level `restore_rank`/`freeze_rank`/`fingerprint_rank` take the worker as their first
argument, so they also work as collective_rpc callables (VLLM_ALLOW_INSECURE_SERIALIZATION=1).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from thaw.engines import weights
from thaw.engines.options import Options
from thaw.engines.ranks import resolve
from thaw.engines.sources import SourceKind, check_before_copy, locate
from thaw.engines.transfer import RankTransfer, read_rank, write_rank
from thaw.errors import SnapshotMissing
from thaw.vllm import WORKER_EXTENSION
from thaw.vllm import model as vmodel


def _model(worker: Any) -> torch.nn.Module:
    return worker.model_runner.get_model()


def _device(worker: Any) -> torch.device:
    return torch.device(worker.vllm_config.device_config.device)


def fingerprint_rank(worker: Any, labels: dict[str, str] | None = None) -> dict[str, Any]:
    model = _model(worker)
    return vmodel.fingerprint(
        worker.vllm_config, vmodel.preprocessing_specs(model), labels
    ).to_json()


def restore_rank(worker: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Restore this rank's snapshot into the live model (fingerprint checked first)."""
    options = Options.from_config(config)
    vllm_config = worker.vllm_config
    model = _model(worker)
    rank, size = vmodel.tp_rank_size(vllm_config)
    ref = resolve(options, rank, size)
    specs = vmodel.preprocessing_specs(model)
    expect = vmodel.fingerprint(vllm_config, specs)
    source, client = locate(ref, options)
    if source.kind == SourceKind.MISSING:
        raise SnapshotMissing(f"rank {rank}: snapshot {ref.label!r} not found")
    check_before_copy(source, expect, options)  # before a byte moves or memory is taken
    started = time.perf_counter()
    # The snapshot lands in fresh pre-processing tensors, then vLLM's layerwise reload copies
    # them into the model layer by layer and re-processes them (transiently one more copy of
    # this rank's weights).
    staging = vmodel.empty_like_specs(specs, _device(worker))
    result = read_rank(staging, ref, options, expect, rank, source, client)
    vmodel.reload_in_place(vllm_config, model, staging)
    del staging
    weights.loaded(result.content_id)  # the KV connector keys this rank's KV by it from now on
    runner = worker.model_runner
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        if hasattr(runner, reset):
            getattr(runner, reset)()
    from thaw.vllm.loader import LOADS

    LOADS[id(model)] = {
        "source": {
            "kind": result.source,
            "name": source.name,
            "path": source.path,
            "options": options.to_config(),
        }
    }
    out = result.to_dict()
    out["seconds"] = time.perf_counter() - started
    return out


def freeze_rank(worker: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Freeze this rank's weights, pre-processing and vLLM-named, to its snapshot.

    Where the live parameters still have their pre-processing layout (GPU, unquantized) they
    are written directly. Where they were packed (CPU oneDNN, quantization kernels) they cannot
    be read back: the pre-processing weights are rebuilt from where this model's weights came
    from — the snapshot it was loaded or last restored from, or its checkpoint through vLLM's
    default loader into an unprocessed copy of the model.
    """
    options = Options.from_config(config)
    vllm_config = worker.vllm_config
    model = _model(worker)
    rank, size = vmodel.tp_rank_size(vllm_config)
    ref = resolve(options, rank, size)
    specs = vmodel.preprocessing_specs(model)
    fp = vmodel.fingerprint(vllm_config, specs, dict(options.labels))
    if not vmodel.is_packed(model, specs) and not vllm_config.model_config.quantization:
        named = [(n, t) for n, t in vmodel.parameters(model) if n in specs]
        return write_rank(named, ref, options, fp, rank, source_kind="engine").to_dict()
    from thaw.vllm.loader import LOADS

    origin = LOADS.get(id(model), {}).get("source", {"kind": "checkpoint"})
    if origin["kind"] in ("thawd", "file"):
        prev = Options.from_config(origin["options"])
        src_ref = resolve(prev, rank, size)
        staging = vmodel.empty_like_specs(specs, torch.device("cpu"))
        src_fp = vmodel.fingerprint(vllm_config, specs)
        read_rank(staging, src_ref, prev, src_fp, rank)
        result = write_rank(staging, ref, options, fp, rank, source_kind=origin["kind"])
        return result.to_dict()
    with vmodel.skeleton(vllm_config, _device(worker)) as skel:
        named = vmodel.parameters(skel)
        result = write_rank(named, ref, options, fp, rank, source_kind="checkpoint")
    return result.to_dict()


class ThawWorkerExtension:
    """Mixed into vLLM's worker class: thaw's per-rank operations, reachable by name through
    `llm.collective_rpc` with no insecure serialization."""

    def thaw_restore(self, config: dict[str, Any]) -> dict[str, Any]:
        return restore_rank(self, config)

    def thaw_freeze(self, config: dict[str, Any]) -> dict[str, Any]:
        return freeze_rank(self, config)

    def thaw_fingerprint(self, labels: dict[str, str] | None = None) -> dict[str, Any]:
        return fingerprint_rank(self, labels)


__all__ = ["WORKER_EXTENSION", "RankTransfer", "ThawWorkerExtension"]
