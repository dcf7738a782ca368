"""Prometheus metrics on 127.0.0.1:`metrics_port` (off when 0). Every family is listed in
docs/OPERATIONS.md ("Metrics").

Two sources. What the daemon holds now (budgets, use, sessions, snapshots) is read at scrape
time from `Daemon.status()` and `Daemon.list()`, on the event loop: the Daemon has no locks,
and prometheus_client serves scrapes from its own thread. What happened (restores, pins,
freezes, failures) is counted from the event bus as it happens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from thaw._proto import thawd_pb2 as pb
from thawd import __version__
from thawd.config import ConfigError
from thawd.events import Events

log = logging.getLogger("thawd.metrics")

TIER_NAMES = {pb.TIER_COLD: "cold", pb.TIER_WARM: "warm", pb.TIER_PINNED: "pinned"}
POOL_NAMES = {pb.POOL_KIND_MEMFD: "memfd", pb.POOL_KIND_VMM: "vmm", pb.POOL_KIND_FILE: "file"}
# A scrape waits this long for the event loop; a loop that does not answer is a hung daemon
# (the watchdog's business): the scrape then carries the event counters only.
SCRAPE_TIMEOUT_S = 5.0
# Restores take 0.1 ms (1 MB, memfd) to a minute (100 GB from a cold file).
RESTORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                   5, 10, 30, 60)  # fmt: skip
# Pins and freezes move whole snapshots: seconds to minutes.
TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class DaemonCollector(Collector):
    """Gauges read from the daemon at each scrape."""

    def __init__(self, daemon: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.daemon = daemon
        self.loop = loop

    def describe(self) -> Iterator[Any]:
        """Nothing: without it, registering calls collect(), which would wait on the very
        event loop that registers it (SCRAPE_TIMEOUT_S at every start)."""
        return iter(())

    async def _read(self) -> tuple[pb.DaemonStatus, list[pb.Snapshot]]:
        return self.daemon.status(), self.daemon.list()

    def collect(self) -> Iterator[Any]:
        try:
            status, snapshots = asyncio.run_coroutine_threadsafe(self._read(), self.loop).result(
                SCRAPE_TIMEOUT_S)  # fmt: skip
        except Exception as e:  # TimeoutError, or a loop already closed at shutdown
            log.warning("metrics scrape without the daemon's state: the event loop did not "
                        "answer in %.0f s (%s)", SCRAPE_TIMEOUT_S, type(e).__name__)  # fmt: skip
            return
        info = GaugeMetricFamily("thawd_build_info", "thawd's version (value 1)",
                                 labels=["version", "api_version", "pool"])  # fmt: skip
        info.add_metric([__version__, str(status.api_version), POOL_NAMES[status.pool_kind]], 1)
        yield info
        budget = GaugeMetricFamily("thawd_budget_bytes", "Budget per tier", labels=["tier"])
        used = GaugeMetricFamily("thawd_used_bytes", "Bytes held or reserved per tier",
                                 labels=["tier"])  # fmt: skip
        for tier, b, u in (("pinned", status.pinned_budget, status.pinned_used),
                           ("warm", status.warm_budget, status.warm_used)):  # fmt: skip
            budget.add_metric([tier], b)
            used.add_metric([tier], u)
        yield budget
        yield used
        sessions = GaugeMetricFamily("thawd_sessions_open", "Restore and freeze sessions open",
                                     labels=["kind"])  # fmt: skip
        sessions.add_metric(["restore"], status.active_restores)
        sessions.add_metric(["freeze"], status.active_freezes)
        yield sessions
        yield GaugeMetricFamily("thawd_memory_locked", "1 while every pinned buffer and warm "
                                "mapping is mlocked", value=int(status.memory_locked))  # fmt: skip
        host = GaugeMetricFamily("thawd_host_memory_bytes", "Host memory", labels=["kind"])
        host.add_metric(["total"], status.host_memory_total)
        host.add_metric(["available"], status.host_memory_available)
        yield host
        size = GaugeMetricFamily("thawd_snapshot_bytes", "Payload bytes of each registered "
                                 "snapshot, by its tier now",
                                 labels=["snapshot", "tier"])  # fmt: skip
        restores = CounterMetricFamily("thawd_snapshot_restores", "Restores of each snapshot "
                                       "since it was registered (kept across restarts)",
                                       labels=["snapshot"])  # fmt: skip
        tiers = dict.fromkeys(TIER_NAMES.values(), 0)
        for s in snapshots:
            tier = TIER_NAMES.get(s.tier, "cold")
            tiers[tier] += 1
            size.add_metric([s.name, tier], s.size_bytes)
            restores.add_metric([s.name], s.restores)
        yield size
        yield restores
        count = GaugeMetricFamily("thawd_snapshots", "Registered snapshots per tier",
                                  labels=["tier"])  # fmt: skip
        for tier, n in tiers.items():
            count.add_metric([tier], n)
        yield count


class EventCounters:
    """Counters and histograms fed by the event bus (Events.listen), on the event loop."""

    def __init__(self, registry: prom.CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> prom.Counter:
            return prom.Counter(name, doc, labels, registry=registry)

        self.restores = counter("thawd_restores", "Restores by outcome", ("outcome",))
        self.restored_bytes = counter("thawd_restored_bytes", "Bytes restored by clients")
        self.failures = counter("thawd_failures", "Failures by event", ("event",))
        self.checksum_errors = counter("thawd_checksum_errors", "Tensors that did not match "
                                       "their checksum, by when", ("during",))  # fmt: skip
        self.demotions = counter("thawd_demotions", "Snapshots demoted to make room")
        self.events = counter("thawd_events", "Events by kind", ("event",))
        self.restore_seconds = prom.Histogram(
            "thawd_restore_seconds", "Restore duration as reported by clients",
            buckets=RESTORE_BUCKETS, registry=registry)  # fmt: skip
        self.pin_seconds = prom.Histogram(
            "thawd_pin_seconds", "Time to pin or warm a snapshot", ["tier"],
            buckets=TRANSFER_BUCKETS, registry=registry)  # fmt: skip
        self.freeze_seconds = prom.Histogram(
            "thawd_freeze_seconds", "Freezes: until the engine is released (commit), and the "
            "checksums and file after it (write)", ["stage"], buckets=TRANSFER_BUCKETS,
            registry=registry)  # fmt: skip
        for outcome in ("ok", "failed"):
            self.restores.labels(outcome)  # present at 0 before the first restore
        for during in ("pin", "verify"):
            self.checksum_errors.labels(during)

    def observe(self, event: pb.Event) -> None:
        kind = event.kind
        self.events.labels(kind).inc()
        if kind == "restore_finished":
            self.restores.labels("ok").inc()
            self.restored_bytes.inc(event.bytes)
            self.restore_seconds.observe(event.duration_s)
        elif kind == "restore_failed":
            self.restores.labels("failed").inc()
        elif kind in ("pinned", "warmed"):
            self.pin_seconds.labels("pinned" if kind == "pinned" else "warm").observe(
                event.duration_s)  # fmt: skip
        elif kind == "freeze_committed":
            self.freeze_seconds.labels("commit").observe(event.duration_s)
        elif kind == "freeze_written":
            self.freeze_seconds.labels("write").observe(event.duration_s)
        elif kind == "demoted":
            self.demotions.inc()
        if kind.endswith("_failed"):
            self.failures.labels(kind).inc()
        if kind in ("pin_failed", "verify_failed"):  # published for checksum mismatches only
            self.checksum_errors.labels(kind.removesuffix("_failed")).inc()


def start(port: int, daemon: Any, events: Events) -> None:
    """Serve /metrics on 127.0.0.1:`port`; nothing when `port` is 0."""
    if not port:
        return
    prom.disable_created_metrics()  # no *_created series beside every counter and histogram
    registry = prom.REGISTRY  # with prometheus_client's process_* (RSS, fds, CPU) families
    events.listen(EventCounters(registry).observe)
    registry.register(DaemonCollector(daemon, asyncio.get_running_loop()))
    try:
        prom.start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as e:
        raise ConfigError(f"metrics_port = {port}: {e.strerror}; write a free port, or 0 for "
                          "no metrics") from None  # fmt: skip
    log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", port)

