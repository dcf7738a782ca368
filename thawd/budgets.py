"""The pinned and warm memory budgets: what is used, what is promised, and making room.

Used = bytes held by entries (pool buffers, warm mappings) + freeze buffers being filled +
bytes promised to pins in progress. A promise is taken before the first await of a pin, so
concurrent pins never both see the same free bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from thaw.errors import BudgetExceeded
from thawd.buffers import VmmArena, round_size
from thawd.entries import Entry


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class Budgets:
    def __init__(
        self,
        limits: Callable[[], tuple[int, int]],
        entries: Iterable[Entry],
        freezing: Callable[[], int],
        arena: VmmArena | None,
        on_demote: Callable[[Entry, str], None],
    ) -> None:
        """`limits()`: the (pinned, warm) budgets now (a reload may change them);
        `freezing()`: bytes of freeze buffers being filled; `on_demote(entry, why)`: an entry
        was dropped to cold to make room."""
        self._limits = limits
        self._entries = entries
        self._freezing = freezing
        self._arena = arena
        self._on_demote = on_demote
        self.promised = {"pinned": 0, "warm": 0}

    def size(self, tier: str, payload: int) -> int:
        """Bytes of `tier`'s budget a payload of `payload` bytes takes."""
        if tier == "pinned" and self._arena is not None:
            return self._arena.size_for(payload)
        return round_size(payload)

    def limit(self, tier: str) -> int:
        pinned, warm = self._limits()
        return pinned if tier == "pinned" else warm

    def used(self, tier: str) -> int:
        if tier == "pinned":
            held = sum(e.pool.size for e in self._entries if e.pool is not None)
            return self.promised["pinned"] + held + self._freezing()
        return self.promised["warm"] + sum(e.warm.size for e in self._entries if e.warm)

    def promise(self, tier: str, size: int, for_name: str) -> None:
        """Make room for `size` bytes of `tier` (demoting idle entries held above their wanted
        tier, least recently used first) and promise them; `keep` gives them back."""
        self.make_room(tier, size, for_name)
        self.promised[tier] += size

    def keep(self, tier: str, size: int) -> None:
        """A promise ends: the bytes are now held by an entry, or were never used."""
        self.promised[tier] -= size

    def make_room(self, tier: str, size: int, for_name: str) -> None:
        budget = self.limit(tier)
        if size > budget:
            raise BudgetExceeded(
                f"{for_name!r} needs {human(size)} ({size} bytes) but the {tier} budget is "
                f"{human(budget)} ({budget} bytes): raise {tier}_budget in the thawd config"
            )
        while self.used(tier) + size > budget:
            victims = [e for e in self._entries if e.tier == tier and e.demotable]
            if not victims:
                in_use = self.used(tier)
                raise BudgetExceeded(
                    f"{for_name!r} needs {human(size)} ({size} bytes); the {tier} budget is "
                    f"{human(budget)} ({budget} bytes) with {human(in_use)} ({in_use} bytes) in "
                    f"use and {human(max(0, budget - in_use))} free, and nothing idle to demote: "
                    f"unpin a snapshot or raise {tier}_budget"
                )
            victim = min(victims, key=lambda e: e.row.last_used)
            victim.release()
            self._on_demote(victim, f"{tier} -> cold for {for_name}")
