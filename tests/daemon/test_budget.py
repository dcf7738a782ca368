"""Budgets are never exceeded: idle demotable entries go LRU first, otherwise a clear refusal."""

from __future__ import annotations

import re

import pytest
import torch

from tests.daemon.conftest import ThawdProcess, write_snapshot
from thaw import errors
from thaw.client import connect


def big(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(768, 1024, generator=g)}  # 3 MiB -> a 4 MiB pool buffer


def test_budget_exhaustion_and_lru_demotion(thawd_factory: object) -> None:
    daemon: ThawdProcess = thawd_factory(pinned_budget="8MiB")  # type: ignore[operator]
    with connect(daemon.socket) as c:
        for i in range(3):
            c.register(write_snapshot(daemon.dir / f"s{i}.thaw", big(i)), f"s{i}")
        c.pin("s0")
        c.pin("s1")
        with pytest.raises(errors.BudgetExceeded) as info:
            c.pin("s2")
        message = str(info.value)
        assert "'s2' needs 4.00 MiB (4194304 bytes)" in message
        assert "8.00 MiB (8388608 bytes)" in message and "(8388608 bytes) in use" in message
        assert c.status().pinned_used == 8 << 20
        assert c.stat("s2").tier == "cold"
        # A freeze kept pinned=False is demotable; once written, it is evicted for a pin.
        c.unpin("s1")
        c.freeze(big(9), "cache", pin=False, wait=True)
        c.pin("s2")
        assert c.stat("cache").tier == "cold" and c.stat("s2").tier == "pinned"
        assert c.status().pinned_used <= 8 << 20
        with pytest.raises(errors.BudgetExceeded, match=re.escape("raise pinned_budget")):
            c.freeze({"huge": torch.zeros(3 << 20)}, "huge")
