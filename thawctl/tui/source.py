"""Where the dashboard's data comes from: thawd's watch stream, through thaw.client only.

`DaemonSource.stream()` is a blocking iterator for the dashboard's one watch worker. It yields
the client's own immutable records (`Metrics`, `Event`) and `Connection` records of its own
when the link to the daemon changes; it reconnects by itself, forever, until `stop()`.
Actions (pin, unpin, remove, verify) open their own short-lived client, so they never wait
for, or disturb, the watch stream.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

# Reconnect backoff: quick at first (a daemon restart takes a few seconds), capped so a
# dashboard left open against a stopped daemon costs nothing noticeable.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0


@dataclasses.dataclass(frozen=True)
class Connection:
    """The state of the link to thawd: connecting, connected, reconnecting."""

    state: str
    detail: str = ""
    time: float = 0.0


class Source(Protocol):
    """What the dashboard needs; DaemonSource is the real one, tests may pass fixed data."""

    socket: str

    def stream(self) -> Iterator[Any]: ...

    def stop(self) -> None: ...

    def pin(self, name: str, progress: Callable[[Any], None], warm: bool = False) -> Any: ...

    def unpin(self, name: str) -> Any: ...

    def remove(self, name: str) -> None: ...

    def verify(self, name: str) -> Any: ...


class DaemonSource:
    def __init__(
        self, socket: str | None = None, interval_s: float = 1.0, timeout_s: float = 10.0
    ) -> None:
        from thaw.client import default_socket

        self.socket = socket or default_socket()
        self.interval_s = interval_s
        self.timeout_s = timeout_s  # connecting and short calls (thawctl --timeout)
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._client: Any = None

    def _connect(self) -> Any:
        import thaw

        return thaw.connect(self.socket, timeout=self.timeout_s)

    def stream(self) -> Iterator[Any]:
        """Watch updates, with Connection records around every (re)connection."""
        from thaw.errors import DaemonError

        detail = ""
        delay = RETRY_FIRST_S
        yield Connection("connecting", self.socket, time.time())
        while not self._stopped.is_set():
            try:
                client = self._connect()
                with self._lock:
                    if self._stopped.is_set():
                        client.close()
                        return
                    self._client = client
                try:
                    status = client.status()
                    yield Connection(
                        "connected", f"thawd {status.version}, pid {status.pid}", time.time()
                    )
                    delay = RETRY_FIRST_S
                    for item in client.watch(self.interval_s):
                        if self._stopped.is_set():
                            return
                        yield item
                    detail = "the watch stream ended"
                finally:
                    with self._lock:
                        self._client = None
                    client.close()
            except DaemonError as e:
                detail = str(e)
            except Exception as e:  # anything else the stream throws: keep the dashboard alive
                detail = f"{type(e).__name__}: {e}"
            if self._stopped.is_set():
                return
            yield Connection("reconnecting", detail, time.time())
            self._stopped.wait(delay)
            delay = min(RETRY_MAX_S, delay * 2)

    def stop(self) -> None:
        """End stream() from any thread: closing the client breaks its blocking read."""
        self._stopped.set()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def pin(self, name: str, progress: Callable[[Any], None], warm: bool = False) -> Any:
        with self._connect() as client:
            return client.pin(name, warm=warm, progress=progress)

    def unpin(self, name: str) -> Any:
        with self._connect() as client:
            return client.unpin(name)

    def remove(self, name: str) -> None:
        with self._connect() as client:
            client.unregister(name)

    def verify(self, name: str) -> Any:
        with self._connect() as client:
            return client.verify(name)
