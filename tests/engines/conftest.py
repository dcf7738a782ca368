"""Fixtures for the engine integration tests: the tiny model's directories, a real thawd
(tests/daemon's ThawdProcess), and real vLLM CPU engines shared per module
(each start costs 30-50 s on the 2-core CI box)."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


# What every test engine uses (docs/VLLM_NOTES.md §0): float32 (bf16 SIGILLs this CPU), no
# CUDA graphs, a fixed 64 MiB KV cache (which also skips the warm-up forward).
ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 2048,
    "kv_cache_memory_bytes": 64 << 20,
    "seed": 0,
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Seed-0 and seed-1 tiny Llamas, both in directories named `tiny` (the fingerprint's
    model), so the seed-1 weights stand for a fine-tune of the same model."""
    from thaw.demo import tiny

    base = tmp_path_factory.mktemp("models")
    return {s: tiny.write_model_dir(base / f"seed{s}" / "tiny", seed=s) for s in (0, 1)}


def shutdown(llm: Any) -> None:
    """Stop an engine's processes now rather than at garbage collection."""
    core = getattr(llm.llm_engine, "engine_core", None)
    with contextlib.suppress(Exception):
        if core is not None:
            core.shutdown()
    del llm
    gc.collect()
