"""thawd's log lines: where they go, how they look, and the per-minute restore summary.

Under journald (stdout is the stream $JOURNAL_STREAM names) each line starts with its syslog
priority, `<3>` error, `<4>` warning, `<6>` info, `<7>` debug, so `journalctl -p warning`
works, and carries no time: journald stamps it. In the foreground lines carry their time.
`log_format = "json"` makes each line one JSON object (time, level, logger, message and the
record's `fields`), still behind its priority under journald.

Restores are the daemon's hot path (thousands a minute under load): their events and access
lines are DEBUG, and `RestoreSummary` logs one INFO line a minute while restores happen. A
journal rate-limited by restore lines would drop the lines that matter: pins, freezes,
failures, refusals (docs/DAEMON.md, "Logs").
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import sys
from typing import Any

from thaw._proto import thawd_pb2 as pb
from thawd.budgets import human

# logging's levels as syslog priorities (sd-daemon(3)'s SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG).
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}  # fmt: skip
SUMMARY_INTERVAL_S = 60.0


def journald() -> bool:
    """stdout is connected to the journal: $JOURNAL_STREAM ("DEV:INODE") names its file, as
    systemd.exec(5) says to check (a unit whose output goes to a file has it set too)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class _Formatter(logging.Formatter):
    def __init__(self, json_lines: bool, priorities: bool) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt if priorities or json_lines else "%(asctime)s " + fmt)
        self.json_lines = json_lines
        self.priorities = priorities

    def format(self, record: logging.LogRecord) -> str:
        text = self._json(record) if self.json_lines else super().format(record)
        if not self.priorities:
            return text
        # Every line of a traceback keeps the record's priority in the journal.
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())

    def _json(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(
                record.created, datetime.timezone.utc
            ).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


_handler: logging.Handler | None = None


def configure(level: str, log_format: str = "text") -> None:
    """Log at `level` in `log_format` ("text" or "json") to stdout; called again on reload."""
    global _handler
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler(sys.stdout)
        root.addHandler(_handler)
    _handler.setFormatter(_Formatter(log_format == "json", journald()))
    root.setLevel(getattr(logging, level.upper()))


class RestoreSummary:
    """Counts restores between INFO lines: how many, how many bytes, p50 and p99 latency,
    failures. Fed by the event bus; `flush` logs the line (nothing when nothing happened)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.bytes = 0
        self.failed = 0

    def observe(self, event: pb.Event) -> None:
        if event.kind == "restore_finished":
            self.seconds.append(event.duration_s)
            self.bytes += event.bytes
        elif event.kind == "restore_failed":
            self.failed += 1

    def flush(self, log: logging.Logger, span: str) -> None:
        if not self.seconds and not self.failed:
            return
        ms = sorted(s * 1e3 for s in self.seconds)
        latency = (f", p50 {ms[len(ms) // 2]:.1f} ms, p99 {ms[(len(ms) * 99) // 100]:.1f} ms"
                   if ms else "")  # fmt: skip
        log.info("restores %s: %d (%s)%s, %d failed", span, len(ms), human(self.bytes), latency,
                 self.failed, extra={"fields": {"restores": len(ms), "bytes": self.bytes,
                                                "failed": self.failed}})  # fmt: skip
        self.seconds, self.bytes, self.failed = [], 0, 0


async def summarize(summary: RestoreSummary, log: logging.Logger) -> None:
    """The summary's line every SUMMARY_INTERVAL_S while thawd serves."""
    while True:
        await asyncio.sleep(SUMMARY_INTERVAL_S)
        summary.flush(log, "in the last minute")
