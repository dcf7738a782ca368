"""`load_format="thaw"`: a vLLM model loader that fills a freshly built model from a snapshot.

    LLM(model=..., load_format="thaw",
        model_loader_extra_config={"snapshot": "llama8b", "path": "/snapshots/llama8b.thaw"})
    vllm serve MODEL --load-format thaw --model-loader-extra-config '{"snapshot": "llama8b"}'

Runs in each worker (registered there by the `vllm.general_plugins` entry point). Each rank
restores its own snapshot (see thaw.engines.ranks.resolve) into the model's parameters *before*
process_weights_after_loading, which then packs/repacks as after a normal load.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from thaw.engines import weights
from thaw.engines.options import Options
from thaw.engines.ranks import resolve
from thaw.engines.sources import SourceKind, client_for, locate
from thaw.engines.transfer import RankTransfer, read_rank, write_rank
from thaw.vllm import model as vmodel

# Under "vllm." so that vLLM's log handlers (and format, and VLLM_LOGGING_LEVEL) apply.
logger = init_logger("vllm.thaw")

# The last load of this process: source and timing, for the benchmark and for freeze (which
# must know where packed weights came from). Keyed by id(model).
LOADS: dict[int, dict[str, Any]] = {}


class ThawModelLoader(BaseModelLoader):
    """Loads per-rank, vLLM-named, pre-processing weights from thawd or a snapshot file."""

    def __init__(self, load_config: Any) -> None:
        super().__init__(load_config)
        self.options = Options.from_config(load_config.model_loader_extra_config)
        self._vllm_config: Any = None

    def _default(self) -> DefaultModelLoader:
        import dataclasses

        return DefaultModelLoader(
            dataclasses.replace(self.load_config, load_format="auto", model_loader_extra_config={})
        )

    def download_model(self, model_config: Any) -> None:
        if self.options.freeze_on_miss:
            self._default().download_model(model_config)

    def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> torch.nn.Module:
        self._vllm_config = vllm_config
        # Connect before the model is built: in a CUDA worker, connect() maps thawd's pool in
        # the background while vLLM builds the model, and the restore then maps nothing.
        client_for(self.options)
        return super().load_model(vllm_config, model_config, prefix)

    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        from vllm.config import get_current_vllm_config

        vllm_config = self._vllm_config or get_current_vllm_config()
        started = time.perf_counter()
        rank, size = vmodel.tp_rank_size(vllm_config)
        ref = resolve(self.options, rank, size)
        named = vmodel.parameters(model)
        specs = {n: (tuple(t.shape), t.dtype) for n, t in named}
        expect = vmodel.fingerprint(vllm_config, specs, dict(self.options.labels))
        source, client = locate(ref, self.options)
        if source.kind == SourceKind.MISSING and self.options.freeze_on_miss:
            logger.info("thaw: %s not found; loading the checkpoint and freezing it", ref.label)
            self._default().load_weights(model, model_config)
            loaded = time.perf_counter() - started
            frozen = write_rank(named, ref, self.options, expect, rank, source_kind="checkpoint")
            weights.loaded(frozen.content_id)
            LOADS[id(model)] = {
                "source": {"kind": "checkpoint"},
                "load_s": loaded,
                "freeze": frozen.to_dict(),
            }
            return
        result: RankTransfer = read_rank(named, ref, self.options, expect, rank, source, client)
        weights.loaded(result.content_id)  # KV from other weights must not serve this model
        LOADS[id(model)] = {
            "source": {
                "kind": result.source,
                "name": source.name,
                "path": source.path,
                "options": self.options.to_config(),
            },
            "load_s": time.perf_counter() - started,
            "restore": result.to_dict(),
        }
        logger.info(
            "thaw: rank %d loaded %s from %s (%s); loading weights took %.4f seconds",
            rank,
            ref.label,
            result.source,
            result.tier,
            result.seconds,
        )
