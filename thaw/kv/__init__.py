"""KV-cache snapshots for vLLM through thawd: a KV connector, capture/restore, fork.

    import thaw.kv
    llm = LLM(model=..., kv_transfer_config=thaw.kv.kv_transfer_config(socket=...))
    prefix = thaw.kv.fork(llm, "session-1", session_prompt)   # capture once
    prefix.restore(other_llm)                                 # another engine skips prefill

See docs/KV.md. Importing thaw.kv imports neither torch nor vLLM; the names load on use.
"""

from typing import Any

_LAZY = {
    "kv_transfer_config": "thaw.kv.api",
    "capture": "thaw.kv.api",
    "restore": "thaw.kv.api",
    "fork": "thaw.kv.api",
    "KVPrefix": "thaw.kv.api",
    "engine_spec": "thaw.kv.api",
    "KVSpec": "thaw.kv.store",
    "KVStore": "thaw.kv.store",
    "ThawKVConnector": "thaw.kv.connector",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thaw.kv' has no attribute {name!r}")
