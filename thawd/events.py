"""The event bus behind Watch: every subscriber gets every event, slow ones lose the oldest.

Listeners (the restore summary, the metrics) see each event as it is published, in order and
without loss, on the event loop: they must only count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from thaw._proto import thawd_pb2 as pb

log = logging.getLogger("thawd.events")
QUEUE_DEPTH = 1024
# One line per restore would drown the journal (logs.RestoreSummary counts them instead).
DEBUG_KINDS = frozenset({"restore_started", "restore_finished"})


def level(kind: str) -> int:
    if kind in DEBUG_KINDS:
        return logging.DEBUG
    if kind.endswith("_failed"):  # restore_failed, pin_failed, verify_failed, freeze_failed
        return logging.WARNING
    return logging.INFO


class Events:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[pb.WatchUpdate]] = set()
        self._listeners: list[Callable[[pb.Event], None]] = []

    def publish(self, kind: str, snapshot: str = "", message: str = "", nbytes: int = 0,
                duration_s: float = 0.0) -> None:  # fmt: skip
        event = pb.Event(kind=kind, snapshot=snapshot, message=message, bytes=nbytes,
                         duration_s=duration_s)  # fmt: skip
        log.log(level(kind), "event %s %s %s", kind, snapshot, message,
                extra={"fields": {"event": kind, "snapshot": snapshot}})  # fmt: skip
        for listener in self._listeners:
            listener(event)
        update = pb.WatchUpdate(time_unix=time.time(), event=event)
        for queue in self._subscribers:
            if queue.full():  # a stalled dashboard must not grow the daemon's memory
                queue.get_nowait()
            queue.put_nowait(update)

    def listen(self, listener: Callable[[pb.Event], None]) -> None:
        """Call `listener(event)` for every event from now on."""
        self._listeners.append(listener)

    def subscribe(self) -> asyncio.Queue[pb.WatchUpdate]:
        queue: asyncio.Queue[pb.WatchUpdate] = asyncio.Queue(QUEUE_DEPTH)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[pb.WatchUpdate]) -> None:
        self._subscribers.discard(queue)
