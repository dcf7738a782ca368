"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts
(the LLM process, the engine core, each worker)."""

from __future__ import annotations

import functools
from typing import Any


def register() -> None:
    """Register load_format="thaw" and its check in the engine's creating process.
    Idempotent; imports vLLM's loader registry only here."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

    from thaw.vllm.loader import ThawModelLoader

    if _LOAD_FORMAT_TO_MODEL_LOADER.get("thaw") is not ThawModelLoader:
        register_model_loader("thaw")(ThawModelLoader)
    _check_before_the_engine_starts()


def _check_before_the_engine_starts() -> None:
    """Have `EngineArgs.create_load_config` run thaw.engines.sources.preflight for
    load_format="thaw". vLLM calls it in the process that creates the engine (`LLM(...)`,
    the API server), before the engine core and its workers start; a loader is only built in
    the workers, where a missing snapshot would surface after the engine's start-up as
    "Engine core initialization failed". Where a vLLM lacks the method, the workers' own
    check stands."""
    from vllm.engine.arg_utils import EngineArgs

    original = getattr(EngineArgs, "create_load_config", None)
    if original is None or getattr(original, "thaw_preflight", False):
        return

    @functools.wraps(original)
    def create_load_config(self: Any) -> Any:
        config = original(self)
        if config.load_format == "thaw":
            from thaw.engines.options import Options
            from thaw.engines.sources import preflight

            options = Options.from_config(config.model_loader_extra_config)
            preflight(options, self.tensor_parallel_size)
        return config

    create_load_config.thaw_preflight = True  # type: ignore[attr-defined]
    EngineArgs.create_load_config = create_load_config  # type: ignore[method-assign]
