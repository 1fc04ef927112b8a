"""The status document as Prometheus metrics: an optional `/metrics` endpoint of the cloud service.

A custom collector turns each scrape into one `snapshot` of the service, so the endpoint adds no
bookkeeping of its own and always agrees with `status.json`. Per-device series carry a `device` label
(bounded by the devices registered or holding a credential, see `fleet_stats`); refusals a credential
could not tie to a known device have `device=""`. The endpoint is plain HTTP without authentication,
as Prometheus exporters usually are: it listens on `cloud.metrics_host` (127.0.0.1 by default), not on
the devices' network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

PREFIX = "fairedge_cloud"

# (row key, metric name, kind, help) of the per-device numbers
_DEVICE_METRICS = (
    ("uploads", "uploads", "counter", "Upload calls that were authenticated"),
    ("batches", "batches_stored", "counter", "uploaded batches stored (new samples)"),
    ("samples_accepted", "samples_accepted", "counter", "new samples stored"),
    ("samples_resent", "samples_resent", "counter", "re-sent samples acknowledged but not stored again"),
    ("registrations", "registrations", "counter", "Register calls that succeeded"),
    ("params_version", "params_version", "gauge", "the device's published norm-parameter version"),
    ("total_accepted", "stored_samples_total", "gauge", "samples the device ever had accepted (survives restarts)"),
    ("pending_samples", "pending_samples", "gauge", "accepted samples waiting for the learner"),
    ("replay_buffer", "replay_buffer_samples", "gauge", "learned samples kept for replay"),
    ("last_seen", "last_seen_timestamp_seconds", "gauge", "unix time of the device's last authenticated call"),
)


class StatusCollector(Collector):
    """Collects `snapshot()` (a `fleet_stats` status document) at each scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        status = self.snapshot()
        service = status["service"]
        yield GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "seconds since the service started", status["uptime_s"])
        yield GaugeMetricFamily(f"{PREFIX}_devices", "registered devices", service["devices"])
        yield CounterMetricFamily(f"{PREFIX}_updates", "published parameter updates", service["updates"])
        yield CounterMetricFamily(f"{PREFIX}_update_seconds", "seconds the learner spent updating", service["update_s"])
        yield CounterMetricFamily(f"{PREFIX}_update_failures", "updates that failed", service["failures"])
        rows = status["devices"]
        for key, name, kind, text in _DEVICE_METRICS:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                f"{PREFIX}_device_{name}", text, labels=["device"]
            )
            for device_id, row in rows.items():
                if row.get(key) is not None:
                    family.add_metric([device_id], float(row[key]))
            yield family
        rejections = CounterMetricFamily(
            f"{PREFIX}_device_rejections", "refused calls by reason", labels=["device", "reason"]
        )
        for device_id, row in rows.items():
            for reason, n in sorted(row["rejections"].items()):
                rejections.add_metric([device_id, reason], n)
        yield rejections


class MetricsServer:
    """A running `/metrics` HTTP endpoint; `stop()` closes it."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatusCollector(snapshot))
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as err:
            raise OSError(f"cannot serve Prometheus metrics on {host}:{port}: {err}") from None
        self.port: int = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
