"""thaw.sglang's engine adapter: what `thaw.connect().restore(engine, name)` calls for a live
`sglang.Engine` (thaw.engines.adapter). NOT RUN against a real SGLang (docs/ENGINES.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

from thaw.engines.adapter import is_instance_of
from thaw.engines.transfer import EngineTransfer

if TYPE_CHECKING:
    from thaw.daemon.client import Client


class SGLangAdapter:
    name = "sglang"

    def accepts(self, target: object) -> bool:
        return is_instance_of(target, "sglang", "Engine")

    def restore(self, target: object, snapshot: str, *, client: Client) -> EngineTransfer:
        from thaw.sglang import engine

        return engine.restore(
            target, snapshot, socket=client.socket, daemon="require", client=client
        )

    def freeze(
        self,
        target: object,
        snapshot: str,
        *,
        client: Client,
        path: str | None,
        labels: Mapping[str, str] | None,
        pin: bool,
    ) -> NoReturn:
        from thaw.sglang import engine

        engine.freeze(target, snapshot)  # raises: SGLang exposes no full read of its weights


ADAPTER = SGLangAdapter()
