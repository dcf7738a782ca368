"""Prometheus metrics of `thawctl serve` (GET /metrics; names in docs/SERVE.md).

Counters and the swap histogram are updated as things happen; queue depths and slot states
are read from the pool at scrape time by a collector, so they can never drift from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from thawctl.serve.pool import Pool, SwapRecord

STATES = ("idle", "busy", "swapping", "draining", "drained", "empty")


class Metrics:
    def __init__(self, pool: Pool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "thaw_serve_requests", "Requests by model, route and outcome",
            ["model", "route", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.swaps = Counter(
            "thaw_serve_swaps", "Weight swaps by model and outcome", ["model", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.swap_bytes = Counter(
            "thaw_serve_swap_bytes", "Bytes restored into slots by swaps", registry=self.registry
        )
        # Buckets from a tiny CPU model's 10 ms to a 70B model's seconds over PCIe.
        self.swap_seconds = Histogram(
            "thaw_serve_swap_seconds", "Seconds per weight swap", registry=self.registry,
            buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
        )  # fmt: skip
        self.registry.register(_PoolCollector(pool))
        pool.listeners.append(self.on_swap)

    def on_swap(self, record: SwapRecord) -> None:
        self.swaps.labels(record.model, "ok" if record.ok else "failed").inc()
        if record.ok:
            self.swap_bytes.inc(record.bytes)
            self.swap_seconds.observe(record.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("thaw_serve_queue_depth", "Requests waiting, by model",
                                  labels=["model"])  # fmt: skip
        for name in self.pool.models:
            depth.add_metric([name], len(self.pool.waiters.get(name, ())))
        yield depth
        state = GaugeMetricFamily("thaw_serve_slot_state", "1 for each slot's current state",
                                  labels=["slot", "state"])  # fmt: skip
        in_flight = GaugeMetricFamily("thaw_serve_slot_in_flight", "Requests running per slot",
                                      labels=["slot"])  # fmt: skip
        loaded = GaugeMetricFamily("thaw_serve_slot_model", "1 for the model each slot holds",
                                   labels=["slot", "model"])  # fmt: skip
        for s in self.pool.slots:
            for name in STATES:
                state.add_metric([str(s.index), name], 1.0 if s.state == name else 0.0)
            in_flight.add_metric([str(s.index)], s.in_flight)
            if s.model:
                loaded.add_metric([str(s.index), s.model], 1.0)
        yield state
        yield in_flight
        yield loaded
