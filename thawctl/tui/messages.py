"""Messages from the dashboard's workers to its screen (posted from worker threads)."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class SourceUpdate(Message):
    """One item of the watch stream: thaw.client Metrics or Event, or a source.Connection."""

    def __init__(self, item: Any) -> None:
        super().__init__()
        self.item = item


class ActionProgress(Message):
    """A running action (pin, verify) has news: one line for the activity bar."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ActionDone(Message):
    """An action finished; `error` is True when it failed (text: the one-line reason).

    `log`: also write it to the event log. Daemon actions succeed into the log already, as
    the daemon's own events (pinned, unpinned, unregistered); local ones (verify) do not.
    """

    def __init__(self, text: str, error: bool = False, log: bool = False) -> None:
        super().__init__()
        self.text = text
        self.error = error
        self.log = log


class PoolUpdate(Message):
    """The serve pool's latest view (thawctl.serve.status.PoolView), or None and why not."""

    def __init__(self, pool: Any, error: str = "") -> None:
        super().__init__()
        self.pool = pool
        self.error = error
