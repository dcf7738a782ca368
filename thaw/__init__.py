"""thaw: fast snapshot and restore of LLM weights.

    import thaw
    thaw.freeze_file(model, "model.thaw")          # snapshot a torch module
    thaw.restore_file(model, "model.thaw")         # restore it into a model of the same shape
    thaw.connect().restore(model, "llama8b")       # restore from thawd's pinned memory

Importing thaw does not import torch: the daemon and tools that only read manifests start fast.
"""

from typing import Any

from thaw.errors import *  # noqa: F403
from thaw.format import open_snapshot
from thaw.format.fingerprint import Fingerprint

__version__ = "0.1.0"

# name -> module that defines it, imported on first use (they import torch).
_LAZY = {
    "freeze_file": "thaw.copy.freeze",
    "restore_file": "thaw.copy.restore",
    "TransferStats": "thaw.copy.restore",
    "connect": "thaw.client",
    "fork": "thaw.kv.api",
}

__all__ = ["Fingerprint", "__version__", "open_snapshot", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thaw' has no attribute {name!r}")
