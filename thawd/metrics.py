"""Optional Prometheus metrics (prometheus_client, off unless `metrics_port` is set)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("thawd.metrics")
_m: dict[str, Any] = {}


def start(port: int) -> None:
    if not port:
        return
    try:
        import prometheus_client as prom
    except ImportError:
        log.warning("metrics_port is set but prometheus_client is not installed: metrics off")
        return
    _m["bytes"] = prom.Counter("thawd_restored_bytes", "Bytes restored by clients")
    _m["latency"] = prom.Histogram(
        "thawd_restore_seconds", "Restore duration as reported by clients",
        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    )  # fmt: skip
    _m["tier"] = prom.Gauge("thawd_tier_bytes", "Bytes held per tier", ["tier"])
    prom.start_http_server(port, addr="127.0.0.1")
    log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", port)


def restored(nbytes: int, duration_s: float) -> None:
    if _m:
        _m["bytes"].inc(nbytes)
        _m["latency"].observe(duration_s)


def tier_changed(daemon: Any) -> None:
    if _m:
        _m["tier"].labels("pinned").set(daemon.pinned_used())
        _m["tier"].labels("warm").set(daemon.warm_used())
