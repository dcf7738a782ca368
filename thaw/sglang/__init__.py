"""thaw for SGLang (0.5.23): a loader class for `load_format=` and restore into a running
`sglang.Engine`. NOT RUN against a real SGLang (it needs CUDA kernels; see docs/ENGINES.md):
only the engine-independent logic is tested. Importing this module imports neither sglang
nor torch.

    from thaw.sglang import ThawSGLangLoader
    engine = sglang.Engine(model_path=..., load_format=ThawSGLangLoader,
                           model_loader_extra_config={"snapshot": "llama8b"})
    thaw.sglang.restore(engine, "llama8b-ft")
"""

from typing import Any

from thaw.sglang.core import ENGINE, batches, per_rank_named_tensors

_LAZY = {
    "ThawSGLangLoader": "thaw.sglang.loader",
    "restore": "thaw.sglang.engine",
    "freeze": "thaw.sglang.engine",
    "freeze_engine": "thaw.sglang.engine",
}

__all__ = ["ENGINE", "batches", "per_rank_named_tensors", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thaw.sglang' has no attribute {name!r}")
