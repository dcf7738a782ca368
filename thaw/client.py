"""`thaw.connect()`: the client an application holds.

    import thaw
    c = thaw.connect()                 # $THAW_SOCKET, /run/thawd/thawd.sock, $XDG_RUNTIME_DIR/thawd
    c.pin("llama8b", progress=print)
    c.restore(model, "llama8b")        # checks names, dtypes, shapes before a byte moves
    c.restore(llm, "llama8b-ft")       # a live vllm.LLM: every rank, through its workers

The top of the client library: a thaw.daemon.Client (records, pins, restores and freezes of
tensors) that also takes a live engine wherever it takes a model, handing it to that engine's
adapter (thaw.engines.adapter): the engines sit below this module and never import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, overload

from thaw.daemon import client as daemon
from thaw.daemon.client import default_socket

if TYPE_CHECKING:  # a restore of tensors imports no engine module (7 ms on the H200 host)
    import torch

    from thaw.daemon.records import RestoreResult, SnapshotRecord
    from thaw.engines.adapter import EngineAdapter
    from thaw.engines.transfer import EngineTransfer
    from thaw.format.fingerprint import Fingerprint

__all__ = ["Client", "connect", "default_socket"]

# What restore and freeze move without an engine: a torch module, a state dict, (name, tensor)
# pairs; for these they return the daemon's records.
Tensors: TypeAlias = (
    "torch.nn.Module | Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]"
)


# The engine packages whose objects restore and freeze accept, by the top-level package of the
# object's classes: a target of no engine (tensors, a torch module, every restore of an engine's
# own workers) imports no integration (7 ms of imports on a new process's first restore).
ENGINES = ("vllm", "sglang")


def adapter_for(target: object) -> EngineAdapter | None:
    """The adapter of the engine `target` belongs to; None for tensors and torch modules."""
    packages = {c.__module__.partition(".")[0] for c in type(target).__mro__}
    for engine in ENGINES:
        if engine in packages:
            adapter: EngineAdapter = importlib.import_module(f"thaw.{engine}.adapter").ADAPTER
            if adapter.accepts(target):
                return adapter
    return None


class Client(daemon.Client):
    """A connection to thawd (thaw.daemon.Client) whose restore and freeze also take a live
    engine. Thread-safe; close() (or `with`) releases sockets and mappings."""

    @overload
    def restore(
        self,
        target: Tensors,
        name: str,
        *,
        strict: bool = True,
        expect: Fingerprint | None = None,
        progress: Callable[[int, int], None] | None = None,
        mode: str | None = None,
    ) -> RestoreResult: ...

    @overload
    def restore(
        self,
        target: object,
        name: str,
        *,
        strict: bool = True,
        expect: Fingerprint | None = None,
        progress: Callable[[int, int], None] | None = None,
        mode: str | None = None,
    ) -> RestoreResult | EngineTransfer: ...

    def restore(
        self,
        target: Any,
        name: str,
        *,
        strict: bool = True,
        expect: Fingerprint | None = None,
        progress: Callable[[int, int], None] | None = None,
        mode: str | None = None,
    ) -> RestoreResult | EngineTransfer:
        """Restore `target` from snapshot `name`: a torch module, a state dict or (name, tensor)
        pairs (see restore_tensors: names, dtypes and shapes are checked before a byte moves),
        or a live engine (a `vllm.LLM`: every rank's snapshot is found and its fingerprint
        checked here, then the workers restore in place; see thaw.vllm.restore)."""
        adapter = adapter_for(target)
        if adapter is not None:
            return adapter.restore(target, name, client=self)
        return self.restore_tensors(
            target, name, strict=strict, expect=expect, progress=progress, mode=mode
        )

    @overload
    def freeze(
        self,
        target: Tensors,
        name: str,
        path: str | None = None,
        fingerprint: Fingerprint | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        pin: bool = True,
        wait: bool = False,
    ) -> SnapshotRecord: ...

    @overload
    def freeze(
        self,
        target: object,
        name: str,
        path: str | None = None,
        fingerprint: Fingerprint | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        pin: bool = True,
        wait: bool = False,
    ) -> SnapshotRecord | EngineTransfer: ...

    def freeze(
        self,
        target: Any,
        name: str,
        path: str | None = None,
        fingerprint: Fingerprint | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        pin: bool = True,
        wait: bool = False,
    ) -> SnapshotRecord | EngineTransfer:
        """Freeze `target` into a new snapshot held by thawd and written behind: tensors (see
        freeze_tensors), or a live engine, one snapshot per rank frozen by its workers."""
        adapter = adapter_for(target)
        if adapter is not None:
            return adapter.freeze(target, name, client=self, path=path, labels=labels, pin=pin)
        return self.freeze_tensors(
            target, name, path, fingerprint, labels=labels, pin=pin, wait=wait
        )


def connect(socket: str | None = None, *, timeout: float = 30.0) -> Client:
    """Connect to the local thawd; raises DaemonUnavailable (with how to start it) if none runs."""
    client = Client(socket or default_socket(), timeout=timeout)
    daemon.prepare(client)
    return client
