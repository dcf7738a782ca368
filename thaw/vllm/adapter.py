"""thaw.vllm's engine adapter: what `thaw.connect().restore(llm, name)` and `.freeze(llm, name)`
call for a live `vllm.LLM` (thaw.engines.adapter)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from thaw.engines.transfer import EngineTransfer

if TYPE_CHECKING:
    from thaw.daemon.client import Client


class VllmAdapter:
    name = "vllm"

    def accepts(self, target: object) -> bool:
        from thaw.vllm.api import is_llm

        return is_llm(target)

    def restore(self, target: object, snapshot: str, *, client: Client) -> EngineTransfer:
        from thaw.vllm import api

        return api.restore(target, snapshot, socket=client.socket, daemon="require", client=client)

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
        from thaw.vllm import api

        return api.freeze(
            target,
            snapshot,
            path=path,
            socket=client.socket,
            daemon="require",
            labels=labels,
            pin=pin,
        )


ADAPTER = VllmAdapter()
