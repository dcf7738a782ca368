"""Routing requests to slots: which engine serves a request, and when weights are swapped.

The rules (docs/SERVE.md, "Routing"):

1. Affinity: a slot that holds the model's weights serves it (vLLM batches requests that
   share a slot), unless the slot is draining or reserved for another model's swap.
2. Else the least recently used idle slot of the model's architecture is swapped to it.
3. Else the request waits in its model's bounded queue (full: `QueueFull`, HTTP 429 with
   Retry-After) and the least recently used busy slot of that architecture is reserved for
   it: it takes no new requests, and swaps once its last request in flight ends. Reserving
   is what keeps a stream of requests for one model from starving every other.

A slot's `model` is what its engine holds, set only after a restore returned; during a swap
and after a failed one it is "" and nothing is served from it. A swap starts only on a slot
with no request in flight (the engine's thread checks again: engine.py). All of this state
is touched only on the event loop, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import time
from collections.abc import Iterable
from typing import Any

from thawctl.serve.engine import Engine
from thawctl.serve.models import Architecture, Model, ModelError


class QueueFull(ModelError):
    """Too many requests already wait for this model: try again after `retry_after` s."""

    def __init__(self, model: str, depth: int, retry_after: int):
        super().__init__(f"{depth} requests already wait for model {model!r}; retry later",
                         429, "rate_limit_error")  # fmt: skip
        self.retry_after = retry_after


class SwapFailed(ModelError):
    def __init__(self, message: str):
        super().__init__(message, 502, "swap_error")


@dataclasses.dataclass
class Slot:
    """One engine and what the router knows of it."""

    index: int
    engine: Engine
    architecture: Architecture
    model: str = ""  # the weights it holds; "" while swapping, after a failure, or unknown
    in_flight: int = 0
    swapping_to: str = ""
    reserved_for: str = ""  # a model waiting for this slot to empty
    draining: bool = False
    last_used: float = 0.0
    swaps: int = 0
    swap_started: float = 0.0
    swap_ended: float = 0.0
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def state(self) -> str:
        if self.swapping_to:
            return "swapping"
        if self.draining:
            return "draining" if self.in_flight else "drained"
        if self.in_flight:
            return "busy"
        return "idle" if self.model else "empty"

    def takes(self, model: str) -> bool:
        """Whether a request for `model` may join this slot now."""
        return (self.model == model and not self.swapping_to and not self.draining
                and self.reserved_for in ("", model))  # fmt: skip


@dataclasses.dataclass
class Lease:
    """A request's hold on a slot that holds its model; `release()` exactly once."""

    pool: Pool
    slot: Slot
    queue_s: float  # waited for a slot, not counting the swap
    swap_s: float  # the part of its wait spent in the swap that loaded its model
    released: bool = False

    def release(self) -> None:
        """Idempotent: a stream's generator and its response may both end it."""
        if not self.released:
            self.released = True
            self.pool.release(self.slot)


@dataclasses.dataclass
class _Waiter:
    arrived: float
    future: asyncio.Future[Lease]


@dataclasses.dataclass(frozen=True)
class SwapRecord:
    slot: int
    model: str
    ok: bool
    seconds: float
    bytes: int
    tier: str
    ended: float  # time.time()


