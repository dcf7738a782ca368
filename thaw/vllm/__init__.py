"""thaw for vLLM: `load_format="thaw"`, in-place restore and freeze of a live `vllm.LLM`.

    LLM(model=..., load_format="thaw", model_loader_extra_config={"snapshot": "llama8b"})
    llm = LLM(model=..., worker_extension_cls=thaw.vllm.WORKER_EXTENSION)
    thaw.vllm.restore(llm, "llama8b")        # or thaw.connect().restore(llm, "llama8b")
    thaw.vllm.freeze(llm, "llama8b-ft")      # or thaw.connect().freeze(llm, "llama8b-ft")

Importing thaw.vllm does not import vllm (nor torch): the names below load on first use.
docs/ENGINES.md says what snapshots hold and how ranks find theirs.
"""

from typing import Any

from thaw.engines.options import Options
from thaw.engines.transfer import EngineTransfer, RankTransfer
from thaw.errors import EngineBusy, ExtensionMissing, SnapshotMissing, WorkerFailed

WORKER_EXTENSION = "thaw.vllm.worker.ThawWorkerExtension"

_LAZY = {
    "restore": "thaw.vllm.api",
    "freeze": "thaw.vllm.api",
    "freeze_engine": "thaw.vllm.api",
    "freeze_engine_into": "thaw.vllm.api",
    "fingerprints": "thaw.vllm.api",
    "is_llm": "thaw.vllm.api",
    "ThawModelLoader": "thaw.vllm.loader",
}

__all__ = [
    "WORKER_EXTENSION",
    "EngineBusy",
    "EngineTransfer",
    "ExtensionMissing",
    "Options",
    "RankTransfer",
    "SnapshotMissing",
    "WorkerFailed",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thaw.vllm' has no attribute {name!r}")
