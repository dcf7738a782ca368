"""thaw: fast snapshot and restore of LLM weights.

import thaw
thaw.freeze_file(model, "model.thaw")          # snapshot a torch module
thaw.restore_file(model, "model.thaw")         # restore it into a model of the same shape
thaw.connect().restore(model, "llama8b")       # restore from thawd's pinned memory
"""

from thaw.errors import *  # noqa: F403
from thaw.fingerprint import Fingerprint
from thaw.format import open_snapshot
from thaw.freeze import freeze_file
from thaw.restore import TransferStats, restore_file

__version__ = "0.1.0"

__all__ = [
    "Fingerprint",
    "TransferStats",
    "__version__",
    "freeze_file",
    "open_snapshot",
    "restore_file",
]


def connect(socket: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Connect to the local thawd (see thaw.client.connect)."""
    from thaw.client import connect as _connect

    return _connect(socket, **kwargs)
