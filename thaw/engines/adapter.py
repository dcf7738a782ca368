"""The adapter protocol: what `thaw.connect().restore(engine, name)` and `.freeze(engine, name)`
call for a live engine object. Each engine integration (thaw.vllm, thaw.sglang) provides one
that recognises its engine's objects without importing the engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from thaw.engines.transfer import EngineTransfer

if TYPE_CHECKING:
    from thaw.daemon.client import Client


class EngineAdapter(Protocol):
    """Restore into and freeze from a live engine, every rank, through the engine's own API."""

    name: str

    def accepts(self, target: object) -> bool:
        """True for this engine's objects (recognised by class, without importing it)."""
        ...

    def restore(self, target: object, snapshot: str, *, client: Client) -> EngineTransfer:
        """Swap the engine's weights for `snapshot`'s, in place; `client` answers the checks
        made in this process."""
        ...

    def freeze(
        self,
        target: object,
        snapshot: str,
        *,
        client: Client,
        path: str | None,
        labels: Mapping[str, str] | None,
        pin: bool,
    ) -> EngineTransfer:
        """Snapshot the engine's weights, one snapshot per rank, into thawd."""
        ...


def is_instance_of(target: object, module: str, cls: str) -> bool:
    """`target` is a `module`.`cls` (or a subclass), found without importing `module`."""
    return any(
        c.__name__ == cls and c.__module__.startswith(module + ".") for c in type(target).__mro__
    )
