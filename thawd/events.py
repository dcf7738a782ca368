"""The event bus behind Watch: every subscriber gets every event, slow ones lose the oldest."""

from __future__ import annotations

import asyncio
import logging
import time

from thaw._proto import thawd_pb2 as pb

log = logging.getLogger("thawd.events")
QUEUE_DEPTH = 1024


class Events:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[pb.WatchUpdate]] = set()

    def publish(self, kind: str, snapshot: str = "", message: str = "", nbytes: int = 0,
                duration_s: float = 0.0) -> None:  # fmt: skip
        event = pb.Event(kind=kind, snapshot=snapshot, message=message, bytes=nbytes,
                         duration_s=duration_s)  # fmt: skip
        log.info("event %s %s %s", kind, snapshot, message)
        update = pb.WatchUpdate(time_unix=time.time(), event=event)
        for queue in self._subscribers:
            if queue.full():  # a stalled dashboard must not grow the daemon's memory
                queue.get_nowait()
            queue.put_nowait(update)

    def subscribe(self) -> asyncio.Queue[pb.WatchUpdate]:
        queue: asyncio.Queue[pb.WatchUpdate] = asyncio.Queue(QUEUE_DEPTH)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[pb.WatchUpdate]) -> None:
        self._subscribers.discard(queue)
