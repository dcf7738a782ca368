"""The pool as `thawctl top` sees it: immutable records read from a running `thawctl serve`'s
admin socket (GET /pool). The dashboard renders these; it never reaches into a server."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class SlotView:
    slot: int
    state: str  # idle, busy, swapping, draining, drained, empty
    model: str  # held, or being swapped in ("" none)
    in_flight: int
    swaps: int


@dataclasses.dataclass(frozen=True)
class PoolView:
    slots: tuple[SlotView, ...]
    queue: Mapping[str, int]  # waiting requests per model
    swaps_per_minute: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PoolView:
        slots = tuple(
            SlotView(
                int(s["slot"]),
                str(s["state"]),
                str(s["model"]),
                int(s["in_flight"]),
                int(s["swaps"]),
            )
            for s in data["slots"]
        )
        queue = {str(m["name"]): int(m["queue"]) for m in data["models"]}
        return cls(slots, queue, int(data["swaps_per_minute"]))


def fetch(admin_socket: str, timeout: float = 5.0) -> PoolView:
    """One GET /pool over the admin socket (blocking: call it from a thread)."""
    import httpx

    transport = httpx.HTTPTransport(uds=admin_socket)
    with httpx.Client(transport=transport, base_url="http://serve", timeout=timeout) as c:
        r = c.get("/pool")
        r.raise_for_status()
        return PoolView.from_json(r.json())