class Pool:
    """The slots, the models, the waiting requests; every decision of the module docstring."""

    def __init__(self, slots: Iterable[Slot], max_queue: int = 32) -> None:
        self.slots = list(slots)
        self.max_queue = max_queue
        self.models: dict[str, Model] = {}
        self.waiters: dict[str, collections.deque[_Waiter]] = {}
        self.swaps: collections.deque[SwapRecord] = collections.deque(maxlen=256)
        self.listeners: list[Any] = []  # metrics hooks: called with each SwapRecord
        self._tasks: set[asyncio.Task[None]] = set()
        for s in self.slots:
            s.idle.set()

    # --- models ------------------------------------------------------------------------

    def register(self, model: Model) -> None:
        if not model.architecture.known():
            raise ModelError(f"snapshot {model.snapshot!r} records no architecture "
                             "(frozen from bare tensors?): no slot can hold it", 422)  # fmt: skip
        if not any(s.architecture == model.architecture for s in self.slots):
            held = sorted({str(s.architecture) for s in self.slots})
            raise ModelError(f"no slot can hold model {model.name!r} ({model.architecture}); "
                             f"the pool's slots hold {held}", 422)  # fmt: skip
        old = self.models.get(model.name)
        if old is not None and old.snapshot != model.snapshot:
            self._forget_weights(model.name)
        self.models[model.name] = model
        self._schedule()

    def unregister(self, name: str) -> Model:
        model = self.models.pop(name, None)
        if model is None:
            raise ModelError(f"model {name!r} is not registered", 404, "not_found_error")
        self._forget_weights(name)
        for w in self.waiters.pop(name, collections.deque()):
            _fail(w.future, ModelError(f"model {name!r} was unregistered", 404,
                                       "not_found_error"))  # fmt: skip
        return model

    def _forget_weights(self, name: str) -> None:
        # Requests in flight finish on the weights they started with; no new one joins.
        for s in self.slots:
            if s.model == name:
                s.model = ""
            if s.reserved_for == name:
                s.reserved_for = ""

    def model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise ModelError(f"the model {name!r} does not exist (GET /v1/models lists them)",
                             404, "not_found_error")  # fmt: skip
        return model

    # --- requests ----------------------------------------------------------------------

    async def acquire(self, name: str) -> Lease:
        """A slot holding `name`'s weights, swapping one in if needed; raises ModelError."""
        model = self.model(name)
        arrived = time.monotonic()
        queue = self.waiters.setdefault(name, collections.deque())
        if not queue:
            for s in self._lru(s for s in self.slots if s.takes(name)):
                return self._admit(s, arrived)
        if len(queue) >= self.max_queue:
            raise QueueFull(name, len(queue), self.retry_after(model))
        waiter = _Waiter(arrived, asyncio.get_running_loop().create_future())
        queue.append(waiter)
        self._schedule()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter in queue:
                queue.remove(waiter)
                self._schedule()  # a reservation made for it alone is released
            elif waiter.future.done() and not waiter.future.cancelled() \
                    and waiter.future.exception() is None:  # fmt: skip
                waiter.future.result().release()  # admitted as the client left
            raise

    def release(self, slot: Slot) -> None:
        slot.in_flight -= 1
        slot.last_used = time.monotonic()
        if slot.in_flight == 0:
            slot.idle.set()
        self._schedule()

    def retry_after(self, model: Model) -> int:
        """Seconds until a place in the queue is likely: the recent swaps' mean, at least 1."""
        recent = [r.seconds for r in list(self.swaps)[-8:] if r.ok]
        return max(1, math.ceil(sum(recent) / len(recent))) if recent else 1

    def _admit(self, slot: Slot, arrived: float) -> Lease:
        slot.in_flight += 1
        slot.idle.clear()
        slot.last_used = now = time.monotonic()
        swap_s = 0.0
        if slot.swap_ended >= arrived:  # this request waited for the swap that loaded it
            swap_s = slot.swap_ended - max(slot.swap_started, arrived)
        return Lease(self, slot, max(0.0, now - arrived - swap_s), swap_s)

    @staticmethod
    def _lru(slots: Iterable[Slot]) -> list[Slot]:
        return sorted(slots, key=lambda s: s.last_used)

    def _schedule(self) -> None:
        """Admit whom can be admitted, start the swaps that can start: oldest waiter first."""
        # A reservation outlives no one: if every request it was made for left (or was
        # served), the slot takes requests for the model it holds again.
        for s in self.slots:
            if s.reserved_for and not self.waiters.get(s.reserved_for):
                s.reserved_for = ""
        pending = sorted(((q[0].arrived, name) for name, q in self.waiters.items() if q))
        for _, name in pending:
            queue = self.waiters[name]
            model = self.models.get(name)
            if model is None:
                continue
            ready = self._lru(s for s in self.slots if s.takes(name))
            if ready:
                while queue:
                    w = queue.popleft()
                    # A waiter whose client left is skipped: no slot may count a request
                    # that will never release it.
                    if not w.future.done():
                        w.future.set_result(self._admit(ready[0], w.arrived))
                continue
            if any(s.swapping_to == name for s in self.slots):
                continue  # on its way
            fits = [s for s in self.slots if s.architecture == model.architecture
                    and not s.draining and not s.swapping_to
                    and s.reserved_for in ("", name)]  # fmt: skip
            idle = self._lru(s for s in fits if s.in_flight == 0)
            if idle:
                self._start_swap(idle[0], model)
            elif not any(s.reserved_for == name for s in self.slots):
                free = self._lru(s for s in fits if not s.reserved_for)
                if free:
                    free[0].reserved_for = name

    def _start_swap(self, slot: Slot, model: Model) -> None:
        slot.swapping_to = model.name
        slot.reserved_for = ""
        slot.model = ""
        task = asyncio.get_running_loop().create_task(self._swap(slot, model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _swap(self, slot: Slot, model: Model) -> None:
        slot.swap_started = time.monotonic()
        ok, nbytes, tier = False, 0, ""
        try:
            transfer = await slot.engine.swap(model.name, model.snapshot)
            ok, nbytes, tier = True, transfer.bytes, transfer.tier
        except Exception as e:
            for w in self.waiters.pop(model.name, collections.deque()):
                _fail(w.future, SwapFailed(f"swapping model {model.name!r} into slot "
                                           f"{slot.index} failed: {e}"))  # fmt: skip
        finally:
            slot.swap_ended = time.monotonic()
            slot.swapping_to = ""
            slot.swaps += 1
            if ok and self.models.get(model.name) == model:  # not unregistered meanwhile
                slot.model = model.name
            record = SwapRecord(slot.index, model.name, ok, slot.swap_ended - slot.swap_started,
                                nbytes, tier, time.time())  # fmt: skip
            self.swaps.append(record)
            for listener in self.listeners:
                listener(record)
            self._schedule()

    # --- the operator's -----------------------------------------------------------------

    def slot(self, index: int) -> Slot:
        if not 0 <= index < len(self.slots):
            raise ModelError(f"no slot {index} (the pool has {len(self.slots)})", 404,
                             "not_found_error")  # fmt: skip
        return self.slots[index]

    async def drain(self, index: int, timeout: float) -> Slot:
        """Stop sending requests to a slot and wait (at most `timeout` s) for its last one."""
        slot = self.slot(index)
        slot.draining = True
        slot.reserved_for = ""
        self._schedule()
        with contextlib.suppress(asyncio.TimeoutError):  # 3.10: not the builtin yet
            await asyncio.wait_for(slot.idle.wait(), timeout)
        return slot

    def resume(self, index: int) -> Slot:
        slot = self.slot(index)
        slot.draining = False
        self._schedule()
        return slot

    def swaps_per_minute(self) -> int:
        since = time.time() - 60
        return sum(1 for r in self.swaps if r.ended >= since)

    def status(self) -> dict[str, Any]:
        """The pool as plain data: GET /admin/pool, `thawctl top`'s pool view."""
        return {
            "slots": [
                {
                    "slot": s.index,
                    "state": s.state,
                    "model": s.model or s.swapping_to or "",
                    "architecture": str(s.architecture),
                    "in_flight": s.in_flight,
                    "reserved_for": s.reserved_for,
                    "swaps": s.swaps,
                }
                for s in self.slots
            ],
            "models": [
                {
                    "name": m.name,
                    "snapshot": m.snapshot,
                    "architecture": str(m.architecture),
                    "slots": [s.index for s in self.slots if s.model == m.name],
                    "queue": len(self.waiters.get(m.name, ())),
                }
                for m in self.models.values()
            ],
            "max_queue": self.max_queue,
            "swaps_per_minute": self.swaps_per_minute(),
            "last_swaps": [dataclasses.asdict(r) for r in list(self.swaps)[-8:]],
        }


def _fail(fut: asyncio.Future[Lease], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
