"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts
(the LLM process, the engine core, each worker)."""

from __future__ import annotations


def register() -> None:
    """Register load_format="thaw". Idempotent; imports vLLM's loader registry only here."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

    from thaw.vllm.loader import ThawModelLoader

    if _LOAD_FORMAT_TO_MODEL_LOADER.get("thaw") is not ThawModelLoader:
        register_model_loader("thaw")(ThawModelLoader)
